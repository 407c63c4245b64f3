"""The README's embedding example runs as written (against the local engine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tests.fakes import FakeCheckpointEngine

README = Path(__file__).resolve().parents[1] / "README.md"


def test_embedding_example_runs() -> None:
    from transformers import LlamaForCausalLM

    from weightpipe.stages.engines.local import default_config

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 22
    torch.manual_seed(1)
    model = LlamaForCausalLM(default_config())
    namespace: dict[str, Any] = {
        "__name__": "readme_example",
        "my_model": model,
        "my_checkpoint_engine": FakeCheckpointEngine(model),
    }
    exec(compile(example, str(README), "exec"), namespace)
