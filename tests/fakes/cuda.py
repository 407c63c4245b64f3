"""Test fakes of CUDA streams and events, so a stage's stream/event bookkeeping runs on CPU.

``FakeCudaStream`` and ``FakeCudaEvent`` stand in for ``torch.cuda.Stream`` and
``torch.cuda.Event`` (monkeypatched in); they record what was waited on and recorded, and an
event is complete unless a test sets ``done = False`` (a copy still running), so a test can
check which stream an event was recorded on, and what waits for it, without a device.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FakeCudaEvent", "FakeCudaStream"]


class FakeCudaStream:
    """A fake of ``torch.cuda.Stream``: records the streams and events it was told to wait on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.waited: list[Any] = []

    def wait_stream(self, other: Any) -> None:
        self.waited.append(other)

    def wait_event(self, event: Any) -> None:
        self.waited.append(event)


class FakeCudaEvent:
    """A fake of ``torch.cuda.Event``: remembers the stream it was recorded on.

    ``query()`` answers ``done`` (True unless a test pretends the work is still running)
    and, like the real one, never blocks; ``synchronize()`` is the real host wait for the
    recorded work, so it counts the wait in ``host_waits`` and leaves the event complete.
    """

    def __init__(self) -> None:
        self.recorded_on: Any = None
        self.done = True
        self.host_waits = 0

    def record(self, stream: Any) -> None:
        self.recorded_on = stream

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.host_waits += 1
        self.done = True
