"""weightpipe.stages: the concrete weight-sync stages and the engines they load into.

The usual path is ``sync_weights(source, engine, version=v, stages=[Fetch(...),
Fp8Quantize(...)])``: byte-bounded buckets, SGLang-compatible FP8, and a Load stage that
drives any ``Engine`` (the embedded ``LocalEngine``, or SGLang over HTTP, in-process or
through a distributed update group). Heavy optional imports (transformers, sglang) happen
only when the engine that needs them is constructed.
"""

from .bucket import WeightBucket
from .distributed import DistributedReceiver, DistributedSender, TransportError, distributed_source
from .engines import Engine, EngineError, PauseMode, SyncMode
from .engines.local import GenerationOutput, GenerationStats, GenerationWindow, LocalEngine
from .engines.sglang_distributed import SGLangDistributedEngine
from .engines.sglang_engine import SGLangEngine
from .engines.sglang_http import SGLangHTTPEngine
from .fetch import Fetch, FetchStats
from .fp8 import (
    Fp8CheckError,
    Fp8Tensor,
    NonFiniteWeightError,
    check_fp8,
    dequantize_fp8,
    quantize_fp8,
)
from .load import Load, LoadReport
from .quantize import Fp8Quantize, Fp8Selection, select_for_fp8
from .sources import FileSpan, named_tensors, safetensors_source
from .sync import SyncReport, sync_weights

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
    "GenerationOutput",
    "GenerationStats",
    "GenerationWindow",
    "Load",
    "LoadReport",
    "LocalEngine",
    "NonFiniteWeightError",
    "PauseMode",
    "SGLangDistributedEngine",
    "SGLangEngine",
    "SGLangHTTPEngine",
    "SyncMode",
    "SyncReport",
    "TransportError",
    "WeightBucket",
    "check_fp8",
    "dequantize_fp8",
    "distributed_source",
    "named_tensors",
    "quantize_fp8",
    "safetensors_source",
    "select_for_fp8",
    "sync_weights",
]
