"""weightpipe.stages: the concrete weight-sync stages and the engines they load into."""

from .bucket import WeightBucket
from .engines import Engine, EngineError, PauseMode, SyncMode

__all__ = ["Engine", "EngineError", "PauseMode", "SyncMode", "WeightBucket"]
