"""Engines the Load stage drives: SGLang (HTTP, in-process, distributed) and ``local``.

None of these imports sglang or transformers: each engine imports what it needs when it is
constructed.
"""

from weightpipe.stages.engines.base import Engine, EngineError, PauseMode, SyncMode
from weightpipe.stages.engines.local import LocalEngine
from weightpipe.stages.engines.sglang.distributed import SGLangDistributedEngine
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.engines.sglang.inprocess import SGLangEngine

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
