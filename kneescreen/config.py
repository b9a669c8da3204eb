"""One source of settings per command: frozen dataclasses become CLI flags and YAML files.

Fields are made with `opt` (default + help). `add_arguments` adds flags with ``default=SUPPRESS`` so
the namespace holds only what was typed; `build` layers dataclass defaults < YAML (`load_yaml`) <
flags and type-checks; `dump_yaml` writes a replayable config. Nested dataclass fields are flattened.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from kneescreen.errors import KneescreenError

MISSING = dataclasses.MISSING
_META = "kneescreen"
_DESC = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
_PLURAL = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
_CLI = "command line"
_NO_META = {"help": "", "flag": None, "aliases": (), "choices": None, "positional": False, "cli": True}


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One leaf setting: a non-dataclass field, after flattening."""

    name: str
    base: type  # str, int, float, bool or tuple
    elem: type | None  # element type of a tuple field
    optional: bool
    field: dataclasses.Field

    @property
    def meta(self) -> dict:
        return self.field.metadata.get(_META, _NO_META)

    @property
    def flag(self) -> str:
        return self.meta["flag"] or "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.field.default is MISSING and self.field.default_factory is MISSING


def opt(default: Any = MISSING, help: str = "", *, flag: str | None = None,  # noqa: A002
        aliases: tuple[str, ...] = (), choices: tuple | None = None, positional: bool = False,
        cli: bool = True, default_factory: Any = MISSING) -> dataclasses.Field:
    """A `dataclasses.field` carrying its CLI/YAML description; required without a default.

    Args:
        default: default value (or `default_factory`, a zero-argument callable).
        help: help text for ``--help``.
        flag: option string instead of ``--field-name``; aliases: extra ones, e.g. ``("--workers",)``.
        choices: allowed values (of each element, for tuple fields).
        positional: a positional argument instead of a flag; cli: False keeps it YAML-only.
    """
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "positional": positional,
            "choices": None if choices is None else tuple(choices), "cli": cli}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_META: meta})


def _is_dc(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _leaf(f: dataclasses.Field, tp: Any, cls: type) -> _Spec:
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp
    if tp in _DESC:
        return _Spec(f.name, tp, None, optional, f)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (str, int, float):
        return _Spec(f.name, tuple, args[0], optional, f)
    raise TypeError(f"{cls.__name__}.{f.name}: unsupported type {tp!r} for a config field")


def _flatten(cls: type) -> list[_Spec]:
    """All leaf settings of `cls`, nested dataclasses flattened; ValueError on a name clash."""
    out: list[_Spec] = []
    for f, tp in _fields(cls):
        out.extend(_flatten(tp) if _is_dc(tp) else [_leaf(f, tp, cls)])
    names = [s.name for s in out]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"{cls.__name__}: setting names used twice after flattening: {clash}")
    return out


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "empty"
    if isinstance(value, bool) or value is None:
        return "none" if value is None else str(value).lower()
    return repr(value) if value == "" else str(value)


class _Values(argparse.Action):
    """Converts and checks values itself: tuple fields (repeatable, comma split) and positionals."""

    def __init__(self, option_strings, dest, elem=str, allowed=None, many=False, **kw):
        super().__init__(option_strings, dest, **kw)
        self.elem, self.allowed, self.many = elem, allowed, many

    def __call__(self, parser, namespace, values, option_string=None):
        raw = values if isinstance(values, list) else [values]
        if self.many:
            raw = [p.strip() for v in raw for p in v.split(",") if p.strip()]
        out = []
        for text in raw:
            try:
                item = self.elem(text)
            except ValueError:
                raise argparse.ArgumentError(self, f"invalid {self.elem.__name__} value: {text!r}") from None
            if self.allowed is not None and item not in self.allowed:
                raise argparse.ArgumentError(self, f"invalid choice: {text!r} (choose from {_show(self.allowed)})")
            out.append(item)
        if self.many:
            setattr(namespace, self.dest, tuple(getattr(namespace, self.dest, None) or ()) + tuple(out))
        else:
            setattr(namespace, self.dest, out[0])


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per (flattened) field of `cls`, all with ``default=argparse.SUPPRESS``.

    Raises:
        ValueError: two settings share a name or an option string.
    """
    for spec in _flatten(cls):
        meta = spec.meta
        if not meta["cli"]:
            continue
        f = spec.field
        default = f.default if f.default_factory is MISSING else f.default_factory()
        note = "required" if spec.required else f"default: {_show(default)}"
        note += "; repeatable, comma-separated" if spec.base is tuple and not meta["positional"] else ""
        kw: dict[str, Any] = {"default": argparse.SUPPRESS,
                              "help": f"{meta['help']} ({note})".strip().replace("%", "%%")}
        many, positional = spec.base is tuple, meta["positional"]
        if positional and spec.base is bool:
            raise ValueError(f"{cls.__name__}.{spec.name}: a bool cannot be positional")
        if spec.base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif many or positional:  # argparse would convert and check SUPPRESS itself: do it in _Values
            kw.update(action=_Values, elem=spec.elem or spec.base, allowed=meta["choices"], many=many)
        else:
            kw.update(type=spec.base, choices=meta["choices"])
        if positional:
            names, kw["nargs"] = [spec.name], "*" if many else "?"
        else:
            names, kw["dest"] = [spec.flag, *meta["aliases"]], spec.name
        try:
            parser.add_argument(*names, **kw)
        except argparse.ArgumentError as e:
            raise ValueError(f"{cls.__name__}.{spec.name}: {e}") from e


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` (default None, so callers can test ``args.config``)."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file with this command's settings; flags given on the command line win")


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; the caller reads ``args.config`` with `load_yaml` and resolves with `build`."""
    return parser.parse_args(argv)


