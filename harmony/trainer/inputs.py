"""Checks of the user's inputs that need the file system (data files), made before a run folder exists.

``check_inputs(cfg)`` raises :class:`~harmony.config.ConfigError` with one line naming the field and the
file: a manifest run without a manifest, a manifest or shard pattern that names nothing. The value
checks (types, choices, bounds, finite numbers) are the config's own ``validate()``.
"""
from __future__ import annotations

from pathlib import Path

from harmony.config import Config, ConfigError


def _check_file(cfg_data, key: str) -> None:
    value = getattr(cfg_data, key)
    if not value or Path(value).is_file():
        return
    if Path(value).exists():
        raise ConfigError(f"data.{key}={value!r} is not a file")
    raise ConfigError(f"data.{key}={value!r}: no such file (relative paths are taken from the current directory "
                      f"{str(Path.cwd())!r})")


def check_inputs(cfg: Config) -> None:
    """Raise ConfigError for data inputs that cannot work (see the module docstring)."""
    d = cfg.data
    if d.kind == "manifest":
        if not d.manifest:
            raise ConfigError("data.kind=manifest needs data.manifest=PATH (a JSONL manifest of clips)")
        _check_file(d, "manifest")
        _check_file(d, "eval_manifest")
    elif d.kind == "shards":
        if not d.shards:
            raise ConfigError("data.kind=shards needs data.shards=PATTERN (a brace pattern or glob of .tar files)")
        from harmony.data.shards import expand_pattern

        for key in ("shards", "eval_shards"):
            pattern = getattr(d, key)
            if pattern and not any(Path(p).is_file() for p in expand_pattern(pattern)):
                raise ConfigError(f"data.{key}={pattern!r} names no existing .tar file")
