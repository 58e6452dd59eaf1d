"""`nonapprox`: no pairwise similarity — one self-gated score per position (spec §3).

    q = SiLU(W_q x + b_q),  k = W_k x + b_k,  v = W_v x + b_v,  s_j = q_j·k_j / sqrt(d_h),
    A_ij = exp(s_j) / Σ_{j' ≤ i} exp(s_j')   for j ≤ i.

A softmax over the causal prefix whose logits do not depend on the query row. Its recurrent form (paper
eq. 18) is a running softmax-weighted mean of v with O(1) state per head; the fast path evaluates it in
chunks with an online max (as in flash attention), so scores far above 10³ — the uniform-`nonapprox`
failure the paper reports — neither overflow nor underflow. RoPE is not applied: rotating q_j and k_j
by the same angle leaves q_j·k_j unchanged. With QK-norm, the norm is applied to the projections before
the SiLU. Layout: [batch, heads, seq, head_dim]; scores [batch, heads, seq].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MixerInputs, MixerOutput, ProjectedMixer, allowed_positions


def reference_prefix_softmax(
    scores: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit float32 form. scores: [batch, heads, seq]. Returns output and the map A [batch, heads, seq, seq]."""
    seq_len = scores.shape[-1]
    logits = scores.float()[:, :, None, :].expand(-1, -1, seq_len, -1)  # row i: s_j for every key j
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(weights, value.float()).to(value.dtype), weights


def chunked_prefix_softmax(
    scores: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None, chunk_size: int
) -> torch.Tensor:
    """o_i = Σ_{j ≤ i} exp(s_j − c_i) v_j / Σ_{j ≤ i} exp(s_j − c_i), with c_i the running max.

    Processes `chunk_size` positions at a time, carrying (running max, Σ exp·v, Σ exp) across chunks.
    Every exponent is ≤ 0 and each row's own term is exp(0)-scaled at worst, so nothing overflows and
    no normaliser vanishes. The stabiliser is detached: the result does not depend on it.
    """
    batch, heads, seq_len = scores.shape
    scores = scores.float()
    lowest = torch.finfo(torch.float32).min
    keep = None if key_padding_mask is None else key_padding_mask[:, None, :]  # [B, 1, L]
    running_max = scores.new_full((batch, heads), lowest)
    weighted_sum = scores.new_zeros(batch, heads, value.shape[-1])
    weight_sum = scores.new_zeros(batch, heads)
    outputs = []
    for start in range(0, seq_len, chunk_size):
        stop = min(start + chunk_size, seq_len)
        s, v = scores[:, :, start:stop], value[:, :, start:stop].float()  # [B, H, C], [B, H, C, d]
        chunk_keep = None if keep is None else keep[:, :, start:stop]
        allowed = allowed_positions(stop - start, None if keep is None else key_padding_mask[:, start:stop], s.device)
        logits = s[:, :, None, :].expand(-1, -1, stop - start, -1).masked_fill(~allowed, lowest)  # [B, H, C, C]
        row_max = torch.maximum(running_max[..., None], logits.amax(-1)).detach()  # c_i: [B, H, C]
        within = torch.exp(logits - row_max[..., None])  # masked entries → exp(lowest − c) = 0
        carry = torch.exp(running_max[..., None] - row_max)  # rescales the earlier chunks' sums
        numerator = within @ v + carry[..., None] * weighted_sum[:, :, None, :]
        normaliser = within.sum(-1) + carry * weight_sum[:, :, None]
        outputs.append((numerator / normaliser[..., None]).to(value.dtype))
        # Fold the chunk's (real) keys into the running state, rescaled to the new maximum.
        kept_scores = s if chunk_keep is None else s.masked_fill(~chunk_keep, lowest)
        new_max = torch.maximum(running_max, kept_scores.amax(-1)).detach()
        key_weights = torch.exp(kept_scores - new_max[..., None])  # [B, H, C]
        if chunk_keep is not None:
            key_weights = key_weights * chunk_keep
        rescale = torch.exp(running_max - new_max)
        weighted_sum = rescale[..., None] * weighted_sum + (key_weights[..., None] * v).sum(-2)
        weight_sum = rescale * weight_sum + key_weights.sum(-1)
        running_max = new_max
    return torch.cat(outputs, dim=2)


class SelfGatedPrefixSoftmax(ProjectedMixer):
    """Per-position self-gated scores, softmax over the causal prefix (spec §3, `nonapprox`)."""

    name = "nonapprox"
    chunk_size: int = 64  # fast path: positions per chunk

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        query, key, value = self.project_heads(x, inputs)
        query = F.silu(query)  # [batch, heads, seq, head_dim]
        key = self.expand_key_value_heads(key)
        value = self.expand_key_value_heads(value)
        scores = (query * key).sum(-1) * self.scaling  # s_j: [batch, heads, seq]
        if inputs.reference or inputs.need_weights or inputs.need_scores:
            allowed = allowed_positions(x.shape[1], inputs.key_padding_mask, x.device)
            output, weights = reference_prefix_softmax(scores, value, allowed)
            if inputs.need_scores and inputs.key_padding_mask is not None:
                scores = scores.masked_fill(~inputs.key_padding_mask[:, None, :], float("nan"))
            return MixerOutput(
                self.merge_heads(output),
                weights=weights if inputs.need_weights else None,
                scores=scores.float() if inputs.need_scores else None,
            )
        output = chunked_prefix_softmax(scores, value, inputs.key_padding_mask, self.chunk_size)
        return MixerOutput(self.merge_heads(output))
