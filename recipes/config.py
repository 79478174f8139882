"""One config system for every recipe: a frozen dataclass, filled from a preset or a YAML file, then flags.

Precedence, lowest first: the dataclass defaults, ``--config=PRESET|file.yaml`` (a preset name of the
recipe, or a YAML/JSON mapping of fields: a run's ``config.json`` works, JSON being YAML), then
``--field=value`` (or ``--field value``; ``--field-name`` spells ``--field_name`` too; a bare boolean
flag means true) flags. Unknown fields are rejected wherever they appear,
and so is a flag given twice. Values are typed by the dataclass annotations: flags are read as YAML
scalars (``true``, ``1e-3``, ``none``/``null`` for optional fields), sequences also as ``a,b,c``,
mappings as JSON/YAML (``'{"dropout": 0.0}'``). ``--help`` lists every field with its type and default.

The parser is :mod:`argparse` (``allow_abbrev=False``, so ``--epoch`` is not ``--epochs``); errors are
:class:`~vec2face_model.errors.InvalidInputError` (a ``ValueError``) naming the field and the source.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from vec2face_model.errors import InvalidInputError
from vec2face_model.files import write_json_atomic

__all__ = ["check_field_types", "config_parser", "config_to_dict", "load_config_file", "parse_config", "parse_or_exit",
           "save_config"]

Config = TypeVar("Config")


@functools.cache
def field_types(config_cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (``from __future__ import annotations`` makes them strings)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _optional_inner(hint: Any) -> tuple[bool, Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return type(None) in typing.get_args(hint), inner[0]
    return False, hint


def coerce(name: str, hint: Any, raw: Any) -> Any:
    """A YAML/JSON value (or a flag's text) as the field's annotated type, or InvalidInputError."""
    optional, hint = _optional_inner(hint)
    if optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null"))):
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return raw
    if hint is str:
        if not isinstance(raw, str):
            raise InvalidInputError(f"--{name}: expected a string, got {raw!r}")
        return raw
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return raw.strip().lower() in ("true", "yes", "1")
        raise InvalidInputError(f"--{name}: expected true or false, got {raw!r}")
    if hint in (int, float):
        try:  # Python's own literals: YAML 1.1 would read "1e-3" as a string
            value = hint(raw.strip()) if isinstance(raw, str) else raw
        except ValueError:
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and isinstance(value, float)):
            raise InvalidInputError(f"--{name}: expected {'an int' if hint is int else 'a number'}, got {raw!r}")
        return hint(value)
    if origin is tuple:
        items = raw
        if isinstance(raw, str):
            text = raw.strip()
            items = _yaml(text) if text.startswith("[") else [t.strip() for t in text.split(",") if t.strip()]
        if not isinstance(items, (list, tuple)):
            raise InvalidInputError(f"--{name}: expected a comma-separated list, got {raw!r}")
        item_types = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(items):
            raise InvalidInputError(f"--{name}: expected {len(item_types)} values, got {raw!r}")
        return tuple(coerce(name, t, v) for t, v in zip(item_types, items))
    if origin is dict:
        value = _yaml(raw) if isinstance(raw, str) else raw
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise InvalidInputError(f"--{name}: expected a mapping such as '{{\"dropout\": 0.0}}', got {raw!r}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {hint} of field {name}")


def _yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidInputError(f"not valid YAML/JSON: {text!r} ({err})") from None


def _is_instance(value: Any, hint: Any) -> bool:
    optional, inner = _optional_inner(hint)
    if value is None:
        return optional
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if inner is Any:
        return True
    if inner in (int, float) and isinstance(value, bool):
        return False
    if inner is float:
        return isinstance(value, (int, float))
    if origin is tuple:
        types_ = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return isinstance(value, tuple) and len(types_) == len(value) and all(map(_is_instance, value, types_))
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, inner)


def check_field_types(config) -> None:
    """TypeError naming the first field whose value does not match its annotation (call in ``__post_init__``)."""
    for name, hint in field_types(type(config)).items():
        if not _is_instance(getattr(config, name), hint):
            raise TypeError(f"{name} must be {hint}, got {getattr(config, name)!r}")


def _check_keys(config_cls: type, keys, source: str) -> None:
    valid = list(field_types(config_cls))
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise InvalidInputError(f"{source}: unknown config field(s) {unknown}; valid fields: {', '.join(valid)}")


def load_config_file(config_cls: type, path: str | Path) -> dict[str, Any]:
    """The typed field values of a YAML/JSON mapping (not yet a config: defaults and flags come around it)."""
    loaded = _yaml(Path(path).read_text())
    if not isinstance(loaded, dict):
        raise InvalidInputError(f"{path}: expected a YAML/JSON mapping of config fields, got {type(loaded).__name__}")
    _check_keys(config_cls, loaded, str(path))
    return {k: coerce(k, field_types(config_cls)[k], v) for k, v in loaded.items()}


class _ConfigArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit: callers of parse_config get an exception instead
        raise InvalidInputError(f"{message} (see --help)")


class _StoreOnce(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if hasattr(namespace, self.dest):
            raise InvalidInputError(f"{option_string} given twice")
        setattr(namespace, self.dest, values)


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return "none" if value is None else json.dumps(list(value) if isinstance(value, tuple) else value)


@functools.cache
def field_comments(config_cls: type) -> dict[str, str]:
    """The ``# comment`` after each field in the class source: the per-field text of ``--help``."""
    import inspect
    import re

    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):  # no source (e.g. frozen application): help shows type and default only
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE))


