"""The README's embedding example runs as written (against the local engine)."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


class CheckpointEngine:
    """Stands in for a checkpoint engine's receiving side: an async generator of weights."""

    def __init__(self, model: Any) -> None:
        self.weights = [(n, p.detach().clone()) for n, p in model.named_parameters()]

    async def receive_weights(self) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        for name, tensor in self.weights:
            yield name, tensor


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
        "my_checkpoint_engine": CheckpointEngine(model),
    }
    exec(compile(example, str(README), "exec"), namespace)
