"""`standard`: dot-product softmax attention, as in Qwen2 (spec §3).

    s_ij = RoPE_i(q_i)·RoPE_j(k_j) / sqrt(d_h),   A = softmax_j(s_ij) over j ≤ i,   o_i = Σ_j A_ij v_j.

The same computation serves the variants that only change where q and k come from (`staticembqk`,
`rndembqk`, `fixedseqqk`): both attention functions accept queries/keys of batch 1 — one input-independent
map per head, shared by the whole batch — and then compute that map once, not once per sequence.

Layout: [batch, heads, seq, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import PairwiseScoreMixer, allowed_positions


def reference_softmax_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit float32 softmax attention. query/key: [1 or batch, heads, seq, d]; value: [batch, heads, seq, d].

    Returns the output [batch, heads, seq, d], the map A [batch, heads, seq, seq] and the scores s.
    """
    batch = value.shape[0]
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # [1|batch, heads, seq, seq]
    scores = scores.expand(batch, -1, -1, -1)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    output = torch.matmul(weights, value.float()).to(value.dtype)
    return output, weights, scores


def fast_softmax_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """Fused causal softmax attention (`scaled_dot_product_attention`); the same function as the reference.

    When query/key have batch 1 and value has batch B (a map shared by the batch) and there is no padding,
    the batch is folded into the value width, so the map is computed once: cost 2L²d + 2BL²d (spec §8).
    """
    batch, heads, seq_len, value_dim = value.shape
    shared_map = query.shape[0] == 1 and batch > 1
    if key_padding_mask is None and shared_map:
        folded = value.permute(1, 2, 0, 3).reshape(1, heads, seq_len, batch * value_dim)  # [1, heads, seq, B·d]
        output = F.scaled_dot_product_attention(query, key, folded, is_causal=True)
        return output.reshape(heads, seq_len, batch, value_dim).permute(2, 0, 1, 3)  # [batch, heads, seq, d]
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True)
    allowed = allowed_positions(seq_len, key_padding_mask, value.device)  # [batch, 1, seq, seq]
    query, key = query.expand(batch, -1, -1, -1), key.expand(batch, -1, -1, -1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed)


class StandardAttention(PairwiseScoreMixer):
    """Softmax attention over RoPE'd dot products (spec §3, `standard`)."""

    name = "standard"

    def reference_attention(self, query, key, value, allowed):
        return reference_softmax_attention(query, key, value, allowed, self.scaling)

    def fast_attention(self, query, key, value, key_padding_mask):
        return fast_softmax_attention(query, key, value, key_padding_mask)
