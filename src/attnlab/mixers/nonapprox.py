"""`nonapprox`: no pairwise similarity — one self-gated score per position (docs/method.md §3).

    q = SiLU(W_q x + b_q),  k = W_k x + b_k,  v = W_v x + b_v,  s_j = q_j·k_j / sqrt(d_h),
    A_ij = exp(s_j) / Σ_{j' ≤ i} exp(s_j')   for j ≤ i.

A softmax over the causal prefix whose logits do not depend on the query row. Its recurrent form (paper
eq. 18) is a running softmax-weighted mean of v with O(1) state per head; the fast path evaluates it in
chunks with running maxima (as in flash attention), so scores far above 10³ — the uniform-`nonapprox`
failure the paper reports — neither overflow nor underflow. All chunks are handled at once
(`chunked_prefix_softmax`: no loop over positions or chunks), O(L·chunk + (L/chunk)²·d_h) per head.
(The logcumsumexp form, log Σ exp(s_j + log(v_j − c)) with a shift c that makes v positive, was measured
too: at L = 2048 and 8192, cpu-tiny widths, its backward was 3–5× slower, and with scores of 10³ its
float32 outputs were off by 2e-3, since the logs carry the scores' size; subtracting maxima keeps O(1).)
RoPE is not applied: rotating q_j and k_j by the same angle leaves q_j·k_j unchanged. With QK-norm, the
norm is applied to the projections before the SiLU. Layout: [batch, heads, seq, head_dim]; scores [batch, heads, seq].

Cached decoding keeps the chunked path's carry as the layer's recurrent state
(`attnlab.cache.RecurrentStateLayer`, float32): the running max m [B,H], Σ_j exp(s_j − m)·v_j [B,H,d_h]
and Σ_j exp(s_j − m) [B,H]. A step rescales both sums by exp(m_old − m_new) when the max grows, so
nothing overflows however large the scores; the state has constant size (docs/method.md §8: 2Bd + 4Bh bytes) and
a step costs O(d) per token, independent of the context (docs/method.md §8: 6Bd² with the projections).

Analytic cost (`cost`), with h heads of width d_h and n = ⌈L/C⌉ chunks of C = min(`chunk_size`, L)
positions (the last one padded): prefill = projections (8BLd² for multi-head attention) + B·h·d_h·(4L + 2nC²)
(the scores s_j, the chunk sums Σexp·v, and the chunk×chunk weights applied to v; the carries'
rescale-and-sum over the (n + 1)² chunk pairs is left out with the other running-max rescales); decode =
8Bd² + 6B·h·d_h; cache = 4·B·h·(d_h + 2) bytes (three float32 tensors whatever the compute dtype).
Spec §8 writes 6BLd² and 6Bd² (no W_o) and 2Bd + 4Bh bytes (the weighted sum at half precision and one
float32 per head); attnlab keeps the sum, the max and the normaliser, all in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache import PREFIX_SOFTMAX_STATE_NAMES, RecurrentStateLayer
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
    """o_i = Σ_{j ≤ i} exp(s_j − c_i) v_j / Σ_{j ≤ i} exp(s_j − c_i), with c_i the running max (paper eq. 18).

    scores: [B, H, L]; value: [B, H, L, d]. The positions fall into chunks of `chunk_size` (the last one padded
    with masked keys), all handled at once, with no loop over chunks:
    - each chunk u is summarised at its own maximum M_u: (M_u, Σ_j exp(s_j − M_u) v_j, Σ_j exp(s_j − M_u));
    - the carry into chunk c combines `state` (the carry of earlier calls, if any) and the summaries of
      chunks u < c at their common maximum R_c = max(M_state, M_u for u < c), as one [chunks + 1, chunks + 1]
      matmul of the weights exp(M_u − R_c) ≤ 1 (the sequential fold's running-max rescales, all at once);
    - row i of chunk c takes its chunk's keys j ≤ i explicitly at c_i = max(R_c, max_{j ≤ i} s_j), and the
      carry rescaled by exp(R_c − c_i).
    Every exponent is ≤ 0 and each row's own term is exp(0)-scaled at worst, so nothing overflows and no
    normaliser vanishes, however large the scores. The maxima are detached: the result does not depend on
    them. `return_state=True` also returns the carry after the last position (the cached decode state).
    """
    batch, heads, seq_len = scores.shape
    value_dim = value.shape[-1]
    chunk = min(chunk_size, seq_len)
    chunks = -(-seq_len // chunk)
    tail = chunks * chunk - seq_len
    lowest = torch.finfo(torch.float32).min
    scores, values = scores.float(), value.float()
    keep = key_padding_mask
    if tail:  # masked keys after the end: they get weight 0 and their rows are dropped
        scores, values = F.pad(scores, (0, tail)), F.pad(values, (0, 0, 0, tail))
        keep = torch.ones(batch, seq_len, dtype=torch.bool, device=scores.device) if keep is None else keep
        keep = F.pad(keep, (0, tail), value=False)
    scores = scores.view(batch, heads, chunks, chunk)  # [B, H, n, C]
    values = values.view(batch, heads, chunks, chunk, value_dim)  # [B, H, n, C, d]
    keep = None if keep is None else keep.view(batch, 1, chunks, chunk)  # [B, 1, n, C]

    # Chunk summaries at their own maxima.
    key_scores = scores if keep is None else scores.masked_fill(~keep, lowest)
    chunk_max = key_scores.amax(-1).detach()  # M_u: [B, H, n]
    key_weights = torch.exp(key_scores - chunk_max[..., None])  # [B, H, n, C]
    if keep is not None:
        key_weights = key_weights * keep
    chunk_sums = (key_weights[..., None, :] @ values).squeeze(-2)  # [B, H, n, d]

    # Carries: target t ∈ 0..n combines the sources u ≤ t (u = 0: `state`, u ≥ 1: chunk u − 1).
    state = initial_prefix_softmax_state(scores, value_dim) if state is None else state
    source_max = torch.cat([state[0][..., None], chunk_max], dim=-1)  # [B, H, n + 1]
    source_sums = torch.cat([state[1][:, :, None], chunk_sums], dim=2)  # [B, H, n + 1, d]
    source_weights = torch.cat([state[2][..., None], key_weights.sum(-1)], dim=-1)  # [B, H, n + 1]
    carry_max = torch.cummax(source_max, dim=-1).values  # R_t: [B, H, n + 1]
    later = torch.ones(chunks + 1, chunks + 1, dtype=torch.bool, device=scores.device).triu_(1)  # u > t
    combine = torch.exp((source_max[..., None, :] - carry_max[..., None]).masked_fill(later, float("-inf")))
    carry_sums = combine @ source_sums  # [B, H, n + 1, d]
    carry_weights = (combine @ source_weights[..., None]).squeeze(-1)  # [B, H, n + 1]

    # Within each chunk, explicitly (a padded query keeps its own position, see `allowed_positions`).
    allowed = torch.ones(chunk, chunk, dtype=torch.bool, device=scores.device).tril_()  # j ≤ i: [C, C]
    if keep is not None:
        allowed = (allowed & keep[..., None, :]) | torch.eye(chunk, dtype=torch.bool, device=scores.device)
    logits = scores[..., None, :].expand(-1, -1, -1, chunk, -1).masked_fill(~allowed, lowest)  # [B, H, n, C, C]
    running_max = carry_max[..., :chunks, None]  # R_c per row: [B, H, n, 1]
    row_max = torch.maximum(running_max, logits.amax(-1)).detach()  # c_i: [B, H, n, C]
    within = torch.exp(logits - row_max[..., None])  # masked entries → exp(lowest − c) = 0
    carry = torch.exp(running_max - row_max)  # [B, H, n, C]
    numerator = within @ values + carry[..., None] * carry_sums[:, :, :chunks, None, :]  # [B, H, n, C, d]
    normaliser = within.sum(-1) + carry * carry_weights[:, :, :chunks, None]  # [B, H, n, C]
    output = (numerator / normaliser[..., None]).view(batch, heads, chunks * chunk, value_dim)[:, :, :seq_len]
    output = output.to(value.dtype)
    if return_state:
        return output, (carry_max[..., chunks], carry_sums[:, :, chunks], carry_weights[..., chunks])
    return output


class SelfGatedPrefixSoftmax(ProjectedMixer):
    """Per-position self-gated scores, softmax over the causal prefix (docs/method.md §3, `nonapprox`)."""

    name = "nonapprox"
    chunk_size: int = 32  # fast path: positions per chunk (32 was fastest of 8–256 at L = 512–8192, cpu-tiny)

    @classmethod
    def cache_layer(cls, config, layer_idx):
        """The running max and the two running sums of eq. 18 (module docstring)."""
        return RecurrentStateLayer(PREFIX_SOFTMAX_STATE_NAMES)

    @classmethod
    def cost(cls, config, batch, seq_len, dtype_bytes=2, cached=True):
        """Module docstring; the state is float32, so `dtype_bytes` does not change the cache."""
        heads, head_dim = config.num_attention_heads, config.head_dim_resolved
        chunk = min(cls.chunk_size, max(seq_len, 1))
        chunk_squares = -(-seq_len // chunk) * chunk**2  # n·C²: the padded last chunk counts whole
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
