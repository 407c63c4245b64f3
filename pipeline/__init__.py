"""weightpipe.pipeline: bounded-channel async pipelines, knowing nothing of FP8 or SGLang.

The public face: ``Pipeline`` runs ``Stage``s joined by ``open_channel`` channels and
returns a ``RunReport``; ``as_async_iter`` accepts any source a trainer has. Config lives
in ``weightpipe.pipeline.config`` and Prometheus metrics in ``weightpipe.pipeline.metrics``
(imported on demand, so the core needs neither omegaconf nor prometheus_client loaded).
"""

from weightpipe.pipeline._channel import (
    ChannelReceiver,
    ChannelSender,
    ChannelStatistics,
    open_channel,
)
from weightpipe.pipeline._errors import WeightpipeError, leaf_exceptions
from weightpipe.pipeline._iter import aclose_iterator, as_async_iter
from weightpipe.pipeline._pipeline import (
    Pipeline,
    PipelineObserver,
    RunReport,
    StageError,
    StageReport,
)
from weightpipe.pipeline._stage import Stage, StageLike, describe_item, item_nbytes, stage_name

__all__ = [
    "ChannelReceiver",
    "ChannelSender",
    "ChannelStatistics",
    "Pipeline",
    "PipelineObserver",
    "RunReport",
    "Stage",
    "StageError",
    "StageLike",
    "StageReport",
    "WeightpipeError",
    "aclose_iterator",
    "as_async_iter",
    "describe_item",
    "item_nbytes",
    "leaf_exceptions",
    "open_channel",
    "stage_name",
]
