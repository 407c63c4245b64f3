"""The Stage contract: one async method from an item to zero or more items.

A stage is deliberately small. It owns its resources (a CUDA stream, an HTTP session, an
engine handle) through optional ``open``/``close`` and its heavy work through a worker
thread of its own; everything around it (channels, worker tasks, ordering, statistics,
errors) belongs to the pipeline. ``process`` is written either as an async generator
(``yield`` each output: outputs stream downstream one by one) or as a coroutine that
returns an iterable of outputs (or ``None`` for none). ``flush`` runs once after the last
input, for stages that batch (Fetch's final partial bucket).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

__all__ = ["Stage", "StageLike", "describe_item", "item_nbytes", "stage_name"]

In = TypeVar("In")
Out = TypeVar("Out")
In_contra = TypeVar("In_contra", contravariant=True)
Out_co = TypeVar("Out_co", covariant=True)


@runtime_checkable
class StageLike(Protocol[In_contra, Out_co]):
    """What the pipeline needs of a stage: ``process``; the rest is optional.

    Optional attributes, looked up with defaults: ``name`` (str, the class name),
    ``workers`` (int >= 1, default 1: with k > 1 the pipeline runs k ``process`` calls
    concurrently and still emits outputs in input order), ``async open()``,
    ``async close()`` and ``flush()`` (same forms as ``process``, no argument).
    """

    def process(
        self, item: In_contra
    ) -> AsyncIterator[Out_co] | Awaitable[Iterable[Out_co] | None]: ...


class Stage(Generic[In, Out]):
    """Convenience base class with every optional part defaulted.

    Subclasses implement ``process``; ``open``/``close`` bracket the run (``close`` runs
    even when ``open`` of a later stage or the run itself failed, never when this stage's
    own ``open`` raised). ``workers`` > 1 allows concurrent ``process`` calls; the stage
    must then be safe to call concurrently.
    """

    name: ClassVar[str] = ""
    workers: int = 1

    async def open(self) -> None:
        """Acquire resources before the first item."""

    async def close(self) -> None:
        """Release resources; runs once, on success, failure and cancellation."""

    def process(self, item: In) -> AsyncIterator[Out] | Awaitable[Iterable[Out] | None]:
        raise NotImplementedError(f"{type(self).__qualname__}.process is not implemented")

    async def flush(self) -> AsyncIterator[Out]:
        """Emit whatever is held back after the last input (nothing by default)."""
        return
        yield


def stage_name(stage: object) -> str:
    """The stage's ``name`` attribute if set, else its class name in lower case."""
    name = getattr(stage, "name", "")
    return name if isinstance(name, str) and name else type(stage).__name__.lower()


def item_nbytes(item: object) -> int:
    """Bytes an item carries: its ``nbytes`` (tensors, buckets), summed over a tuple."""
    nbytes = _nbytes_of(item)
    if nbytes is not None:
        return nbytes
    if isinstance(item, tuple):
        return sum(_nbytes_of(part) or 0 for part in item)
    return 0


def _nbytes_of(obj: object) -> int | None:
    # Some objects raise instead of answering (a sparse tensor's .nbytes): count them as
    # 0 here so the stage that validates them gets to refuse them by name.
    try:
        nbytes = getattr(obj, "nbytes", None)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return nbytes if isinstance(nbytes, int) else None


def describe_item(item: Any, index: int | None = None) -> str:
    """A short human name for an item, used in errors.

    Items may define ``describe() -> str`` (weight buckets do). A ``(name, tensor)`` pair
    is named by its name. Anything else by a truncated repr.
    """
    describe = getattr(item, "describe", None)
    if callable(describe):
        try:
            text = str(describe())
        except Exception:  # a broken describe() must not hide the real error
            text = type(item).__name__
    elif isinstance(item, tuple) and item and isinstance(item[0], str):
        text = f"tensor {item[0]!r}"
    else:
        text = repr(item)
        if len(text) > 80:
            text = text[:77] + "..."
    return text if index is None else f"item {index} ({text})"
