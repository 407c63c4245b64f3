"""weightpipe in verl: the ``weightpipe`` checkpoint engine and the SGLang rollout updater.

Name this package in verl's config, ``actor_rollout_ref.rollout.checkpoint_engine.
custom_backend_module=weightpipe.stages.integrations.verl``, with ``backend=weightpipe``:
verl imports it on every worker and on the driver, which registers the backend
(``backend``) and points verl's SGLang rollout class at ``WeightpipeServerAdapter``
(``rollout``), whose full-weight updates run ``WeightpipeUpdater``. To use the transport
alone and keep verl's own rollout update, name ``weightpipe.stages.integrations.verl.
backend`` instead. See docs/verl.md.
"""

from __future__ import annotations

from weightpipe.stages.integrations.verl.backend import WeightpipeCheckpointEngine, sync_metrics
from weightpipe.stages.integrations.verl.updater import (
    OWNED_BACKENDS,
    WeightpipeUpdater,
    drain,
    lends_buffers,
    quantize_stage,
    updater_for_rollout,
)

__all__ = [
    "OWNED_BACKENDS",
    "ROLLOUT_CLASS",
    "WeightpipeCheckpointEngine",
    "WeightpipeUpdater",
    "drain",
    "lends_buffers",
    "quantize_stage",
    "sync_metrics",
    "updater_for_rollout",
    "use_weightpipe_rollout",
]

ROLLOUT_CLASS = "weightpipe.stages.integrations.verl.rollout.WeightpipeServerAdapter"
"""What verl's rollout registry names for ``("sglang", "async")`` once this is imported."""


def use_weightpipe_rollout() -> None:
    """Point verl's ``("sglang", "async")`` rollout class at ``WeightpipeServerAdapter``.

    verl resolves its rollout adapter by name through ``get_rollout_class`` (a table in
    ``verl.workers.rollout.base``) after importing ``custom_backend_module``, and offers
    no other hook; this replaces that one entry (idempotent). The class itself is imported
    only when verl resolves it, on the rollout workers.
    """
    from verl.workers.rollout import base

    base._ROLLOUT_REGISTRY[("sglang", "async")] = ROLLOUT_CLASS


use_weightpipe_rollout()
