"""Config: complete struct-mode schema, YAML + dotlist merge, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from weightpipe.pipeline.config import (
    ConfigError,
    WeightpipeConfig,
    _schema,
    load_config,
    to_yaml,
)


def test_defaults_are_complete_and_typed() -> None:
    config = load_config()
    assert isinstance(config, WeightpipeConfig)
    assert config.quantize.block == [128, 128]
    assert config.engine.kind == "local"
    assert config.metrics.addr == "127.0.0.1"


def test_schema_is_in_struct_mode_from_the_start() -> None:
    # The seed's failure: writing a key the schema did not declare.
    tree = _schema()
    with pytest.raises(ConfigAttributeError):
        tree.model.hf_config = {"x": 1}


def test_overrides_merge_with_types() -> None:
    config = load_config(overrides=["depth=4", "quantize.block=[64,128]", "engine.api_key=k"])
    assert config.depth == 4
    assert config.quantize.block == [64, 128]
    assert config.engine.api_key == "k"


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("depth: 3\nfetch:\n  bucket_bytes: 1024\n")
    config = load_config(path, ["depth=5"])
    assert (config.depth, config.fetch.bucket_bytes) == (5, 1024)


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["dpeth=3"], "dpeth", "valid: depth, fetch"),
        (["quantize.blok=[1,2]"], "quantize.blok", "quantize.block"),
        (["nosuch.section.key=1"], "nosuch.section.key", "unknown key"),
        (["depth=abc"], "depth", "expected int"),
        (["fetch.bucket_bytes=1.5"], "fetch.bucket_bytes", "wrong type"),
        (["quantize.method=fancy"], "quantize.method", "valid: block, channel, tensor"),
        (["engine.mode=sometimes"], "engine.mode", "pause, prefetch, in_flight"),
        (["quantize.block=[1]"], "quantize.block", "two positive integers"),
        (["depth=0"], "depth", ">= 1"),
        (["depth"], "depth", "key=value"),
        (["metrics.port=70000"], "metrics.port", "0..65535"),
        (["model.num_heads=3"], "model.hidden_size", "multiple"),
        (["quantize.block=[1,2"], "quantize.block", "cannot parse"),
    ],
)
def test_every_override_error_names_the_key(overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert info.value.key == key
    assert fragment in str(info.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("fetch:\n  bucket_bytes: 1024\n  bogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "fetch.bogus"
    assert str(path) in str(info.value)
    assert "fetch.bucket_bytes" in info.value.valid


def test_wrong_type_in_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("fetch:\n  bucket_bytes: lots\n")
    with pytest.raises(ConfigError, match=r"fetch\.bucket_bytes"):
        load_config(path)


def test_non_mapping_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.yaml")


def test_yaml_round_trip() -> None:
    config = load_config(overrides=["depth=7"])
    again = OmegaConf.to_object(OmegaConf.merge(_schema(), OmegaConf.create(to_yaml(config))))
    assert again == config
