"""Command line and YAML into a typed, validated :class:`~harmony.config.Config` (docs/DESIGN.md "Command line and
outputs").

``train.py [--config FILE.yaml] [--section.key=value | --section.key value ...]``: defaults, then the
YAML file (a mapping of sections), then the overrides, in that order. Without ``--config`` the file is the
repository's ``configs/default.yaml`` (next to ``train.py``), so a bare ``torchrun train.py`` runs the default job.
Every value is converted by the type of its dataclass field (bool accepts true/false/yes/no/on/off/1/0; lists accept
``2,8,8`` or ``[2,8,8]``). An unknown section or key is an error that lists the valid ones; a bad value is an error
naming the field and what is allowed — all before any work.
"""
from __future__ import annotations

import dataclasses
import typing
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from harmony.config import REAL_DATA_VALUES as DATA_REAL_VALUES
from harmony.config import Config, ConfigError, sections

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
# torchrun/launch may pass these; they carry nothing the config needs (LOCAL_RANK comes from the env).
_IGNORED_FLAGS = ("--local-rank", "--local_rank")
# The config a run reads when no --config is given: configs/default.yaml beside train.py.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def _field_types(section_obj) -> Dict[str, Any]:
    """Field name -> resolved type of one section dataclass (annotations are strings here)."""
    return typing.get_type_hints(type(section_obj))


def _parse_bool(text: str, name: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{name}={text!r} is not a boolean; use one of {list(_TRUE + _FALSE)}")


def _parse_list(text: str) -> list:
    """'2,8,8' or '[2,8,8]' -> [2, 8, 8]; each element read as a YAML scalar (numbers become numbers)."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    if not body.strip():
        return []
    return [yaml.safe_load(tok.strip()) for tok in body.split(",")]


def convert(value: Any, typ: Any, name: str) -> Any:
    """Convert a CLI string or a YAML value to the field's type; ConfigError names the field on failure."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]: None stays None, anything else converts as X
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return convert(value, args[0], name)
    if typ is Any:
        return yaml.safe_load(value) if isinstance(value, str) else value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(value, name)
        raise ConfigError(f"{name}={value!r} is not a boolean; use true or false")
    if typ in (list, tuple) or origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return _parse_list(value)
        raise ConfigError(f"{name}={value!r} is not a list; write it as 2,8,8 or [2,8,8]")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not an integer")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} is not a number")
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}={value!r} is not a string")
        return "" if value is None else str(value)
    raise ConfigError(f"{name}: unsupported field type {typ!r}")


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.key`` on ``cfg`` with type conversion; unknown names list the valid ones."""
    by_name = sections(cfg)
    if "." not in dotted:
        raise ConfigError(f"--{dotted}: expected --section.key=value with section one of {sorted(by_name)}")
    section, key = dotted.split(".", 1)
    if section not in by_name:
        raise ConfigError(f"unknown config section {section!r} (in {dotted!r}); valid sections: {sorted(by_name)}")
    obj = by_name[section]
    types = _field_types(obj)
    if key not in types:
        raise ConfigError(f"unknown config key {dotted!r}; valid keys of [{section}]: {sorted(types)}")
    setattr(obj, key, convert(value, types[key], dotted))


def _legacy(cfg: Config, pairs: List[Tuple[str, Any]]) -> List[Tuple[str, Any]]:
    """The score memory's former spelling, read as the composed form: ``harmony.curriculum=memory`` with
    ``harmony.memory_schedule=RULE`` (default ratio) is ``harmony.score_memory=true`` with
    ``harmony.curriculum=RULE``; a memory_schedule without the memory had no effect and is dropped. Saved
    configs (run folders, checkpoints) and older command lines keep working; this is the one place it is read."""
    schedules = [str(v) for k, v in pairs if k == "harmony.memory_schedule"]
    memory_here = any(k == "harmony.curriculum" and str(v) == "memory" for k, v in pairs)
    out: List[Tuple[str, Any]] = []
    for k, v in pairs:
        if k == "harmony.curriculum" and str(v) == "memory":
            out += [("harmony.score_memory", True), ("harmony.curriculum", schedules[-1] if schedules else "ratio")]
        elif k == "harmony.memory_schedule":
            if not memory_here and cfg.harmony.score_memory:
                out.append(("harmony.curriculum", v))
        else:
            out.append((k, v))
    return out


def apply_mapping(cfg: Config, mapping: Dict[str, Any], origin: str = "config") -> None:
    """Apply a {section: {key: value}} mapping (a parsed YAML file) to ``cfg``."""
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(mapping).__name__}")
    pairs = []
    for section, values in mapping.items():
        if section not in sections(cfg):
            raise ConfigError(f"{origin}: unknown config section {section!r}; valid sections: {sorted(sections(cfg))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of key: value")
        pairs += [(f"{section}.{key}", value) for key, value in values.items()]
    for dotted, value in _legacy(cfg, pairs):
        set_value(cfg, dotted, value)


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML config file; a missing file or a syntax error is a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})")


def _split_args(argv: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """argv -> (config files, [(section.key, raw value)]), keeping the order of the overrides."""
    configs, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE and --section.key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:  # "--key value" form, or a bare flag
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            elif "--" + name in _IGNORED_FLAGS:
                value = ""
            else:
                raise ConfigError(f"--{name} needs a value (--{name}=VALUE)")
        if "--" + name in _IGNORED_FLAGS:
            pass
        elif name == "config":
            configs.append(value)
        else:
            overrides.append((name, value))
        i += 1
    return configs, overrides


def parse_args(argv: Optional[Sequence[str]] = None,
               default_config: Optional[Path] = DEFAULT_CONFIG) -> Tuple[Config, str]:
    """argv (without the program name) -> (validated Config, config name for the run folder).

    Without ``--config``, ``default_config`` is read (the repository's configs/default.yaml; ``None``: the
    dataclass defaults alone). The config name is the stem of the last config file read, or ``default``.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    configs, overrides = _split_args(argv)
    if not configs and default_config is not None:
        if Path(default_config).is_file():
            configs = [str(default_config)]
        else:  # an installed package without the repository's configs/: the built-in defaults
            warnings.warn(f"no --config and no {default_config}; using the built-in defaults", stacklevel=2)
    cfg = Config()
    user_set: Dict[str, str] = {}  # section.key -> where the user set it (a config file's path, or "" for the CLI)
    for path in configs:
        mapping = load_yaml(path)
        apply_mapping(cfg, mapping, origin=path)
        if not _is_benchmark_config(path):
            user_set.update({k: path for k in _mapping_keys(mapping)})
    for dotted, value in _legacy(cfg, overrides):
        set_value(cfg, dotted, value)
        user_set[dotted] = ""
    _real_data_defaults(cfg, user_set)
    _resolve_data_paths(cfg, user_set)
    cfg.validate()
    name = Path(configs[-1]).stem if configs else "default"
    return cfg, name