def config_parser(config_cls: type, presets: Mapping[str, Mapping[str, Any]], *, prog: str, description: str = "") -> argparse.ArgumentParser:
    """``--config`` plus one ``--<field>`` per dataclass field, each documented with its type and default."""
    parser = _ConfigArgumentParser(prog=prog, description=description, allow_abbrev=False, argument_default=argparse.SUPPRESS,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=f"presets: {', '.join(presets)}")
    parser.add_argument("--config", action=_StoreOnce, metavar="PRESET|FILE",
                        help=f"a preset ({', '.join(presets)}) or a YAML/JSON file of fields; flags override it")
    hints, comments = field_types(config_cls), field_comments(config_cls)
    for field in dataclasses.fields(config_cls):
        hint = hints[field.name]
        kind = getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint).replace("typing.", "")
        spellings = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
        is_bool = _optional_inner(hint)[1] is bool
        parser.add_argument(*spellings, dest=field.name, action=_StoreOnce, metavar="VALUE",
                            # a bare boolean flag means true: --gradient_checkpointing
                            **({"nargs": "?", "const": "true"} if is_bool else {}),
                            help=" ".join([comments.get(field.name, ""), f"[{kind}, default: {_default_text(field)}]"]).strip())
    return parser


def parse_config(config_cls: type[Config], argv: Sequence[str], presets: Mapping[str, Mapping[str, Any]] | None = None,
                 *, prog: str = "recipe") -> Config:
    """``[--config=PRESET|FILE] [--field=value ...]`` -> a validated ``config_cls``."""
    presets = presets or {}
    namespace, rest = config_parser(config_cls, presets, prog=prog).parse_known_args(list(argv))
    if rest:
        if not rest[0].startswith("--"):
            raise InvalidInputError(f"arguments are --field=value flags, got {rest[0]!r} (see --help)")
        _check_keys(config_cls, [arg[2:].split("=", 1)[0] for arg in rest if arg.startswith("--")], "command line")
    flags = vars(namespace)
    source = flags.pop("config", None)
    values: dict[str, Any] = {}
    if source is not None:
        if source in presets:
            _check_keys(config_cls, presets[source], f"preset {source!r}")
            values = {k: coerce(k, field_types(config_cls)[k], v) for k, v in presets[source].items()}
        elif Path(source).is_file():
            values = load_config_file(config_cls, source)
        else:
            raise InvalidInputError(f"--config={source}: neither a preset ({', '.join(presets)}) nor a YAML/JSON file")
    values.update({k: coerce(k, field_types(config_cls)[k], v) for k, v in flags.items()})
    try:
        return config_cls(**values)
    except TypeError as err:
        raise InvalidInputError(str(err)) from None


def parse_or_exit(config_cls: type[Config], argv: Sequence[str] | None, presets: Mapping[str, Mapping[str, Any]],
                  *, prog: str, description: str) -> Config:
    """The command-line form: ``--help`` prints every field and exits 0; a bad config prints one line and exits 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        config_parser(config_cls, presets, prog=prog, description=description).print_help()
        raise SystemExit(0)
    try:
        return parse_config(config_cls, argv, presets, prog=prog)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def config_to_dict(config) -> dict[str, Any]:
    """JSON-ready field values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_config(config, path: str | Path) -> None:
    """Write ``config`` as JSON (which :func:`load_config_file` reads back), replacing the file atomically."""
    write_json_atomic(path, config_to_dict(config))
