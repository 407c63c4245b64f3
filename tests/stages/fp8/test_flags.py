"""PendingFlags: NaN/Inf flags are read without a host wait, except at the last bucket.

The events are ``tests.fakes.cuda.FakeCudaEvent`` (query never blocks, synchronize is the
host wait); the host flags are plain CPU tensors, as the pinned copies read on the host.
"""

from __future__ import annotations

import threading

import pytest
import torch

from tests.fakes.cuda import FakeCudaEvent
from weightpipe.stages.fp8 import NonFiniteWeightError
from weightpipe.stages.fp8.flags import PendingFlags


def _pending_event() -> FakeCudaEvent:
    event = FakeCudaEvent()
    event.done = False
    return event


def test_a_bucket_in_flight_is_not_waited_for() -> None:
    flags = PendingFlags()
    first, second = _pending_event(), _pending_event()
    flags.add(first, torch.tensor([0, 0]), ("a", "b"), 0, last=False)
    flags.add(second, torch.tensor([0]), ("c",), 1, last=False)
    assert first.host_waits == second.host_waits == 0
    assert flags.pending == 2
    first.done = True  # the device finished bucket 0: read at the next bucket, no wait
    flags.add(_pending_event(), torch.tensor([0]), ("d",), 2, last=False)
    assert first.host_waits == 0 and flags.pending == 2


def test_a_bad_flag_fails_a_later_bucket_naming_the_tensor() -> None:
    flags = PendingFlags()
    bad = _pending_event()
    flags.add(bad, torch.tensor([0, 1]), ("a", "b"), 3, last=False)
    bad.done = True
    with pytest.raises(NonFiniteWeightError) as info:
        flags.add(_pending_event(), torch.tensor([0]), ("c",), 4, last=False)
    assert info.value.tensor == "b" and "bucket 3" in str(info.value)


def test_the_last_bucket_waits_for_every_pending_flag() -> None:
    flags = PendingFlags()
    early = _pending_event()
    flags.add(early, torch.tensor([1]), ("x",), 0, last=False)
    last = _pending_event()
    with pytest.raises(NonFiniteWeightError) as info:
        flags.add(last, torch.tensor([0]), ("y",), 1, last=True)
    assert info.value.tensor == "x"
    assert early.host_waits == 1


def test_a_bucket_added_after_the_last_one_waits_itself() -> None:
    # Two workers: the last bucket's call returned before an earlier bucket's worker
    # added its flags; that worker must read them before its bucket goes on.
    flags = PendingFlags()
    flags.add(_pending_event(), torch.tensor([0]), ("z",), 5, last=True)
    late = _pending_event()
    done = threading.Event()

    def worker() -> None:
        flags.add(late, torch.tensor([0]), ("w",), 4, last=False)
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=10)
    assert done.is_set() and late.host_waits == 1 and flags.pending == 0


def test_reset_forgets_a_failed_run() -> None:
    flags = PendingFlags()
    flags.add(_pending_event(), torch.tensor([1]), ("a",), 0, last=False)
    flags.reset()
    last = _pending_event()
    flags.add(last, torch.tensor([0]), ("b",), 0, last=True)
    assert last.host_waits == 1 and flags.pending == 0


def test_wait_all_reads_what_a_last_bucket_without_flags_left() -> None:
    flags = PendingFlags()
    early = _pending_event()
    flags.add(early, torch.tensor([0, 1]), ("a", "b"), 0, last=False)
    with pytest.raises(NonFiniteWeightError) as info:
        flags.wait_all()
    assert info.value.tensor == "b" and early.host_waits == 1
