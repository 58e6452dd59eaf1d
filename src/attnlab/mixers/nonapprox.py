"""`nonapprox`: no pairwise similarity — one self-gated score per position (spec §3).

    q = SiLU(W_q x + b_q),  k = W_k x + b_k,  v = W_v x + b_v,  s_j = q_j·k_j / sqrt(d_h),
    A_ij = exp(s_j) / Σ_{j' ≤ i} exp(s_j')   for j ≤ i.

A softmax over the causal prefix whose logits do not depend on the query row. Its recurrent form (paper
eq. 18) is a running softmax-weighted mean of v with O(1) state per head; the fast path evaluates it in
chunks with an online max (as in flash attention), so scores far above 10³ — the uniform-`nonapprox`
failure the paper reports — neither overflow nor underflow. RoPE is not applied: rotating q_j and k_j
by the same angle leaves q_j·k_j unchanged. With QK-norm, the norm is applied to the projections before
the SiLU. Layout: [batch, heads, seq, head_dim]; scores [batch, heads, seq].

Cached decoding keeps the chunked path's carry as the layer's recurrent state
(`attnlab.cache.RecurrentStateLayer`, float32): the running max m [B,H], Σ_j exp(s_j − m)·v_j [B,H,d_h]
and Σ_j exp(s_j − m) [B,H]. A step rescales both sums by exp(m_old − m_new) when the max grows, so
nothing overflows however large the scores; the state has constant size (spec §8: 2Bd + 4Bh bytes) and
a step costs O(d) per token, independent of the context (spec §8: 6Bd² with the projections).

Analytic cost (`cost`), with h heads of width d_h and chunks c of `chunk_size`: prefill = projections
(8BLd² for multi-head attention) + B·h·d_h·(4L + 2·Σc²) (the scores s_j, the folds Σexp·v, and the
chunk×chunk weights applied to v); decode = 8Bd² + 6B·h·d_h; cache = 4·B·h·(d_h + 2) bytes (three float32
tensors whatever the compute dtype). Spec §8 writes 6BLd² and 6Bd² (no W_o) and 2Bd + 4Bh bytes (the
weighted sum at half precision and one float32 per head); attnlab keeps the sum, the max and the
normaliser, all in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MixerCost, MixerInputs, MixerOutput, ProjectedMixer, allowed_positions, projection_flops

PrefixSoftmaxState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # running max, Σ exp·v, Σ exp


def reference_prefix_softmax(
    scores: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit float32 form. scores: [batch, heads, seq]. Returns output and the map A [batch, heads, seq, seq]."""
    seq_len = scores.shape[-1]
    logits = scores.float()[:, :, None, :].expand(-1, -1, seq_len, -1)  # row i: s_j for every key j
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(weights, value.float()).to(value.dtype), weights


def initial_prefix_softmax_state(scores: torch.Tensor, value_dim: int) -> PrefixSoftmaxState:
    """The state before any key: m = lowest float32, both sums zero. scores: [batch, heads, ..]."""
    batch, heads = scores.shape[:2]
    running_max = scores.new_full((batch, heads), torch.finfo(torch.float32).min, dtype=torch.float32)
    return running_max, running_max.new_zeros(batch, heads, value_dim), running_max.new_zeros(batch, heads)


def fold_prefix_softmax_state(
    state: PrefixSoftmaxState, scores: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None
) -> PrefixSoftmaxState:
    """Add keys with scores [B, H, C] (float32) and values [B, H, C, d] (float32) to the running state,
    rescaled to the new maximum; keep: [B, 1, C] (real tokens) or None."""
    running_max, weighted_sum, weight_sum = state
    lowest = torch.finfo(torch.float32).min
    kept_scores = scores if keep is None else scores.masked_fill(~keep, lowest)
    new_max = torch.maximum(running_max, kept_scores.amax(-1)).detach()
    key_weights = torch.exp(kept_scores - new_max[..., None])  # [B, H, C]
    if keep is not None:
        key_weights = key_weights * keep
    rescale = torch.exp(running_max - new_max)
    weighted_sum = rescale[..., None] * weighted_sum + (key_weights[..., None] * value).sum(-2)
    weight_sum = rescale * weight_sum + key_weights.sum(-1)
    return new_max, weighted_sum, weight_sum


