"""Typed stage configs: one frozen dataclass per stage, filled from YAML and the command line.

Every field is a command-line flag of the same name (the reference's names: `--max_len`,
`--micro_train_batch_size`, ...). `--config FILE.yaml` loads defaults from YAML; flags given on
the command line override it. Validation happens once, here, and every error names the file,
the key or flag, and what was expected.

    @dataclass(frozen=True)
    class PrepareConfig:
        output_dir: str = opt(None, "Where to write the data", required=True)

    cfg = parse_config(PrepareConfig, argv)
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad option value, unknown key or inconsistent combination; the message says which."""


def opt(default: Any, help: str, *, required: bool = False, aliases: Sequence[str] = (),
        metavar: str | None = None) -> Any:
    """A config field with its help text. `aliases` are extra flag spellings (`--max_epoch`)."""
    meta = {"help": help, "required": required, "aliases": tuple(aliases), "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _strip_optional(tp)
    origin = get_origin(base)
    if origin is Literal:
        name = "one of " + ", ".join(repr(a) for a in get_args(base))
    elif origin in (list, tuple):
        inner = [a for a in get_args(base) if a is not Ellipsis]
        name = f"a list of {_type_name(inner[0]) if inner else 'values'}"
    else:
        name = getattr(base, "__name__", str(base))
    return name + (" or null" if optional else "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a field type; raise ConfigError naming `where`."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got null")
    origin = get_origin(base)
    if origin is Literal:
        if value not in get_args(base):
            raise ConfigError(f"{where}: expected {_type_name(base)}, got {value!r}")
        return value
    if origin in (list, tuple):
        inner = [a for a in get_args(base) if a is not Ellipsis] or [Any]
        if isinstance(value, str):  # "0.9,0.95" or "0.9 0.95" in YAML
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(base)}, got {value!r}")
        items = [_coerce(v, inner[min(i, len(inner) - 1)], f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if base is Any:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def load_yaml(path: str | Path, cls: type, section: str | None = None) -> dict[str, Any]:
    """Read a YAML file (optionally one top-level section of it) and check it against `cls`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if section is not None:
        data = data.get(section) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return check_keys(cls, data, str(path))


def check_keys(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Type-check a mapping of option values against `cls` (no cross-field validation)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of option names to values, got {type(data).__name__}")
    fields = _fields(cls)
    out = {}
    for key, value in data.items():
        key = _ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=3)
            raise ConfigError(f"{where}: unknown key {key!r}" + (f" (did you mean {', '.join(hint)}?)" if hint else
                                                                f"; known keys: {', '.join(sorted(fields))}"))
        out[key] = _coerce(value, fields[key][1], f"{where}: key {key!r}")
    return out


_ALIASES = {"max_epoch": "max_epochs"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # name close matches for unknown flags
        if message.startswith("unrecognized arguments"):
            known = [s for a in self._actions for s in a.option_strings]
            bad = [w for w in message.split(":", 1)[1].split() if w.startswith("--")]
            hints = {b: difflib.get_close_matches(b, known, n=2) for b in bad}
            extra = "; ".join(f"{b}: did you mean {', '.join(h)}?" for b, h in hints.items() if h)
            if extra:
                message += f" ({extra})"
        super().error(message)


def build_parser(cls: type, prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
                     allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="YAML file of option values; command-line flags override it")
    for name, (f, tp) in _fields(cls).items():
        base, optional = _strip_optional(tp)
        flags = [f"--{name}", *(f"--{a}" for a in f.metadata.get("aliases", ()))]
        kw: dict[str, Any] = {"dest": name, "help": f.metadata.get("help", ""), "default": _default(f)}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        origin = get_origin(base)
        if base is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            continue
        if origin is Literal:
            kw["choices"] = list(get_args(base))
            kw["type"] = type(get_args(base)[0])
        elif origin in (list, tuple):
            inner = [a for a in get_args(base) if a is not Ellipsis] or [str]
            kw["type"] = inner[0] if inner[0] in (int, float, str) else str
            kw["nargs"] = len(inner) if origin is tuple and Ellipsis not in get_args(base) else "+"
        elif base in (int, float, str):
            kw["type"] = _none_or(base) if optional else base
        parser.add_argument(*flags, **kw)
    return parser


def _none_or(tp: type):
    def conv(s: str):
        return None if s in ("None", "null", "none") else tp(s)
    conv.__name__ = tp.__name__
    return conv


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
                 defaults: dict[str, Any] | None = None) -> T:
    """Parse `argv` (default sys.argv[1:]) with optional `--config YAML` into a validated `cls`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, prog)
    pre, _ = parser.parse_known_args(argv)  # find --config first
    base = dict(defaults or {})
    if pre.config:
        try:
            base.update(load_yaml(pre.config, cls))
        except ConfigError as e:
            parser.error(str(e))
    parser.set_defaults(**base)
    ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if k != "config"}
    fields = _fields(cls)
    for name, (f, tp) in fields.items():
        if f.metadata.get("required") and values.get(name) is None:
            parser.error(f"the option --{name} is required ({f.metadata.get('help', '')})")
        if isinstance(values.get(name), list) and get_origin(_strip_optional(tp)[0]) is tuple:
            values[name] = tuple(values[name])
    try:
        return cls(**values)
    except ConfigError as e:
        parser.error(str(e))


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build `cls` from a plain dict (a params section, a Prefect parameter), type-checked."""
    return cls(**check_keys(cls, data, where))


def to_argv(cfg: Any) -> list[str]:
    """The command line that reproduces `cfg` (for Ray jobs and DVC stages)."""
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        if isinstance(v, bool):
            argv.append(f"--{f.name}" if v else f"--no-{f.name}")
        elif isinstance(v, (list, tuple)):
            argv += [f"--{f.name}", *map(str, v)]
        else:
            argv += [f"--{f.name}", str(v)]
    return argv


def check(cond: bool, field: str, message: str) -> None:
    """Raise a ConfigError naming the option when `cond` is false (used in __post_init__)."""
    if not cond:
        raise ConfigError(f"--{field}: {message}")
