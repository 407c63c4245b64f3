"""The Stage contract: one async method from an item to zero or more items.

A stage is deliberately small. It owns its resources (a device stream, a network
session, a handle on some service) as an async context manager, ``lifespan()``, or the
older pair ``open``/``close``; the pipeline enters them through one
``contextlib.AsyncExitStack``. Heavy work runs in a worker thread of its own; everything
around it (channels, worker tasks, ordering, statistics, errors) belongs to the pipeline.
``process`` is written either as an async generator (``yield`` each output) or as a
coroutine that returns an iterable of outputs (or ``None`` for none). ``flush`` runs once
after the last input, for stages that batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

__all__ = ["Stage", "StageLike", "describe_item", "item_nbytes", "stage_name"]

In = TypeVar("In")
Out = TypeVar("Out")
In_contra = TypeVar("In_contra", contravariant=True)
Out_co = TypeVar("Out_co", covariant=True)


@runtime_checkable
class StageLike(Protocol[In_contra, Out_co]):
    """What the pipeline needs of a stage: ``process``; the rest is optional.

    Optional attributes, looked up with defaults:

    * ``name`` (str; default: the class name in lower case). Two stages of one pipeline
      may share a name: the pipeline numbers the later ones ``name-2``, ``name-3``, ...
      in order, and reports, errors and metrics use those numbered names.
    * ``workers`` (int >= 1, default 1): with k > 1 the pipeline runs k ``process``
      calls concurrently and still emits outputs in input order.
    * ``lifespan()``: returns an async context manager that holds the stage's
      resources for one run. When present, ``open``/``close`` are not called.
    * ``async open()`` / ``async close()``: the same, as two methods.
    * ``flush()``: same forms as ``process``, no argument.
    * ``written_bytes`` (int): a monotonic count of the bytes the stage has written into
      buffers it fills (not the items it passes on); the run report shows each run's
      share (``StageReport.written_bytes``).
    """

    def process(
        self, item: In_contra
    ) -> AsyncIterator[Out_co] | Awaitable[Iterable[Out_co] | None]: ...


class Stage(Generic[In, Out]):
    """Convenience base class with every optional part defaulted.

    Subclasses implement ``process`` and may set ``name`` (per class, or per instance in
    ``__init__``, e.g. from a ``name=`` argument). Resources: either override
    ``lifespan()`` with an ``@asynccontextmanager`` that acquires them before its
    ``yield`` and releases them after (in a ``finally``), or override ``open``/``close``.
    The release half runs exactly when the acquire half succeeded, on success, failure
    and cancellation, shielded from cancellation and bounded by the pipeline's
    ``close_timeout_s``; it never runs when the stage's own acquire raised.
    ``workers`` > 1 allows concurrent ``process`` calls; the stage must then be safe to
    call concurrently.
    """

    name: str = ""
    workers: int = 1

    async def open(self) -> None:
        """Acquire resources before the first item (used when ``lifespan`` is not overridden)."""

    async def close(self) -> None:
        """Release what ``open`` acquired; runs once, on success, failure and cancellation."""

    def lifespan(self) -> AbstractAsyncContextManager[Any]:
        """The stage's resources for one run, as an async context manager.

        The default enters ``open()`` and exits ``close()``. Override it (typically with
        ``contextlib.asynccontextmanager``) to hold resources in one function.
        """
        return _OpenClose(self)

    def process(self, item: In) -> AsyncIterator[Out] | Awaitable[Iterable[Out] | None]:
        raise NotImplementedError(f"{type(self).__qualname__}.process is not implemented")

    async def flush(self) -> AsyncIterator[Out]:
        """Emit whatever is held back after the last input (nothing by default)."""
        return
        yield


class _OpenClose:
    """An async context manager over a stage's ``open``/``close`` methods (either may be absent)."""

    __slots__ = ("_stage",)

    def __init__(self, stage: object) -> None:
        self._stage = stage

    async def __aenter__(self) -> None:
        opener = getattr(self._stage, "open", None)
        if opener is not None:
            await opener()

    async def __aexit__(self, *exc_info: object) -> None:
        closer = getattr(self._stage, "close", None)
        if closer is not None:
            await closer()


def stage_lifespan(stage: object) -> AbstractAsyncContextManager[Any]:
    """The async context manager holding ``stage``'s resources for one run.

    ``stage.lifespan()`` when the stage has one, else its ``open``/``close`` pair.
    """
    lifespan = getattr(stage, "lifespan", None)
    if callable(lifespan):
        manager: AbstractAsyncContextManager[Any] = lifespan()
        return manager
    return _OpenClose(stage)


def stage_name(stage: object) -> str:
    """The stage's ``name`` attribute if set, else its class name in lower case."""
    name = getattr(stage, "name", "")
    return name if isinstance(name, str) and name else type(stage).__name__.lower()


def item_nbytes(item: object) -> int:
    """Bytes an item carries: its ``nbytes`` attribute, summed over a tuple's parts."""
    nbytes = _nbytes_of(item)
    if nbytes is not None:
        return nbytes
    if isinstance(item, tuple):
        return sum(_nbytes_of(part) or 0 for part in item)
    return 0


def _nbytes_of(obj: object) -> int | None:
    # Some objects raise instead of answering (a sparse array's .nbytes): count them as
    # 0 here so the stage that validates them gets to refuse them by name.
    try:
        nbytes = getattr(obj, "nbytes", None)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return nbytes if isinstance(nbytes, int) else None


def describe_item(item: Any, index: int | None = None) -> str:
    """A short human name for an item, used in errors.

    Items may define ``describe() -> str``. A ``(name, value)`` pair whose first part is
    a string is named by that string. Anything else by a truncated repr.
    """
    describe = getattr(item, "describe", None)
    if callable(describe):
        try:
            text = str(describe())
        except Exception:  # a broken describe() must not hide the real error
            text = type(item).__name__
    elif isinstance(item, tuple) and item and isinstance(item[0], str):
        text = repr(item[0])
    else:
        text = repr(item)
        if len(text) > 80:
            text = text[:77] + "..."
    return text if index is None else f"item {index} ({text})"