def chunked_prefix_softmax(
    scores: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    chunk_size: int,
    state: PrefixSoftmaxState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, PrefixSoftmaxState]:
    """o_i = Σ_{j ≤ i} exp(s_j − c_i) v_j / Σ_{j ≤ i} exp(s_j − c_i), with c_i the running max.

    Processes `chunk_size` positions at a time, carrying (running max, Σ exp·v, Σ exp) across chunks.
    Every exponent is ≤ 0 and each row's own term is exp(0)-scaled at worst, so nothing overflows and
    no normaliser vanishes. The stabiliser is detached: the result does not depend on it. `state`
    continues a sequence (the cached decode step); `return_state=True` also returns the final carry.
    """
    seq_len = scores.shape[-1]
    scores = scores.float()
    lowest = torch.finfo(torch.float32).min
    keep = None if key_padding_mask is None else key_padding_mask[:, None, :]  # [B, 1, L]
    if state is None:
        state = initial_prefix_softmax_state(scores, value.shape[-1])
    outputs = []
    for start in range(0, seq_len, chunk_size):
        stop = min(start + chunk_size, seq_len)
        s, v = scores[:, :, start:stop], value[:, :, start:stop].float()  # [B, H, C], [B, H, C, d]
        chunk_keep = None if keep is None else keep[:, :, start:stop]
        running_max, weighted_sum, weight_sum = state
        allowed = allowed_positions(stop - start, None if keep is None else key_padding_mask[:, start:stop], s.device)
        logits = s[:, :, None, :].expand(-1, -1, stop - start, -1).masked_fill(~allowed, lowest)  # [B, H, C, C]
        row_max = torch.maximum(running_max[..., None], logits.amax(-1)).detach()  # c_i: [B, H, C]
        within = torch.exp(logits - row_max[..., None])  # masked entries → exp(lowest − c) = 0
        carry = torch.exp(running_max[..., None] - row_max)  # rescales the earlier chunks' sums
        numerator = within @ v + carry[..., None] * weighted_sum[:, :, None, :]
        normaliser = within.sum(-1) + carry * weight_sum[:, :, None]
        outputs.append((numerator / normaliser[..., None]).to(value.dtype))
        # Fold the chunk's (real) keys into the running state, rescaled to the new maximum.
        state = fold_prefix_softmax_state(state, s, v, chunk_keep)
    output = torch.cat(outputs, dim=2)
    return (output, state) if return_state else output


class SelfGatedPrefixSoftmax(ProjectedMixer):
    """Per-position self-gated scores, softmax over the causal prefix (spec §3, `nonapprox`)."""

    name = "nonapprox"
    chunk_size: int = 64  # fast path: positions per chunk

    @classmethod
    def cost(cls, config, batch, seq_len, dtype_bytes=2, cached=True):
        """Module docstring; the state is float32, so `dtype_bytes` does not change the cache."""
        heads, head_dim = config.num_attention_heads, config.head_dim_resolved
        full, rest = divmod(seq_len, cls.chunk_size)
        chunk_squares = full * cls.chunk_size**2 + rest**2
        return MixerCost(
            prefill_flops=projection_flops(config, batch * seq_len)
            + batch * heads * head_dim * (4 * seq_len + 2 * chunk_squares),
            decode_flops_per_token=projection_flops(config, batch) + 6 * batch * heads * head_dim,
            cache_bytes=4 * batch * heads * (head_dim + 2),
        )

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        query, key, value = self.project_heads(x, inputs)
        query = F.silu(query)  # [batch, heads, seq, head_dim]
        key = self.expand_key_value_heads(key)
        value = self.expand_key_value_heads(value)
        scores = (query * key).sum(-1) * self.scaling  # s_j: [batch, heads, seq]
        if inputs.layer_cache is not None:
            return self.forward_cached(scores, value, inputs)
        if inputs.reference or inputs.need_weights or inputs.need_scores:
            return self.reference_output(scores, value, inputs)
        output = chunked_prefix_softmax(scores, value, inputs.key_padding_mask, self.chunk_size)
        return MixerOutput(self.merge_heads(output))

    def reference_output(self, scores: torch.Tensor, value: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        allowed = allowed_positions(scores.shape[-1], inputs.key_padding_mask, value.device)
        output, weights = reference_prefix_softmax(scores, value, allowed)
        if inputs.need_scores and inputs.key_padding_mask is not None:
            scores = scores.masked_fill(~inputs.key_padding_mask[:, None, :], float("nan"))
        return MixerOutput(
            self.merge_heads(output),
            weights=weights if inputs.need_weights else None,
            scores=scores.float() if inputs.need_scores else None,
        )

    def forward_cached(self, scores: torch.Tensor, value: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        """One step of the recurrent form (paper eq. 18; module docstring) for the new tokens' scores/values.

        The map of a decode step is not available from the state, so weights/scores are refused there
        (`use_cache=False` recomputes them); `reference` applies to the prefill only.
        """
        cache, past_length = inputs.layer_cache, inputs.past_length
        state = cache.get_states()
        assert (state is None) == (past_length == 0), "the recurrent state must cover exactly the past tokens"
        padding = inputs.new_token_padding()
        if inputs.reference or inputs.need_weights or inputs.need_scores:
            if past_length:
                if inputs.need_weights or inputs.need_scores:
                    raise ValueError(
                        "a nonapprox layer's decode state holds running sums, not its map; "
                        "request attentions or mixer scores with use_cache=False"
                    )
            else:  # prefill: the reference computation, then the state over the prompt's keys
                result = self.reference_output(scores, value, inputs)
                keep = None if padding is None else padding[:, None, :]
                initial = initial_prefix_softmax_state(scores, value.shape[-1])
                cache.set_states(fold_prefix_softmax_state(initial, scores.float(), value.float(), keep))
                return result
        output, state = chunked_prefix_softmax(scores, value, padding, self.chunk_size, state=state, return_state=True)
        cache.set_states(state)
        return MixerOutput(self.merge_heads(output))
