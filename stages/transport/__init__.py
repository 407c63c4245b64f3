"""Moving buckets between processes with torch.distributed (NCCL on GPU, gloo on CPU).

The trainer side sends each bucket as one flat broadcast; the receiving side rebuilds the
bucket and yields owned tensors. Nothing here knows about engines or FP8.
"""

from weightpipe.stages.transport.distributed import (
    DistributedReceiver,
    DistributedSender,
    TransportError,
    distributed_source,
)

__all__ = ["DistributedReceiver", "DistributedSender", "TransportError", "distributed_source"]
