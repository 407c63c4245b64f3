"""A generic configuration loader: a dataclass schema, YAML files and dotlist overrides.

The caller owns the schema (a tree of dataclasses, ``typing.Literal`` fields for sets of
choices); this module knows none of its keys. The OmegaConf tree is created complete from
the schema and locked in struct mode before anything is merged, so no key can be written
before it exists. A file and then ``key=value`` overrides merge on top, and the result is
built into the schema's own dataclasses (their ``__post_init__`` checks ranges and raises
``ConfigError`` itself). Every failure is one ``ConfigError``: an unknown key, a wrong type
or a value outside its choices names the dotted key, lists what is valid there and
suggests the closest valid spelling; a file that is missing, a directory or not YAML names
the file (and the line). This is the only module of ``weightpipe.pipeline`` that imports
omegaconf or yaml; nothing past the loader sees an OmegaConf object.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from weightpipe.pipeline._errors import WeightpipeError

__all__ = ["ConfigError", "load_config", "to_yaml"]

T = TypeVar("T")


class ConfigError(WeightpipeError, ValueError):
    """A configuration key or file is unusable.

    Attributes:
        key: the dotted key at fault (``"section.field"``), or ``None`` when the file
            itself is (missing, a directory, not YAML, not a mapping).
        valid: the keys (or values) that would have been accepted there.
        suggestion: the valid one closest to what was written, if any is close.
        path: the file at fault, for a file error.
        line: the 1-based line of a YAML syntax error.
    """

    def __init__(
        self,
        key: str | None,
        problem: str,
        valid: Sequence[str] = (),
        *,
        suggestion: str | None = None,
        path: str | None = None,
        line: int | None = None,
    ) -> None:
        if key is None:
            where = f"config file {path!r}" + (f", line {line}" if line is not None else "")
        else:
            where = f"config key {key!r}"
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        listed = f"; valid: {', '.join(valid)}" if valid else ""
        super().__init__(f"{where}: {problem}{hint}{listed}")
        self.key = key
        self.valid = tuple(valid)
        self.suggestion = suggestion
        self.path = path
        self.line = line


def load_config(
    schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """Build ``schema``: its defaults, then a YAML file, then ``key=value`` overrides.

    Overrides use OmegaConf's dotlist grammar (``depth=4 section.pair=[1,2]``) and apply in
    order, each over the previous ones.

    Raises:
        ConfigError: an unknown key, a wrong type, a value outside its choices, a
            malformed override, or a check of the schema's own ``__post_init__``; a file
            that is missing, a directory, unreadable, not YAML or not a mapping.
        TypeError: ``schema`` is not a dataclass type.
    """
    tree = _schema_tree(schema)
    if path is not None:
        loaded = _read_yaml(Path(path))
        tree = _merge(schema, tree, loaded, f"in {str(path)!r}")
    for override in overrides:
        key, _, _ = override.partition("=")
        key = key.strip()
        if "=" not in override or not key:
            raise ConfigError(override, "an override must look like key=value")
        if OmegaConf.select(tree, key, default=_ABSENT) is _ABSENT:
            raise _unknown_key(tree, key, f"from override {override!r}")
        try:
            dotlist = OmegaConf.from_dotlist([override])
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise ConfigError(
                key, f"cannot parse override {override!r}: {_first_line(str(exc))}"
            ) from None
        tree = _merge(schema, tree, dotlist, f"from override {override!r}", key=key)
    try:
        built = OmegaConf.to_object(tree)
    except ValidationError as exc:
        key = _field_key(str(exc.full_key or exc.key or "")) or schema.__name__
        raise ConfigError(key, f"wrong type: {_first_line(exc.msg)}") from None
    if not isinstance(built, schema):  # pragma: no cover - OmegaConf builds the schema
        raise TypeError(f"OmegaConf built {type(built).__name__}, not {schema.__name__}")
    return built


def to_yaml(config: object) -> str:
    """A built configuration (a dataclass instance) as YAML, loadable by ``load_config``.

    Raises:
        TypeError: ``config`` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"to_yaml takes a dataclass instance, got {type(config).__name__}")
    return OmegaConf.to_yaml(OmegaConf.structured(config))


_ABSENT = object()


