"""weightpipe.pipeline: bounded-channel async pipelines for any workload of items.

The public face: ``Pipeline`` runs ``Stage``s joined by ``open_channel`` channels and
returns a ``RunReport``; ``as_async_iter`` accepts any source a producer has. The generic
config loader lives in ``weightpipe.pipeline.config`` and the Prometheus observer in
``weightpipe.pipeline.metrics`` (imported on demand, so the core needs neither omegaconf
nor prometheus_client loaded); ``weightpipe.pipeline.trace`` turns a run's spans
(``SpanObserver``) into a Chrome/Perfetto trace. Nothing here knows what the items are beyond their
optional ``nbytes``.
"""

from weightpipe.pipeline._channel import (
    CHECKPOINT_EVERY,
    ChannelReceiver,
    ChannelSender,
    ChannelStatistics,
    open_channel,
)
from weightpipe.pipeline._errors import WeightpipeError, leaf_exceptions
from weightpipe.pipeline._iter import aclose_iterator, as_async_iter
from weightpipe.pipeline._pipeline import (
    DEFAULT_CLOSE_TIMEOUT_S,
    Pipeline,
    PipelineObserver,
    RunReport,
    SpanObserver,
    StageError,
    StageReport,
)
from weightpipe.pipeline._stage import Stage, StageLike, describe_item, item_nbytes, stage_name

__all__ = [
    "CHECKPOINT_EVERY",
    "DEFAULT_CLOSE_TIMEOUT_S",
    "ChannelReceiver",
    "ChannelSender",
    "ChannelStatistics",
    "Pipeline",
    "PipelineObserver",
    "RunReport",
    "SpanObserver",
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
