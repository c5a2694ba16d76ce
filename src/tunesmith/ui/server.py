"""Start the dashboard: read the admin key, check the bind address, run uvicorn, print the address.

Loopback (127.0.0.1, ::1, localhost) is the default. Binding anywhere else exposes run data to the network, so it
needs an admin key, and then every /api request must carry it. On loopback the server also checks the Host
header (DNS-rebinding guard), so only http://127.0.0.1:PORT and http://localhost:PORT reach it. The server speaks
plain HTTP: across a network, put it behind a TLS proxy, or the key travels in clear text.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from tunesmith.errors import UsageError
from tunesmith.ui.sources import Catalog

LOOPBACK_NAMES = ("localhost",)
MIN_KEY_CHARS = 8


class UIConfigError(UsageError):
    """A bad `tunesmith ui` flag, phrased for a person (cli.main prints it as `error: ...`)."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_admin_key(path: str | Path | None) -> str | None:
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UIConfigError(f"--admin-key-file {path}: cannot read ({exc})") from None
    if len(key) < MIN_KEY_CHARS:
        raise UIConfigError(f"--admin-key-file {path}: the key must have {MIN_KEY_CHARS}+ characters")
    return key


def build_app(registry: str | None = None, runs_dir: str | Path | None = "runs", host: str = "127.0.0.1",
              port: int = 8765, admin_key_file: str | Path | None = None):
    """The app `tunesmith ui` would serve with these flags (refuses a non-loopback host without a key)."""
    from tunesmith.ui.app import create_app

    key = read_admin_key(admin_key_file)
    loopback = is_loopback(host)
    if not loopback and key is None:
        raise UIConfigError(f"--host {host} is not loopback: the dashboard would be readable from the network; "
                            "give --admin-key-file FILE (every request must then carry the key) or bind 127.0.0.1")
    hosts = ["127.0.0.1", "localhost", "[::1]", "::1"] if loopback else None
    if loopback and host not in hosts:
        hosts.append(host)
    return create_app(Catalog(registry, runs_dir), admin_key=key, require_key_for_reads=not loopback,
                      allowed_hosts=hosts)


def run_ui(registry: str | None = None, runs_dir: str | Path | None = "runs", host: str = "127.0.0.1",
           port: int = 8765, admin_key_file: str | Path | None = None, log=print) -> None:
    import uvicorn

    app = build_app(registry, runs_dir, host, port, admin_key_file)
    shown = f"[{host}]" if ":" in host else host
    log(f"tunesmith ui on http://{shown}:{port}/ (runs folder {Path(runs_dir).resolve() if runs_dir else '-'}; "
        + ("registry actions need the admin key" if admin_key_file else "registry actions off: no --admin-key-file")
        + "); Ctrl-C stops it")
    sys.stdout.flush()
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