def _schema_tree(schema: type[Any]) -> DictConfig:
    """The complete tree of ``schema``'s defaults, in struct mode before any merge."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"a config schema must be a dataclass type, got {schema!r}")
    tree = OmegaConf.structured(schema)
    if not isinstance(tree, DictConfig):  # pragma: no cover - a dataclass is a mapping
        raise TypeError(f"schema {schema.__name__} did not become a mapping")
    OmegaConf.set_struct(tree, True)
    return tree


def _read_yaml(path: Path) -> DictConfig:
    where = str(path)
    if path.is_dir():
        raise ConfigError(None, "is a directory, not a YAML file", path=where)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(None, "no such file", path=where) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(None, f"cannot be read: {reason}", path=where) from None
    try:
        loaded = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(None, f"not valid YAML: {problem}", path=where, line=line) from None
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(None, f"not valid YAML: {_first_line(str(exc))}", path=where) from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(None, "must hold a mapping at the top level", path=where)
    return loaded


def _merge(
    schema: type[Any], tree: DictConfig, other: DictConfig, origin: str, *, key: str = ""
) -> DictConfig:
    try:
        merged = OmegaConf.merge(tree, other)
    except (ConfigAttributeError, ConfigKeyError) as exc:
        raise _unknown_key(tree, str(exc.full_key or exc.key or key), origin) from None
    except ValidationError as exc:
        at = _field_key(str(exc.full_key or "")) or key or _failing_key(tree, other)
        raise _wrong_value(schema, tree, at, OmegaConf.select(other, at), exc, origin) from None
    if not isinstance(merged, DictConfig):  # pragma: no cover - merging mappings
        raise TypeError("merging two mappings did not give a mapping")
    return merged


def _unknown_key(tree: DictConfig, key: str, origin: str) -> ConfigError:
    valid = _keys_near(tree, key)
    return ConfigError(key, f"unknown key ({origin})", valid, suggestion=_closest(key, valid))


def _wrong_value(
    schema: type[Any],
    tree: DictConfig,
    key: str,
    given: object,
    exc: ValidationError,
    origin: str,
) -> ConfigError:
    expected = _field_type(schema, key)
    if get_origin(expected) is Literal:
        choices = [str(c) for c in get_args(expected)]
        return ConfigError(
            key,
            f"{_plain(given)!r} is not one of the choices ({origin})",
            choices,
            suggestion=_closest(str(_plain(given)), choices),
        )
    if isinstance(expected, type) and dataclasses.is_dataclass(expected):
        keys = _keys_near(tree, f"{key}.?")
        close = _closest(str(_plain(given)), [k.rsplit(".", 1)[-1] for k in keys])
        return ConfigError(
            key,
            f"is a section, not a value ({origin})",
            keys,
            suggestion=f"{key}.{close}" if close else None,
        )
    plain = _plain(given)
    if get_origin(expected) in (list, tuple) and not isinstance(plain, (list, tuple)):
        # OmegaConf's own words here ("AnyNode is not a ListConfig") name its internals.
        problem = (
            f"wrong type ({origin}): got {type(plain).__name__} {plain!r}; "
            f"expected {_type_name(expected)}"
        )
        return ConfigError(key, problem)
    problem = f"wrong type ({origin}): {_first_line(exc.msg)}; expected {_type_name(expected)}"
    if expected is bool:  # a misspelt ``true``/``false`` gets the spelling it missed
        return ConfigError(key, problem, suggestion=_closest(str(given).lower(), _BOOLS))
    return ConfigError(key, problem)


_BOOLS = ("true", "false")


def _failing_key(tree: DictConfig, other: DictConfig) -> str:
    """The first leaf of ``other`` that does not merge alone (errors without a key)."""
    for key, value in _leaves(other, ""):
        try:
            OmegaConf.merge(tree, _nested(key, value))
        except OmegaConfBaseException:
            return key
    return ""


def _leaves(node: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        out: list[tuple[str, Any]] = []
        for name in node:
            key = f"{prefix}.{name!s}" if prefix else str(name)
            out += (
                _leaves(node[name], key)
                if isinstance(node[name], DictConfig)
                else [(key, node[name])]
            )
        return out
    return [(prefix, node)]


def _nested(key: str, value: Any) -> dict[str, Any]:
    plain = _plain(value)
    for part in reversed(key.split(".")):
        plain = {part: plain}
    if not isinstance(plain, dict):  # pragma: no cover - key is never empty here
        raise TypeError(key)
    return plain


def _keys_near(tree: DictConfig, key: str) -> list[str]:
    """The keys at the deepest existing section above dotted ``key``."""
    parts = key.split(".")[:-1]
    while parts:
        node = OmegaConf.select(tree, ".".join(parts), default=None)
        if isinstance(node, DictConfig):
            break
        parts.pop()
    parent = ".".join(parts)
    node = OmegaConf.select(tree, parent) if parent else tree
    return [f"{parent}.{k!s}" if parent else str(k) for k in node]


def _field_type(schema: type[Any], key: str) -> Any:
    """The annotation of dotted ``key`` in ``schema`` (``None`` if no field has it)."""
    current: Any = schema
    for part in key.split(".") if key else ():
        if not (isinstance(current, type) and dataclasses.is_dataclass(current)):
            return None
        hints = get_type_hints(current)
        if part not in hints:
            return None
        current = _without_none(hints[part])
    return current


def _without_none(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _type_name(tp: Any) -> str:
    if tp is None:
        return "the schema's type"
    if isinstance(tp, type) and get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def _field_key(key: str) -> str:
    """``section.pair[0]`` -> ``section.pair``: errors name the field, not an element."""
    return re.sub(r"\[\d+\]", "", key)


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value)
    return value


def _closest(word: str, valid: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    return matches[0] if matches and matches[0] != word else None


def _first_line(text: str | None) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else "invalid value"