# Injected misalignment belongs to the synthetic benchmark (the defaults set it for that kind), and so do its hard
# items and its concept imbalance: their values on real data unless the user set them.
REAL_DATA_VALUES = {f"data.{k}": v for k, v in DATA_REAL_VALUES.items()}


def _is_benchmark_config(path: str) -> bool:
    """True for the repository's configs/default.yaml (the synthetic benchmark), read implicitly or named."""
    try:
        return Path(path).resolve() == DEFAULT_CONFIG.resolve()
    except OSError:
        return False


def _mapping_keys(mapping: Any) -> List[str]:
    if not isinstance(mapping, dict):
        return []
    return [f"{s}.{k}" for s, values in mapping.items() if isinstance(values, dict) for k in values]


def _real_data_defaults(cfg: Config, user_set: Dict[str, str]) -> None:
    """Real data (manifest, shards) gets no injected noise unless the user asked for it: the noise rates of
    the synthetic benchmark's config do not carry over to a user's clips."""
    if cfg.data.kind == "synthetic":
        return
    for dotted, value in REAL_DATA_VALUES.items():
        if dotted not in user_set:
            setattr(cfg.data, dotted.split(".", 1)[1], value)


def _resolve_data_paths(cfg: Config, user_set: Dict[str, str]) -> None:
    """A relative data.manifest / data.eval_manifest from a config file is looked up from the current
    directory first, then from the config file's folder; found in neither, a ConfigError names both places.
    (A path given on the command line, or found nowhere else, is checked by harmony.trainer.inputs.check_inputs.)"""
    for key in ("manifest", "eval_manifest"):
        value = getattr(cfg.data, key)
        origin = user_set.get(f"data.{key}", "")
        if not value or Path(value).is_absolute() or not origin:
            continue
        places = [Path.cwd() / value, Path(origin).resolve().parent / value]
        found = next((p for p in places if p.is_file()), None)
        if found is None and not places[0].exists():
            raise ConfigError(f"data.{key}={value!r}: no such file (tried {places[0]} and {places[1]}: relative to "
                              "the current directory and to the config file's folder)")
        if found is not None and found != places[0]:
            setattr(cfg.data, key, str(found))


def config_from_dict(mapping: Dict[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict` (used when a checkpoint's config is read back)."""
    cfg = Config()
    apply_mapping(cfg, mapping, origin="saved config")
    return cfg.validate()


def format_help() -> str:
    """One line per field: --section.key (type, default): help [choices]."""
    lines = ["usage: train.py [--config FILE.yaml] [--section.key=value ...]",
             f"(no --config: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])}, which holds the defaults "
             "below; a config file of your own starts from them)", ""]
    cfg = Config()
    for section, obj in sections(cfg).items():
        lines.append(f"[{section}] {type(obj).__doc__.strip().splitlines()[0]}")
        types = _field_types(obj)
        for f in dataclasses.fields(obj):
            typ = getattr(types[f.name], "__name__", str(types[f.name]))
            choices = f.metadata.get("choices")
            extra = f" {{{'|'.join(map(str, choices))}}}" if choices else ""
            lines.append(f"  --{section}.{f.name} ({typ}, default {getattr(obj, f.name)!r}){extra}: "
                         f"{f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)
