"""The generic loader: any dataclass schema, a struct-mode tree complete before any merge,
YAML + dotlist, and one ConfigError that names the key (or the file and line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from weightpipe.pipeline import WeightpipeError
from weightpipe.pipeline.config import ConfigError, _schema_tree, load_config, to_yaml

Color = Literal["red", "green", "blue"]


@dataclass
class Inner:
    color: Color = "red"
    pair: list[int] = field(default_factory=lambda: [1, 2])
    enabled: bool = True
    label: str | None = None

    def __post_init__(self) -> None:
        if len(self.pair) != 2:
            raise ConfigError("inner.pair", f"must be two ints, got {self.pair}")


@dataclass
class Schema:
    count: int = 2
    ratio: float = 0.5
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError("count", f"must be >= 1, got {self.count}")


def test_defaults_build_the_schema() -> None:
    config = load_config(Schema)
    assert config == Schema()
    assert type(config.inner) is Inner


def test_the_tree_is_complete_and_in_struct_mode_before_any_merge() -> None:
    tree = _schema_tree(Schema)
    assert OmegaConf.is_struct(tree)
    assert OmegaConf.select(tree, "inner.pair") == [1, 2]
    with pytest.raises(ConfigAttributeError):
        tree.inner.undeclared = 1


def test_file_then_overrides_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("count: 3\ninner:\n  color: green\n")
    config = load_config(Schema, path, ["count=5", "inner.pair=[7,8]", "inner.label=x", "count=6"])
    assert (config.count, config.inner.color, config.inner.pair) == (6, "green", [7, 8])
    assert config.inner.label == "x"


def test_config_error_is_a_weightpipe_error_and_a_value_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Schema, overrides=["cuont=1"])
    assert isinstance(info.value, WeightpipeError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("override", "key", "suggestion", "valid"),
    [
        ("cuont=1", "cuont", "count", ("count", "ratio", "inner")),
        ("inner.colr=red", "inner.colr", "inner.color", ("inner.color", "inner.pair")),
        ("nosuch.deep.key=1", "nosuch.deep.key", None, ("count", "ratio", "inner")),
        ("inner.nosuch.key=1", "inner.nosuch.key", None, ("inner.color",)),
        ("inner.color=gren", "inner.color", "green", ("red", "green", "blue")),
        ("inner.enabled=ture", "inner.enabled", "true", ()),
        ("inner=rde", "inner", None, ("inner.color", "inner.pair")),
        ("inner=colr", "inner", "inner.color", ("inner.color", "inner.pair")),
    ],
)
def test_unknown_keys_and_bad_values_name_the_key_and_suggest(
    override: str, key: str, suggestion: str | None, valid: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Schema, overrides=[override])
    error = info.value
    assert error.key == key
    assert error.suggestion == suggestion
    assert set(valid) <= set(error.valid)
    assert f"config key {key!r}" in str(error)
    if suggestion:
        assert f"did you mean {suggestion!r}?" in str(error)


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("count=abc", "count", "expected int"),
        ("count=1.5", "count", "wrong type"),
        ("inner.pair=[a,b]", "inner.pair", "expected list[int]"),
        ("count=0", "count", ">= 1"),
        ("inner.pair=[1]", "inner.pair", "two ints"),
        ("count", "count", "key=value"),
        ("=3", "=3", "key=value"),
        ("inner.pair=[1,2", "inner.pair", "cannot parse"),
    ],
)
def test_every_override_error_names_the_key(override: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Schema, overrides=[override])
    assert info.value.key == key
    assert fragment in str(info.value)


def test_unknown_key_in_a_file_names_file_key_and_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  color: blue\n  colour: red\n")
    with pytest.raises(ConfigError) as info:
        load_config(Schema, path)
    assert info.value.key == "inner.colour"
    assert info.value.suggestion == "inner.color"
    assert str(path) in str(info.value)
    assert "inner.pair" in info.value.valid


def test_wrong_type_in_a_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  color: purple\n")
    with pytest.raises(ConfigError) as info:
        load_config(Schema, path)
    assert info.value.key == "inner.color"
    assert info.value.valid == ("red", "green", "blue")


def test_a_scalar_for_a_section_in_a_file_names_the_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("count: 3\ninner: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(Schema, path)
    assert info.value.key == "inner"


def test_yaml_syntax_error_names_file_and_line_not_a_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("count: 3\ninner:\n  pair: [1, 2\n  color: red\n")
    with pytest.raises(ConfigError) as info:
        load_config(Schema, path)
    error = info.value
    assert error.key is None
    assert error.path == str(path)
    assert error.line == 4
    assert str(error).startswith(f"config file {str(path)!r}, line 4: not valid YAML")
    assert "config key" not in str(error)


def test_non_mapping_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping") as info:
        load_config(Schema, path)
    assert info.value.key is None


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("\n")
    assert load_config(Schema, path) == Schema()


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_missing_file_or_directory_is_a_config_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "none.yaml" if kind == "missing" else tmp_path
    with pytest.raises(ConfigError) as info:
        load_config(Schema, path)
    assert info.value.key is None
    assert info.value.path == str(path)
    assert ("no such file" if kind == "missing" else "directory") in str(info.value)


def test_yaml_round_trip() -> None:
    config = load_config(Schema, overrides=["count=7", "inner.color=blue"])
    again = load_config(Schema, overrides=[])
    assert again != config
    tree = OmegaConf.merge(_schema_tree(Schema), OmegaConf.create(to_yaml(config)))
    assert OmegaConf.to_object(tree) == config


def test_a_schema_must_be_a_dataclass_type() -> None:
    with pytest.raises(TypeError):
        load_config(dict)
    with pytest.raises(TypeError):
        to_yaml(Schema)
