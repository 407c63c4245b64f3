"""weightpipe.stages: the concrete weight-sync stages and the engines they load into.

The usual path is ``sync_weights(source, engine, version=v, stages=[Fetch(...),
Fp8Quantize(...)])``: byte-bounded buckets, SGLang-compatible FP8, and a Load stage that
drives any ``Engine`` (the embedded ``LocalEngine``, or SGLang over HTTP, in-process or
through a distributed update group). Heavy optional imports (transformers, sglang) happen
only when the engine that needs them is constructed.
"""

from weightpipe.pipeline import StageError, WeightpipeError
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines import Engine, EngineError, PauseMode, SyncMode
from weightpipe.stages.engines.base import MeasuresGeneration
from weightpipe.stages.engines.local import (
    GenerationListener,
    GenerationOutput,
    GenerationStats,
    GenerationWindow,
    LocalEngine,
    random_weights,
)
from weightpipe.stages.engines.sglang.distributed import SGLangDistributedEngine
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.engines.sglang.inprocess import SGLangEngine
from weightpipe.stages.fetch import Fetch, FetchStats
from weightpipe.stages.fp8 import (
    Fp8CheckError,
    Fp8Tensor,
    NonFiniteWeightError,
    check_fp8,
    dequantize_fp8,
    quantize_fp8,
)
from weightpipe.stages.load import Load, LoadReport
from weightpipe.stages.metrics import WeightpipeMetrics, serve_metrics
from weightpipe.stages.quantize import Fp8Quantize, Fp8Selection, select_for_fp8
from weightpipe.stages.sources import (
    FileSpan,
    borrowed_tensors,
    named_tensors,
    safetensors_source,
)
from weightpipe.stages.sync import SyncAware, SyncReport, sync_weights
from weightpipe.stages.trace import SyncTrace
from weightpipe.stages.transport.distributed import (
    DistributedReceiver,
    DistributedSender,
    TransportError,
    distributed_source,
)

__all__ = [
    "DistributedReceiver",
    "DistributedSender",
    "Engine",
    "EngineError",
    "Fetch",
    "FetchStats",
    "FileSpan",
    "Fp8CheckError",
    "Fp8Quantize",
    "Fp8Selection",
    "Fp8Tensor",
    "GenerationListener",
    "GenerationOutput",
    "GenerationStats",
    "GenerationWindow",
    "Load",
    "LoadReport",
    "LocalEngine",
    "MeasuresGeneration",
    "NonFiniteWeightError",
    "PauseMode",
    "SGLangDistributedEngine",
    "SGLangEngine",
    "SGLangHTTPEngine",
    "StageError",
    "SyncAware",
    "SyncMode",
    "SyncReport",
    "SyncTrace",
    "TransportError",
    "WeightBucket",
    "WeightpipeError",
    "WeightpipeMetrics",
    "borrowed_tensors",
    "check_fp8",
    "dequantize_fp8",
    "distributed_source",
    "named_tensors",
    "quantize_fp8",
    "random_weights",
    "safetensors_source",
    "select_for_fp8",
    "serve_metrics",
    "sync_weights",
]