def _norm_keys(data: Mapping, source: str) -> dict:
    out: dict = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise KneescreenError(f"{source}: setting names must be strings, got {key!r}")
        name = key.strip().replace("-", "_")
        if name in out:
            raise KneescreenError(f"{source}: `{name}` is given twice (as `{key}` and another spelling)")
        out[name] = value
    return out


def load_yaml(path: str) -> dict:
    """Read a YAML mapping of settings (empty file -> {}); keys normalised to underscores.

    Raises:
        KneescreenError: the file is missing, unreadable, not YAML or not a mapping.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise KneescreenError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KneescreenError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise KneescreenError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KneescreenError(f"config file {path} must hold a mapping (`key: value` lines), "
                              f"got a {type(data).__name__}")
    return _norm_keys(data, path)


def _collect(cls: type, values: Mapping, source: str, out: dict) -> None:
    """Put `values` into flat `out` ({name: (value, source)}), accepting nested mappings."""
    nested = {f.name: tp for f, tp in _fields(cls) if _is_dc(tp)}
    valid = [s.name for s in _flatten(cls)]
    for key, value in _norm_keys(values, source).items():
        if key in nested:
            if not isinstance(value, Mapping):
                raise KneescreenError(f"{source}: `{key}` must be a mapping of its settings, got {value!r}")
            _collect(nested[key], value, source, out)
        elif key in valid:
            if key in out:
                raise KneescreenError(f"{source}: `{key}` is given twice")
            out[key] = (value, source)
        else:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean `{near[0]}`?)" if near else ""
            raise KneescreenError(f"{source}: unknown setting `{key}`{hint}; valid keys: {', '.join(valid)}")


def _check(spec: _Spec, value: Any, source: str) -> Any:
    """The value converted to the field's type, or a KneescreenError naming key and source."""
    desc = f"a list of {_PLURAL[spec.elem]}" if spec.base is tuple else _DESC[spec.base]
    if value is None and spec.optional:
        return None
    if spec.base is tuple and isinstance(value, str | list | tuple):
        items = [value] if isinstance(value, str) else list(value)
        sub = dataclasses.replace(spec, base=spec.elem, optional=False)
        return tuple(_check(dataclasses.replace(sub, name=f"{spec.name}[{i}]"), v, source)
                     for i, v in enumerate(items))
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool),
          str: isinstance(value, str)}.get(spec.base, False)
    if not ok:
        null = " or null" if spec.optional else ""
        raise KneescreenError(f"{source}: `{spec.name}` must be {desc}{null}, "
                              f"got {value!r} ({type(value).__name__})")
    value = float(value) if spec.base is float else value
    allowed = spec.meta["choices"]
    if allowed is not None and value not in allowed:
        raise KneescreenError(f"{source}: `{spec.name}` must be one of {_show(allowed)}, got {value!r}")
    return value


def _construct(cls: type, flat: dict, missing: list) -> Any:
    kwargs = {}
    for f, tp in _fields(cls):
        if _is_dc(tp):
            kwargs[f.name] = _construct(tp, flat, missing)
            continue
        spec = _leaf(f, tp, cls)
        if f.name in flat:
            kwargs[f.name] = _check(spec, *flat[f.name])
        elif spec.required:
            cli = spec.meta["cli"]
            how = (spec.name.upper() if spec.meta["positional"] else spec.flag) + " or " if cli else ""
            missing.append(f"missing required `{f.name}` (give {how}`{f.name}:` in the --config file)")
    return None if missing else cls(**kwargs)


def build(cls: type, args: argparse.Namespace | None = None, values: dict | None = None, *,
          source: str = "config") -> Any:
    """Resolve an instance of `cls` (nested ones too): dataclass defaults < `values` < `args`.

    Args:
        cls: the settings dataclass.
        args: parsed flags; only attributes present count, non-field ones (``config``...) are ignored.
        values: e.g. from `load_yaml`: flat keys, or a mapping under a nested dataclass field's name.
        source: names `values` in error messages, e.g. the YAML path.

    Raises:
        KneescreenError: unknown key, wrong type, value not among choices, missing required field.
    """
    flat: dict = {}
    _collect(cls, values or {}, source, flat)
    given = vars(args) if args is not None else {}
    flat.update({s.name: (given[s.name], _CLI) for s in _flatten(cls) if s.name in given})
    missing: list[str] = []
    instance = _construct(cls, flat, missing)
    if missing:
        raise KneescreenError("; ".join(missing))
    return instance


def to_flat_dict(obj: Any) -> dict:
    """JSON/YAML-safe flat dict of a settings instance (tuples -> lists, nested flattened)."""
    out: dict = {}
    for f in (f for f in dataclasses.fields(obj) if f.init):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value))
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def dump_yaml(obj: Any) -> str:
    """YAML text of `to_flat_dict(obj)` in field order, replayable with ``--config``."""
    body = yaml.safe_dump(to_flat_dict(obj), sort_keys=False, default_flow_style=False)
    return f"# kneescreen {type(obj).__name__} config: replay with --config\n{body}"
