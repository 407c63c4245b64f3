"""Engines the Load stage drives: SGLang (HTTP, in-process, distributed) and ``local``.

None of these imports sglang or transformers: each engine imports what it needs when it is
constructed.
"""

from .base import Engine, EngineError, PauseMode, SyncMode
from .local import LocalEngine
from .sglang_distributed import SGLangDistributedEngine
from .sglang_engine import SGLangEngine
from .sglang_http import SGLangHTTPEngine

__all__ = [
    "Engine",
    "EngineError",
    "LocalEngine",
    "PauseMode",
    "SGLangDistributedEngine",
    "SGLangEngine",
    "SGLangHTTPEngine",
    "SyncMode",
]
