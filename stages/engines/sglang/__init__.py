"""SGLang adapters: the HTTP server, the in-process ``sglang.Engine``, and the distributed
update group, plus the wire format all three share (``wire``).

Nothing here imports sglang at import time: the in-process adapter imports it when it is
constructed, and the wire format's decoders are only needed by tests.
"""

from weightpipe.stages.engines.sglang.distributed import SGLangDistributedEngine
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.engines.sglang.inprocess import SGLangEngine

__all__ = ["SGLangDistributedEngine", "SGLangEngine", "SGLangHTTPEngine"]
