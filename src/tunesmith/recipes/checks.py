"""Checks a recipe runs before any heavy work (no model, no tokenizer, no data read yet)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import ConfigError, RunConfig


def looks_like_path(name_or_path: str) -> bool:
    """A model name that can only be a folder: absolute, ./ ../ ~ relative, or deeper than a hub id's org/name."""
    text = name_or_path.strip()
    return Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") >= 2 or "\\" in text


def config_paths(config: RunConfig) -> list[tuple[str, str]]:
    """(config key, path as written) for every file or folder the config names."""
    from tunesmith.data.hub import parse_source  # hf:ORG/NAME and FOLDER:SPLIT are dataset sources, not paths

    keyed = [(f"data.{split}[{i}]", path) for split in ("train", "validation", "test")
             for i, path in enumerate(getattr(config.data, split)) if parse_source(path) is None]
    keyed += [(f"eval.splits.{name}[{i}]", path) for name, paths in config.eval.splits.items()
              for i, path in enumerate(paths)]
    if looks_like_path(config.model.name_or_path):
        keyed.append(("model.name_or_path", config.model.name_or_path))
    return keyed


def check_run_paths(config: RunConfig, config_file: str | Path | None = None) -> None:
    """Raise one ConfigError listing every missing path: key, path as written, path resolved.

    Relative paths resolve against the config file's folder (what load_config does for data files that exist
    there), else against the working directory.
    """
    base = Path(config_file).resolve().parent if config_file is not None else Path.cwd()
    missing = []
    for key, written in config_paths(config):
        path = Path(written).expanduser()
        if not path.exists():
            resolved = path if path.is_absolute() else (base / path).resolve()
            missing.append(f"  {key}: {written}" + ("" if str(resolved) == written else f" (resolved: {resolved})"))
    if missing:
        where = f"in {config_file}" if config_file is not None else "in the run config"
        raise ConfigError(f"{len(missing)} path(s) {where} do not exist:\n" + "\n".join(missing),
                          hint="relative paths are resolved against the config file's folder; fix them there "
                               "or override one with --set KEY=PATH")
