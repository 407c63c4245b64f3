"""verl's SGLang rollout adapter with its weight update replaced by weightpipe's.

``WeightpipeServerAdapter`` is verl's ``ServerAdapter`` (server discovery, memory
release/resume, LoRA and delta paths unchanged) whose full-weight ``update_weights`` runs
``WeightpipeUpdater`` into the same SGLang server over HTTP. Importing
``weightpipe.stages.integrations.verl`` points verl's rollout registry entry for
``("sglang", "async")`` at this class, since verl builds its rollout adapter through
``get_rollout_class`` with no other hook; this module needs verl's SGLang rollout, and so
an SGLang installation that can run a server.
"""

from __future__ import annotations

from typing import Any

import torch
from verl.workers.rollout.sglang_rollout.sglang_rollout import ServerAdapter

from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.integrations.verl.updater import (
    WeightpipeUpdater,
    drain,
    updater_for_rollout,
)

__all__ = ["WeightpipeServerAdapter"]


class WeightpipeServerAdapter(ServerAdapter):  # type: ignore[misc]
    """verl's SGLang ``ServerAdapter``, full-weight updates through weightpipe."""

    _weightpipe: WeightpipeUpdater | None = None

    def _weightpipe_updater(self) -> WeightpipeUpdater:
        if self._weightpipe is None:
            args = self._engine.server_args
            engine = SGLangHTTPEngine(
                f"http://{args.host}:{args.port}",
                api_key=getattr(args, "api_key", None),
                tp_size=int(getattr(args, "tp_size", 1) or 1),
            )
            device: str | torch.device = "cpu"
            if torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
            self._weightpipe = updater_for_rollout(
                self.config, self.model_config.hf_config, engine, device=device
            )
        return self._weightpipe

    async def update_weights(
        self,
        weights: Any,
        global_steps: int | None = None,
        wire_format: str = "named_tensors",
        **kwargs: Any,
    ) -> None:
        """Full weights through weightpipe; delta flushes and LoRA adapters through verl.

        Raises:
            StageError: the sync failed (see ``WeightpipeUpdater.update_weights``).
        """
        adapter_update = kwargs.get("peft_config") and kwargs.get("base_sync_done")
        if wire_format != "named_tensors" or adapter_update:
            await super().update_weights(
                weights, global_steps=global_steps, wire_format=wire_format, **kwargs
            )
            return
        await self._init_server_adapter()
        if self._engine is None or not self._is_server_tp_leader():
            await drain(weights)  # the TP leader posts every rank's payload
            return
        await self._weightpipe_updater().update_weights(weights, global_steps=global_steps)
        if global_steps is not None:
            await self.server_actor.set_global_steps.remote(global_steps)
