"""Small, strict YAML-to-dataclass loading for the non-Lightning commands (rollout, evaluate).

YAML is read with `yaml.safe_load`; unknown keys and wrong types are one-line errors naming the file and field.
Command-line flags override file values; `FlagParser` makes a bad flag a one-line error too (argparse would print
its usage and exit).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import contextvars
import dataclasses
import inspect
import os
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, TypeVar

import yaml

from trialign.errors import TriAlignError

T = TypeVar("T")


class FlagParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors (unknown flag, a value of the wrong type, a missing value) raise a
    one-line `TriAlignError` instead of printing the usage and exiting; ``--help`` still prints and exits 0."""

    def error(self, message: str):  # type: ignore[override]
        raise TriAlignError(f"{message} (run `{self.prog} --help` for the options)")


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping; errors name the file (and line for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise TriAlignError(f"config file {path}: not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TriAlignError(f"config file {path}:{where} invalid YAML ({getattr(err, 'problem', err)})")
    except UnicodeDecodeError:
        raise TriAlignError(f"config file {path}: expected UTF-8 text")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TriAlignError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def config_chain(path: str | Path, _seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """A config file and the files it builds on, base first: ``[(file, its settings without 'base'), ...]``.

    A file may name another as ``base: <path>`` (relative to its own folder): its settings are then the base's,
    overridden by its own (later ``--config`` files override earlier ones, key by key). Method configs share the
    trainer, data, LoRA and optimizer blocks of `configs/method_base.yaml` this way, so a method's file says only how
    it differs. A missing base or a loop is a one-line error naming the file."""
    path = Path(path)
    data = read_yaml_mapping(path)
    if path.resolve() in _seen:
        raise TriAlignError(f"config file {path}: its 'base' chain loops back to it")
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str) or not base:
        raise TriAlignError(f"config file {path}: 'base' must be a path to another config file, got {base!r}")
    base_path = Path(os.path.normpath(path.parent / base))
    if not base_path.is_file():
        raise TriAlignError(f"config file {path}: base {base!r} not found (looked for {base_path})")
    return [*config_chain(base_path, (*_seen, path.resolve())), (path, data)]


def read_settings(path: str | Path) -> dict[str, Any]:
    """A settings file of `experiment`, `rollout` or `evaluate` with its ``base`` chain merged (`merge_chain`)."""
    return merge_chain(config_chain(path))


def merge_chain(chain: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """A `config_chain` merged at the top level: a key a file sets replaces its base's value whole (a ``methods:``
    mapping included), so a development experiment names only what it changes."""
    values: dict[str, Any] = {}
    for _, data in chain:
        values.update(data)
    return values


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, where)
            except TriAlignError as err:
                errors.append(str(err))
        raise TriAlignError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TriAlignError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TriAlignError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise TriAlignError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TriAlignError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TriAlignError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise TriAlignError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build_dataclass(cls: type[T], values: Mapping[str, Any], source: str) -> T:
    """Instantiate dataclass `cls` from `values`, rejecting unknown keys and mistyped values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise TriAlignError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    checked = {k: _check_type(v, hints[k], f"{source}: {k}") for k, v in values.items()}
    return cls(**checked)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value parsed as YAML (so numbers, booleans and lists keep their type)."""
    if "=" not in text:
        raise TriAlignError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (shown in ``--help``), one line each."""
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = " ".join(str(following.value.value).split()).replace("%", "%%")
    return docs


_FLAG_TYPES = {"int": int, "float": float, "int | None": int, "float | None": float}


def settings_parser(cls: type, prog: str, description: str, config_help: str,
                    set_only: tuple[str, ...] = ()) -> FlagParser:
    """A `FlagParser` with ``--config FILE``, one flag per field of dataclass `cls` (``--some-field``; booleans as
    ``--x/--no-x``, lists as several values; mappings and the fields in `set_only` only through ``--set``) and
    ``--set KEY=VALUE``."""
    parser = FlagParser(prog=prog, description=description)
    parser.add_argument("--config", help=config_help)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag, kind, doc = "--" + f.name.replace("_", "-"), str(f.type), docs.get(f.name, "")
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif kind.startswith(("list", "tuple")):
            parser.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="VALUE", help=doc)
        elif kind.startswith("dict") or f.name in set_only:
            continue  # a mapping: in YAML, or --set name='{key: value}'
        else:
            parser.add_argument(flag, dest=f.name, type=_FLAG_TYPES.get(kind, str), default=None, help=doc)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting, the value parsed as YAML (e.g. --set limit=8)")
    return parser


def collect_settings(args: argparse.Namespace, command: str) -> tuple[dict[str, Any], str]:
    """Settings from ``--config`` YAML (and its ``base`` files, `read_settings`), then flags, then ``--set``
    overrides; and the name of their source."""
    values: dict[str, Any] = read_settings(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "overrides") and v is not None})
    values.update(dict(parse_override(o) for o in args.overrides))
    return values, (f"config file {args.config}" if args.config else command)


# ------------------------------------------------------------------------------------------ instantiation by the CLI
_FROM_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("trialign_from_cli", default=False)


@contextlib.contextmanager
def instantiating_from_cli() -> Iterator[None]:
    """While `TriAlignCLI` builds the model and data classes from a parsed config (`from_cli` is True inside)."""
    token = _FROM_CLI.set(True)
    try:
        yield
    finally:
        _FROM_CLI.reset(token)


def from_cli() -> bool:
    """True while `TriAlignCLI` instantiates classes: LightningCLI then hands `save_hyperparameters` the parsed
    config (plain dicts with class_path/init_args) instead of the live objects."""
    return _FROM_CLI.get()
