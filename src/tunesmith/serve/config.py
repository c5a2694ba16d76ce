"""`tunesmith serve` settings: command-line flags or a YAML file with the same fields (flags win)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunesmith.config import ConfigError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="Base model: a local folder or a hub id (a merged model is just a base).")
    adapters: dict[str, str] = Field(default_factory=dict, description="Adapter name -> folder, or registry:ALIAS.")
    host: str = Field("127.0.0.1", description="Listen address; anything but loopback needs a tenants file.")
    port: int = Field(8000, ge=0, le=65535, description="Listen port (0 = any free port).")
    tenants: str | None = Field(None, description="tenants.yaml: API keys -> tenants and their adapters.")
    admin_key_file: str | None = Field(None, description="File holding the admin key; no file = admin API off.")
    cache_budget: str = Field("512MB", description="Memory for hot adapters (stacked LoRA weights).")
    max_batch_size: int = Field(32, gt=0, description="Rows in one forward pass.")
    max_model_len: int | None = Field(None, gt=0, description="Prompt + completion token limit (default: model's).")
    max_body_bytes: int = Field(1 << 20, gt=0, description="Larger request bodies get 413.")
    max_stream_backlog: int = Field(256, gt=0, description="A streaming client this many chunks behind is cut off.")
    send_buffer_bytes: int | None = Field(
        None, gt=0, description="Cap each connection's kernel send buffer (SO_SNDBUF; default: autotuned, up to "
        "4 MiB on Linux), so a client that stops reading is noticed after that much unread output.")
    allow_base_mismatch: bool = Field(False, description="Serve adapters recorded for another base (logged; experts).")
    aliases: dict[str, dict[str, float]] = Field(default_factory=dict, description="A/B alias -> {variant: weight}.")
    alias_tenants: dict[str, str] = Field(default_factory=dict, description="A/B alias -> owning tenant (else shared).")
    registry_url: str | None = Field(None, description="Registry for registry:ALIAS adapters.")
    registry_refresh_s: float = Field(30.0, gt=0, description="Re-resolve registry aliases this often.")
    dtype: str = Field("auto", description="Weights dtype (auto, float32, bfloat16, float16).")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice).")


def parse_adapter_flag(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--adapter {text!r}: expected NAME=PATH or NAME=registry:ALIAS")
    return name.strip(), path.strip()


def load_serve_config(path: str | None, overrides: dict) -> ServeConfig:
    """Merge the YAML file (if any) with flags given on the command line (None = not given)."""
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read serve config ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of serve fields ({', '.join(ServeConfig.model_fields)})")
        base = Path(path).resolve().parent
        for key in ("tenants", "admin_key_file"):
            if data.get(key) and not Path(data[key]).is_absolute():
                data[key] = str(base / data[key])
        data["adapters"] = {n: (p if p.startswith("registry:") or Path(p).is_absolute() or not (base / p).exists()
                                else str(base / p)) for n, p in (data.get("adapters") or {}).items()}
    adapters = dict(data.get("adapters") or {})
    adapters.update(overrides.pop("adapters", None) or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["adapters"] = adapters
    try:
        config = ServeConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path or 'serve flags'}: invalid serve configuration"]
        lines += [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    if config.host not in LOOPBACK and not config.tenants:
        raise ConfigError(
            f"--host {config.host}: without --tenants the server is open to anyone who can reach it; "
            "serve on 127.0.0.1, or give --tenants tenants.yaml with API keys"
        )
    return config
