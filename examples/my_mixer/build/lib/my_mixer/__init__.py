"""An example attnlab mixer package: `slidingwindow`, causal softmax attention over the last w tokens."""

from .sliding_window import SlidingWindowAttention

__all__ = ["SlidingWindowAttention"]
