"""The embedded ``local`` engine: a small Llama model that really generates and really loads.

``LocalEngine`` builds a random-init, seeded Llama-architecture model from a
``transformers.LlamaConfig`` (never a download), keeps a batch of requests decoding on a
background thread, and stages FP8 or bf16 buckets while it generates, switching a whole
sync's weights at once between two decode steps (no step runs on two versions, every
token carries its version), all behind the same ``Engine`` protocol as the SGLang
adapters; it is the default engine of the demo, the tests and the overlap benchmark. One
module per part:

- ``model``: the default config, building the seeded model, new random weights;
- ``scheduler``: the generation thread (batches, decode steps, pauses, work between steps);
- ``updates``: the update transaction (validate a bucket, dequantise and stage it,
  switch everything staged at commit, drop it on abort);
- ``window``: what generation tells a ``GenerationListener``, and ``GenerationWindow``,
  the listener that measures tokens/s and the longest gap between two tokens;
- ``engine``: ``LocalEngine``, the ``Engine`` (and ``MeasuresGeneration``) adapter.
"""

from __future__ import annotations

from weightpipe.stages.engines.local.engine import LocalEngine
from weightpipe.stages.engines.local.model import default_config, random_weights
from weightpipe.stages.engines.local.window import (
    GenerationListener,
    GenerationOutput,
    GenerationStats,
    GenerationWindow,
)

__all__ = [
    "GenerationListener",
    "GenerationOutput",
    "GenerationStats",
    "GenerationWindow",
    "LocalEngine",
    "default_config",
    "random_weights",
]
