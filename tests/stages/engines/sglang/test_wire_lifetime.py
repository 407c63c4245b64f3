"""A retried ``update_weights_from_tensor`` and the memory its CUDA-IPC handles point into.

``wire.BucketPayload`` owns the buffer its pickles point into and ``encode()`` writes fresh
pickles (on CUDA each takes its own IPC reference); ``SGLangClient`` keeps each bucket's
payload until the session ends (commit or abort) and encodes once per attempt.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError
from weightpipe.stages.engines.sglang import wire
from weightpipe.stages.engines.sglang.client import SGLangClient


class _FlakyTransport:
    """Follows ``SGLangTransport`` (HTTP-like: the client pickles); the first update
    attempt fails retryably after the server may have decoded it (a timed-out request)."""

    name = "flaky"
    serializes_named_tensors = True
    update_takes_weight_version = True

    def __init__(self) -> None:
        self.attempts: list[list[str]] = []
        self.buffers: list[weakref.ref[torch.Tensor]] = []

    def sessions_by_capability(self) -> bool | None:
        return False

    async def call(self, op: str, fields: dict[str, Any], *, tensors: Sequence[str] = ()) -> Any:
        if op != "update_weights_from_tensor":
            return {"success": True, "version": "0.5.23"}
        self.attempts.append(list(fields["serialized_named_tensors"]))
        if len(self.attempts) == 1:
            raise EngineError(self.name, "read timed out", retryable=True)
        return {"success": True}

    def tensor_fields(
        self,
        load_format: Any,
        payloads: list[bytes] | None,
        tensors: list[tuple[str, torch.Tensor]],
    ) -> dict[str, Any]:
        assert isinstance(payloads, wire.Payloads)
        self.buffers.extend(weakref.ref(t) for t in payloads.source.holds)
        return {"serialized_named_tensors": wire.b64encode_payloads(payloads)}


async def test_a_retry_sends_fresh_handles_into_a_buffer_still_alive() -> None:
    transport = _FlakyTransport()
    client = SGLangClient(transport, session="off", retries=2, backoff_s=0)  # type: ignore[arg-type]
    tensors = (("a.weight", torch.randn(3, 5)), ("b.weight", torch.randn(7).bfloat16()))
    await client.load(WeightBucket(tensors, 0, False, 1))  # not views: flattened afresh
    gc.collect()
    assert len(transport.attempts) == 2
    # The buffer the handles of both attempts point into is still alive ...
    assert transport.buffers and all(ref() is not None for ref in transport.buffers)
    # ... and the retry was pickled afresh (its own IPC references on CUDA; host memory
    # pickles to the same file_system handle) from that same buffer, flattened once.
    first, second = (transport.buffers[i::2] for i in range(2))
    assert len(first) == len(second) == 1 and first[0]() is second[0]()
    # The session's end lets the buffer go.
    await client.commit(1)
    gc.collect()
    assert all(ref() is None for ref in transport.buffers)
