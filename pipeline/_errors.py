"""The root of every error weightpipe raises on purpose.

``WeightpipeError`` lives in the framework so that both packages share one base: the
runner's ``StageError`` and the config loader's ``ConfigError`` derive from it here, and
every error the application package ``weightpipe.stages`` raises derives from it there.
A caller that wants "anything weightpipe refused" catches this one class.
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["WeightpipeError", "leaf_exceptions"]


class WeightpipeError(Exception):
    """Base class of every error weightpipe raises on purpose."""


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """Every non-group exception inside ``exc``, depth first (``[exc]`` for a plain one).

    anyio wraps whatever a task group's children raised in a ``BaseExceptionGroup``; this
    is the one place that unwraps such groups (the runner and the application use it).
    """
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for inner in exc.exceptions:
            leaves.extend(leaf_exceptions(inner))
        return leaves
    return [exc]
