"""Options -> config: defaults < `--config FILE.yaml` < command-line flags, resolved once.

The flags of every subcommand are made from the config dataclasses (`--block-size` is
`DataConfig.block_size`, its help the field's docstring), so the CLI, YAML files and the Python
API share one schema; `save_config` writes the resolved config beside every output, and
`--config` reads it back.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mlmtune.config import CONFIG_FILENAME
from mlmtune.errors import MlmtuneError


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates every annotation: done once per class


def is_nested(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def flat_fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """Every leaf field of `cls` (nested dataclasses flattened) as name -> (type, default)."""
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if is_nested(tp):
            out.update(flat_fields(tp))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = (tp, default)
    return out


@functools.cache
def _field_docs(klass: type) -> dict[str, str]:
    """name -> the docstring under that field of `klass` (the attribute docstring convention)."""
    body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
    return {stmt.target.id: str(nxt.value.value) for stmt, nxt in zip(body, body[1:])
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}


def _classes(cls: type) -> list[type]:
    """`cls` and every config nested in it, at any depth (`TrainConfig.measure.downstream`), outermost first."""
    nested = [_hints(cls)[f.name] for f in dataclasses.fields(cls) if is_nested(_hints(cls)[f.name])]
    return [cls, *(k for tp in nested for k in _classes(tp))]


def field_doc(cls: type, name: str) -> str:
    """The docstring under a field of `cls` or of a config nested in it (at any depth), for --help."""
    for klass in _classes(cls):
        if name in _field_docs(klass):
            return _field_docs(klass)[name]
    return ""


def _base_type(tp: Any) -> Any:
    """`int | None` -> int; `list[str] | None` -> list[str]."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _optional(tp: Any) -> bool:
    union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    return union and type(None) in typing.get_args(tp)


def _example(tp: Any) -> str:
    return {bool: "true", int: "8", float: "0.1"}.get(_base_type(tp), "...")


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Turn a flag string or YAML value into the field's type, or raise MlmtuneError."""
    if value is None:
        if not _optional(tp):
            raise MlmtuneError(f"option {name!r} has no value; give one (e.g. `{name}: {_example(tp)}`) "
                               f"or remove the line")
        return None
    if _optional(tp) and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None  # `--time-budget none` undoes a default
    base = _base_type(tp)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            number = float(value)
            if not math.isfinite(number):
                raise MlmtuneError(f"--{name.replace('_', '-')} expects a finite number, got {value!r}")
            return number
        if isinstance(value, list):  # a YAML list where one text is expected: the comma-separated form of the flag
            return ",".join(str(v) for v in value)  # (`report_to: [tensorboard, mlflow]`, as the Trainer's YAML)
        return str(value)
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", str(base))
        raise MlmtuneError(f"--{name.replace('_', '-')} expects {kind}, got {value!r}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config into a flat dict (nested sections, `data:` or `optim:`, are flattened)."""
    p = Path(path)
    if not p.is_file():
        raise MlmtuneError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise MlmtuneError(f"config file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise MlmtuneError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise MlmtuneError(f"cannot read config file {p}: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise MlmtuneError(f"config file {p} must hold a mapping of option: value")

    return flatten(raw)


def flatten(values: dict[str, Any]) -> dict[str, Any]:
    """A config as a dict, flat: nested sections (`data:`, `optim:`) give their leaves, `-` in a name is `_`.

    A saved config (`to_dict`, grouped) and an older flat one read the same: `flatten(saved)["learning_rate"]`.
    """
    flat: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            flat.update(flatten(v))
        else:
            flat[str(k).replace("-", "_")] = v
    return flat


def resolve(cls: type, file_values: dict[str, Any] | None = None, flags: dict[str, Any] | None = None):
    """Build a config of type `cls` from defaults, then file values, then flags.

    Args:
        cls: one of the config dataclasses.
        file_values: flat name -> value from a config file (unknown names are an error).
        flags: flat name -> value given on the command line.

    Returns:
        A frozen, validated instance of `cls`.

    Example:
        >>> cfg = resolve(TrainConfig, {"learning_rate": 1e-4}, {"dataset": "corpus.txt", "epochs": "1"})
        >>> cfg.optim.learning_rate, cfg.schedule.epochs, cfg.data.dataset
        (0.0001, 1.0, 'corpus.txt')
    """
    leaves = flat_fields(cls)
    values: dict[str, Any] = {}
    for source in (file_values or {}, flags or {}):
        for name, value in source.items():
            if name not in leaves:
                known = ", ".join(sorted(leaves))
                raise MlmtuneError(f"unknown option {name!r}; known options: {known}")
            values[name] = coerce(name, leaves[name][0], value)
    return _build(cls, values)


def _build(cls: type, values: dict[str, Any]):
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if is_nested(tp):
            kwargs[f.name] = _build(tp, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested dicts, one per group (`flatten` makes it flat again)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, folder: str | Path, filename: str = CONFIG_FILENAME) -> Path:
    """Write the resolved config as YAML; `--config` reads it back."""
    path = Path(folder) / filename
    path.write_text(f"# resolved {type(cfg).__name__}; reuse with --config {filename}\n"
                    + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path

