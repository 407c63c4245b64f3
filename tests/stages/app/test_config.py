"""weightpipe's schema and factory: the owners' choices, no dead keys, every kind buildable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from weightpipe.pipeline.config import ConfigError, to_yaml
from weightpipe.stages.app.config import ENGINE_KINDS, WeightpipeConfig, load_weightpipe_config
from weightpipe.stages.app.factory import build_engine, build_fetch, build_quantize
from weightpipe.stages.dtypes import KEEP_DTYPES
from weightpipe.stages.engines.base import PAUSE_MODES, SYNC_MODES
from weightpipe.stages.fp8.spec import (
    FP8_ARITHMETICS,
    FP8_METHODS,
    NONFINITE_POLICIES,
    QUANTIZE_BACKENDS,
    SCALE_FORMATS,
)

README = Path(__file__).resolve().parents[3] / "README.md"


def test_defaults_are_complete_and_typed() -> None:
    config = load_weightpipe_config()
    assert isinstance(config, WeightpipeConfig)
    assert config.quantize.block == [128, 128]
    assert config.quantize.block_shape == (128, 128)
    assert config.engine.kind == "local"
    assert config.metrics.addr == "127.0.0.1"


@pytest.mark.parametrize(
    ("key", "choices"),
    [
        ("quantize.method", FP8_METHODS),
        ("quantize.scale_fmt", SCALE_FORMATS),
        ("quantize.arithmetic", FP8_ARITHMETICS),
        ("quantize.nonfinite", NONFINITE_POLICIES),
        ("quantize.backend", QUANTIZE_BACKENDS),
        ("quantize.keep_dtype", KEEP_DTYPES),
        ("model.dtype", KEEP_DTYPES),
        ("engine.mode", SYNC_MODES),
        ("engine.pause_mode", PAUSE_MODES),
        ("engine.kind", ENGINE_KINDS),
    ],
)
def test_choices_are_the_owners_choices(key: str, choices: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        load_weightpipe_config(overrides=[f"{key}=nonsense"])
    assert info.value.key == key
    assert info.value.valid == choices


def test_a_misspelt_choice_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'prefetch'\?") as info:
        load_weightpipe_config(overrides=["engine.mode=prefech"])
    assert info.value.suggestion == "prefetch"


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["dpeth=3"], "dpeth", "valid: depth, fetch"),
        (["quantize.blok=[1,2]"], "quantize.blok", "did you mean 'quantize.block'?"),
        (["quantize.block=[1]"], "quantize.block", "two positive ints"),
        (["quantize.block=[0,128]"], "quantize.block", "two positive ints"),
        (["depth=0"], "depth", ">= 1"),
        (["metrics.port=70000"], "metrics.port", "0..65535"),
        (["model.num_heads=3"], "model.hidden_size", "multiple"),
        (["fetch.align_bytes=100"], "fetch.align_bytes", "power of two"),
        (
            ["quantize.arithmetic=verl", "quantize.scale_fmt=ue8m0"],
            "quantize.arithmetic",
            "float32 scales only",
        ),
        (["sweep.depths=[]"], "sweep.depths", "non-empty"),
    ],
)
def test_schema_checks_name_the_key(overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_weightpipe_config(overrides=overrides)
    assert info.value.key == key
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "override",
    [
        "fetch.include_buffers=true",  # read by nothing: Fetch takes pairs, not modules
        "fetch.timeout_s=10",  # read by nothing: the transport is built in code
        "engine.kind=sglang_engine",  # needs an sglang.Engine the trainer owns
        "engine.kind=sglang_distributed",  # needs the trainer's process group
    ],
)
def test_keys_and_kinds_nothing_could_use_are_refused(override: str) -> None:
    with pytest.raises(ConfigError):
        load_weightpipe_config(overrides=[override])


@pytest.mark.parametrize("kind", ENGINE_KINDS)
def test_every_engine_kind_the_schema_accepts_is_built(kind: str) -> None:
    config = load_weightpipe_config(overrides=[f"engine.kind={kind}", "model.num_layers=1"])
    engine = build_engine(config.engine, config.model, block=config.quantize.block_shape)
    assert engine.name
    assert (kind == "local") == (type(engine).__name__ == "LocalEngine")


def test_factory_maps_fields_onto_typed_arguments() -> None:
    config = load_weightpipe_config(
        overrides=[
            "fetch.bucket_bytes=4096",
            "fetch.allow=[a.*]",
            "fetch.empty_source=empty",
            "quantize.block=[64,32]",
            "quantize.method=channel",
            "quantize.keep_dtype=float16",
            "quantize.workers=2",
        ]
    )
    fetch = build_fetch(config.fetch)
    assert (fetch.bucket_bytes, fetch.allow, fetch.empty_source) == (4096, ("a.*",), "empty")
    quantize = build_quantize(config.quantize)
    assert quantize.block == (64, 32)
    assert quantize.method == "channel"
    assert quantize.keep_dtype == torch.float16
    assert quantize.workers == 2


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = load_weightpipe_config(overrides=["depth=7", "engine.mode=pause"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(config))
    assert load_weightpipe_config(path) == config


def _table_keys(table: str) -> list[str]:
    """The keys the README's table names: ``a.b``, ``a.b` / `c`` (a.b and a.c), ``a.*``."""
    keys: list[str] = []
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", row.split("|")[1])
        section = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
        keys += [names[0], *(f"{section}.{n}" for n in names[1:])]
    return keys


def test_readme_table_names_only_schema_keys() -> None:
    text = README.read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    tree = load_weightpipe_config()
    keys = _table_keys(table)
    assert "fetch.bucket_bytes" in keys and "engine.api_key" in keys
    for key in keys:
        node: object = tree
        for part in key.removesuffix(".*").split("."):
            assert hasattr(node, part), f"README names {key!r}, which the schema lacks"
            node = getattr(node, part)
    assert "sglang_engine" not in table and "sglang_distributed" not in table
    assert "weightpipe.stages.app.config" in table


def test_files_the_config_modules_point_to_exist() -> None:
    repo = README.parent
    for module in (repo / "pipeline" / "config.py", repo / "stages" / "app" / "config.py"):
        for name in re.findall(r"[\w./-]+\.md\b", module.read_text()):
            assert (repo / name).exists() or (repo / "docs" / name).exists(), (module, name)
