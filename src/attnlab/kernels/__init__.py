"""Attention kernels that avoid L×L tensors: the Taylor (`approximate`) mixer's blocked CPU path and FlexAttention."""

from .taylor import blocked_forward_flops, blocked_taylor_attention, choose_prefix, flex_taylor_attention

__all__ = ["blocked_forward_flops", "blocked_taylor_attention", "choose_prefix", "flex_taylor_attention"]
