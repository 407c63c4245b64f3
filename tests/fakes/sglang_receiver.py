"""Test fakes of SGLang's receiving side of a distributed weight update (not SGLang itself).

``DistributedReceiver`` is what the HTTP double and the fake in-process engine delegate the
distributed endpoints to; ``SubprocessReceiver`` is a fake of SGLang's receiving TP rank: a
spawned process that joins the update group and receives with SGLang's own code.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

__all__ = ["DistributedReceiver", "SubprocessReceiver"]


class DistributedReceiver(Protocol):
    """What the fakes delegate the distributed endpoints to (blocking calls; the HTTP double
    runs them in a worker thread of its loop)."""

    def init_group(self, body: dict[str, Any]) -> tuple[bool, str]: ...

    def receive(self, body: dict[str, Any]) -> tuple[bool, str, list[tuple[str, torch.Tensor]]]: ...

    def destroy_group(self, body: dict[str, Any]) -> tuple[bool, str]: ...


class SubprocessReceiver:
    """A fake of SGLang's receiving TP rank of a distributed update (not SGLang itself).

    A spawned process that joins the update group with SGLang's own
    ``init_custom_process_group`` and receives the way SGLang's weight updater does:
    ``FlattenedTensorBucket.empty`` from the announced names/dtypes/shapes and one
    broadcast into it for ``flattened_bucket``, else one broadcast per tensor. Plug it into
    ``SGLangHTTPDouble.receiver`` (or a fake Engine) to serve the distributed endpoints.

    Faults: ``die_at_receive(n)`` kills the rank in the middle of the n-th next receive
    (its broadcast posted, nothing received), as a crashed TP rank; that request and every
    later one until ``restart()`` is answered as failed. ``ready()`` returns once the
    process imported torch and sglang, so that a rendezvous after it needs no long timeout.
    With ``spares=n``, n more processes are started once the rank first answered
    ``ready()`` and kept in reserve: ``restart()`` (a supervisor's replacement rank) swaps
    one in, already importing or ready, instead of waiting for a fresh import.
    """

    def __init__(self, tp_rank: int = 0, *, spares: int = 0) -> None:
        if spares < 0:
            raise ValueError(f"spares must be >= 0, got {spares}")
        self._tp_rank = tp_rank
        self._lock = threading.Lock()
        self._die_in = 0
        self._rank = _Rank.start(tp_rank)
        self._spares_wanted = spares
        self._spares: list[_Rank] = []

    def _ask(self, command: str, body: dict[str, Any]) -> Any:
        with self._lock:
            if command == "recv" and self._die_in > 0:
                self._die_in -= 1
                if self._die_in == 0:
                    command = "recv_then_die"
            try:
                self._rank.conn.send((command, body))
                return self._rank.conn.recv()
            except (EOFError, OSError) as exc:
                failure = f"Failed to {command}: the receiving rank died ({type(exc).__name__})"
                return (False, failure, []) if command.startswith("recv") else (False, failure)

    def ready(self) -> None:
        """Block until the process answers (it imported torch and sglang)."""
        ok, message = self._ask("ping", {})
        if not ok:
            raise RuntimeError(f"the receiving rank is not running: {message}")
        while self._spares_wanted > 0:  # not before: they would slow the first import
            self._spares_wanted -= 1
            self._spares.append(_Rank.start(self._tp_rank))

    def die_at_receive(self, n: int = 1) -> None:
        """Kill the rank during the ``n``-th receive from now (1: the next one)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self._die_in = n

    def restart(self) -> None:
        """A new receiving rank in place of this one (after ``die_at_receive`` or not):
        it knows no group, as a restarted TP rank. A spare takes over where one is left;
        call ``ready()`` before the next group forms."""
        with self._lock:
            self._rank.close()
            self._die_in = 0
            self._rank = self._spares.pop(0) if self._spares else _Rank.start(self._tp_rank)

    def init_group(self, body: dict[str, Any]) -> tuple[bool, str]:
        ok, message = self._ask("init", body)
        return bool(ok), str(message)

    def receive(self, body: dict[str, Any]) -> tuple[bool, str, list[tuple[str, torch.Tensor]]]:
        ok, message, raw = self._ask("recv", body)
        tensors = [
            (
                name,
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                .view(getattr(torch, dtype))
                .reshape(shape),
            )
            for name, dtype, shape, data in raw
        ]
        return bool(ok), str(message), tensors

    def destroy_group(self, body: dict[str, Any]) -> tuple[bool, str]:
        ok, message = self._ask("destroy", body)
        return bool(ok), str(message)

    def close(self) -> None:
        """Stop the rank and the spares."""
        self._rank.close()
        for spare in self._spares:
            spare.close()
        self._spares = []


@dataclass
class _Rank:
    """One spawned receiving process and the pipe to it."""

    proc: Any
    conn: Any

    @classmethod
    def start(cls, tp_rank: int) -> _Rank:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(
            target=_receiver_main, args=(child, tp_rank), name="sglang-receiver", daemon=True
        )
        proc.start()
        child.close()
        return cls(proc, conn)

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("stop", {}))
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=30)
        self.conn.close()
        self.proc.close()


def _receiver_main(conn: Any, tp_rank: int) -> None:
    """The receiving rank's loop (runs in the spawned process)."""
    import os

    import torch.distributed as dist
    from sglang.srt.utils.common import init_custom_process_group

    groups: dict[str, Any] = {}
    while True:
        command, body = conn.recv()
        if command == "stop":
            break
        try:
            if command == "init":
                groups[body["group_name"]] = init_custom_process_group(
                    backend=body["backend"],
                    init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                    world_size=body["world_size"],
                    rank=body["rank_offset"] + tp_rank,
                    group_name=body["group_name"],
                )
                conn.send((True, "Succeeded to initialize custom process group."))
            elif command == "ping":
                conn.send((True, "ready"))
            elif command == "recv_then_die":
                group = groups[body["group_name"]]
                names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
                if body.get("load_format") == "flattened_bucket":
                    buffer = FlattenedTensorBucket.empty(names, dtypes, shapes, "cpu")
                    first = buffer.get_flattened_tensor()
                else:
                    first = torch.empty(shapes[0], dtype=getattr(torch, dtypes[0]))
                dist.broadcast(first, src=0, group=group, async_op=True)
                os._exit(1)  # killed mid-broadcast: no answer, no cleanup
            elif command == "recv":
                group = groups[body["group_name"]]
                names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
                if body.get("load_format") == "flattened_bucket":
                    bucket = FlattenedTensorBucket.empty(names, dtypes, shapes, "cpu")
                    dist.broadcast(bucket.get_flattened_tensor(), src=0, group=group)
                    received = bucket.reconstruct_tensors()
                else:
                    received = []
                    handles = []
                    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                        weight = torch.empty(shape, dtype=getattr(torch, dtype))
                        handles.append(dist.broadcast(weight, src=0, group=group, async_op=True))
                        received.append((name, weight))
                    for handle in handles:
                        handle.wait()
                raw = [
                    (
                        n,
                        str(t.dtype).removeprefix("torch."),
                        list(t.shape),
                        t.contiguous().view(torch.uint8).numpy().tobytes(),
                    )
                    for n, t in received
                ]
                conn.send((True, "Succeeded to update parameter online.", raw))
            elif command == "destroy":
                dist.destroy_process_group(groups.pop(body["group_name"]))
                conn.send((True, "Succeeded to destroy custom process group."))
        except Exception as exc:
            failure = f"Failed to {command}: {type(exc).__name__}: {exc}"
            conn.send((False, failure, []) if command == "recv" else (False, failure))
    for group in groups.values():
        dist.destroy_process_group(group)
