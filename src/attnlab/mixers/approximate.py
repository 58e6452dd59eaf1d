"""`approximate`: softmax's exponential replaced by its 2nd-order Taylor polynomial (docs/method.md §3; "Based").

    s_ij = RoPE_i(q_i)·RoPE_j(k_j) / sqrt(d_h),  f(s) = 1 + s + s²/2,  A_ij = f(s_ij) / Σ_{j' ≤ i} f(s_ij').

f(s) ≥ 1/2, so the normaliser is positive. With the feature map (paper Appx. I, eqs. 14–17)
φ(u) = [1, u / d_h^{1/4}, vec(u uᵀ) / (sqrt(2)·sqrt(d_h))] we have φ(q)·φ(k) = f(q·k / sqrt(d_h)), so
causal attention becomes running sums of order 0, 1 and 2 over keys and values:

    S0 = Σ_j v_j,   S1 = Σ_j k̃_j v_jᵀ,   S2 = Σ_j (k̃_j ⊗ k̃_j) v_jᵀ   (k̃ = k / d_h^{1/4}; same sums without v
    for the normaliser),  o_i = (S0 + q̃_i·S1 + ½ (q̃_i ⊗ q̃_i)·S2) / (n + q̃_i·z1 + ½ (q̃_i ⊗ q̃_i)·z2).

Training and uncached forwards (`fast_attention`) never build an L×L tensor: on CUDA the map is softmax
attention with the score modification s ↦ log f(s) (f > 0), one fused FlexAttention kernel; elsewhere
`attnlab.kernels.taylor.blocked_taylor_attention`, a FlashAttention-style autograd Function that keeps
only q, k, v, the output and its normaliser and recomputes blocks in backward (earlier keys summed
explicitly, or through the order-2 feature sums from L ≈ 2.5·d_h² on, the measured crossover).

The cached prefill is chunked: inside a chunk the polynomial is applied to the explicit chunk×chunk
scores, across chunks the order-0/1/2 sums carry the prefix — linear in sequence length, and the state a
recurrent decoder keeps. Because φ has 1 + d_h + d_h² entries, the sums cost about 4·L·d_h³ per head
against 4·L²·d_h for the explicit form, so the default chunk is 2·d_h². Layout: [batch, heads, seq, head_dim].

Cached decoding keeps exactly those six running sums (`attnlab.cache.RecurrentStateLayer`): Σv [B,H,1,d_h],
Σ1 [B,H,1,1], Σk̃vᵀ [B,H,d_h,d_h], Σk̃ [B,H,d_h,1], Σ(k̃⊗k̃)vᵀ [B,H,d_h²,d_h], Σ(k̃⊗k̃) [B,H,d_h²,1], in the
compute dtype. Their size does not depend on the context, and a step costs O(d_h³) per head and token
whatever the context length (the order-2 term dominates; docs/method.md §8 quotes 10Bd² for decode, which counts
the order-0/1 terms). The prefill is the chunked computation that also folds its last chunk.

Analytic cost (`cost`), per batch row and head. Training forward (`cached=False`): the blocked kernel's
products (`attnlab.kernels.taylor.blocked_forward_flops`). Cached prefill, chunks c_1, c_2, … of
`resolved_chunk_size`: within a chunk 4c²d_h (scores and weights·v, dense); reading the prefix (every chunk
but the first) 2c·(d_h³ + 2d_h² + d_h); folding a chunk into the sums 2c·(d_h³ + d_h²). Both plus the
projections (8BLd² for multi-head attention).
decode = 8Bd² + B·h·(4d_h³ + 6d_h² + 6d_h); cache = B·h·(d_h + 1)·(d_h² + d_h + 1) entries of the
compute dtype (the six sums above). Spec §8's 14BLd², 10Bd² and 6Bd + 4Bd²/h bytes count the order-0/1
terms only (and no W_o): the order-2 sums, d_h³ per head, dominate for any d_h > h.
"""

from __future__ import annotations

import torch

from ..cache import TAYLOR_STATE_NAMES, RecurrentStateLayer
from ..kernels.taylor import blocked_forward_flops, blocked_taylor_attention, flex_taylor_attention
from .base import MixerCost, MixerInputs, MixerOutput, PairwiseScoreMixer, allowed_positions, projection_flops

FLEX_MIN_HEAD_DIM = 16  # FlexAttention's compiled kernels need head_dim ≥ 16


def taylor_exp(scores: torch.Tensor) -> torch.Tensor:
    """f(s) = 1 + s + s²/2, the 2nd-order Taylor polynomial of exp."""
    return 1 + scores + 0.5 * scores * scores


def reference_taylor_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit float32 form. Returns output [batch, heads, seq, d], map A and scores s [batch, heads, seq, seq]."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    unnormalised = taylor_exp(scores) * allowed
    weights = unnormalised / unnormalised.sum(-1, keepdim=True)
    return torch.matmul(weights, value.float()).to(value.dtype), weights, scores


def fold_taylor_state(
    sums: tuple, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """Add keys k̃ (already scaled by d_h^{-1/4}) and values to the six running sums.

    sums: (Σv, Σ1, Σk̃vᵀ, Σk̃, Σ(k̃⊗k̃)vᵀ, Σ(k̃⊗k̃)), tensors or 0.0 before the first fold; key/value
    [B, H, C, d]; keep: [B, 1, C, 1] (real tokens) or None. Padded keys contribute nothing.
    """
    value_sum, key_count, key_value_sum, key_sum, key2_value_sum, key2_sum = sums
    if keep is not None:
        key, value_kept, ones = key * keep, value * keep, keep.expand_as(value[..., :1])
    else:
        value_kept, ones = value, torch.ones_like(value[..., :1])
    key2 = (key.unsqueeze(-1) * key.unsqueeze(-2)).flatten(-2)  # [B, H, C, d²]
    return (
        value_sum + value_kept.sum(-2, keepdim=True),
        key_count + ones.sum(-2, keepdim=True),
        key_value_sum + key.transpose(-1, -2) @ value,
        key_sum + key.sum(-2).unsqueeze(-1),
        key2_value_sum + key2.transpose(-1, -2) @ value,
        key2_sum + key2.sum(-2).unsqueeze(-1),
    )


def chunked_taylor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scaling: float,
    chunk_size: int,
    state: tuple[torch.Tensor, ...] | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Linear-time causal Taylor attention; the same function as `reference_taylor_attention`.

    `state` (the six sums of earlier tokens, see `fold_taylor_state`) continues a sequence: the cached
    decode step. `return_state=True` also returns the sums after the last token.
    """
    seq_len = query.shape[2]
    feature_scale = scaling**0.5  # q̃ = q / d_h^{1/4}, so q̃·k̃ = s
    query, key = query * feature_scale, key * feature_scale
    keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None].to(query.dtype)  # [B, 1, L, 1]
    # Running sums over the keys of all previous chunks (order 0, 1, 2), numerator and normaliser; they
    # become tensors after the first chunk ([B, H, 1, d_v], [B, H, 1, 1], [B, H, d, d_v], [B, H, d, 1],
    # [B, H, d², d_v], [B, H, d², 1]), so a single-chunk call never allocates the d²-sized state.
    has_prefix = state is not None
    sums = state if has_prefix else (0.0,) * 6
    outputs = []
    for start in range(0, seq_len, chunk_size):
        stop = min(start + chunk_size, seq_len)
        q, k, v = query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop]
        chunk_padding = None if key_padding_mask is None else key_padding_mask[:, start:stop]
        # Inside the chunk: the polynomial on explicit scores, causally masked.
        within = taylor_exp(q @ k.transpose(-1, -2)) * allowed_positions(stop - start, chunk_padding, q.device)
        numerator = within @ v  # [B, H, C, d_v]
        normaliser = within.sum(-1, keepdim=True)  # [B, H, C, 1]
        if start > 0 or has_prefix:  # prefix from earlier chunks: φ(q̃)·Σφ(k̃)v and φ(q̃)·Σφ(k̃)
            value_sum, key_count, key_value_sum, key_sum, key2_value_sum, key2_sum = sums
            q2 = (q.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2)  # q̃ ⊗ q̃: [B, H, C, d²]
            numerator = numerator + value_sum + q @ key_value_sum + 0.5 * (q2 @ key2_value_sum)
            normaliser = normaliser + key_count + q @ key_sum + 0.5 * (q2 @ key2_sum)
        outputs.append(numerator / normaliser)
        if stop == seq_len and not return_state:
            break
        # Fold this chunk's keys into the running sums (padded keys contribute nothing).
        sums = fold_taylor_state(sums, k, v, None if keep is None else keep[:, :, start:stop])
    output = torch.cat(outputs, dim=2)
    return (output, sums) if return_state else output


class TaylorAttention(PairwiseScoreMixer):
    """2nd-order Taylor approximation of softmax attention (docs/method.md §3, `approximate`)."""

    name = "approximate"
    chunk_size: int | None = None  # fast path: queries per chunk; None = 2·d_h² (see the module docstring)

    def reference_attention(self, query, key, value, allowed):
        return reference_taylor_attention(query, key, value, allowed, self.scaling)

    def fast_attention(self, query, key, value, key_padding_mask, past_length=0):
        """No L×L tensor: FlexAttention on CUDA (heads of ≥ 16 dims, what its Triton kernels take), the blocked
        recomputing kernel elsewhere (module docstring)."""
        assert past_length == 0, "cached decode steps go through the recurrent state (forward_cached)"
        if query.device.type == "cuda" and query.shape[-1] >= FLEX_MIN_HEAD_DIM:
            return flex_taylor_attention(query, key, value, key_padding_mask, self.scaling)
        return blocked_taylor_attention(query, key, value, key_padding_mask, self.scaling)

    @property
    def resolved_chunk_size(self) -> int:
        return self.chunk_size or 2 * self.head_dim**2

    @classmethod
    def cache_layer(cls, config, layer_idx):
        """The six running sums of the Taylor feature map (module docstring)."""
        return RecurrentStateLayer(TAYLOR_STATE_NAMES)

    @classmethod
    def cost(cls, config, batch, seq_len, dtype_bytes=2, cached=True):
        """Module docstring: the chunked prefill, the recurrent step and the six running sums."""
        heads, head_dim = config.num_attention_heads, config.head_dim_resolved
        chunk = cls.chunk_size or 2 * head_dim**2
        chunks = [min(chunk, seq_len - start) for start in range(0, seq_len, chunk)]
        read = 2 * (head_dim**3 + 2 * head_dim**2 + head_dim)  # per query: φ(q̃)·Σφ(k̃)v and φ(q̃)·Σφ(k̃)
        fold = 2 * (head_dim**3 + head_dim**2)  # per key: k̃vᵀ and (k̃⊗k̃)vᵀ
        if cached:
            per_head = sum(4 * c * c * head_dim for c in chunks) + read * sum(chunks[1:]) + fold * seq_len
        else:
            per_head = blocked_forward_flops(seq_len, head_dim)
        step = 4 * head_dim + read + fold  # a chunk of one token with a prefix, folded
        return MixerCost(
            prefill_flops=projection_flops(config, batch * seq_len) + batch * heads * per_head,
            decode_flops_per_token=projection_flops(config, batch) + batch * heads * step,
            cache_bytes=batch * heads * (head_dim + 1) * (head_dim**2 + head_dim + 1) * dtype_bytes,
        )

    def forward_cached(self, x: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        """One step of the recurrent form (module docstring): O(1) state, the same function as `forward`.

        The map of a decode step is not available from the sums, so weights/scores are refused there
        (`use_cache=False` recomputes them); `reference` applies to the prefill only.
        """
        cache, past_length = inputs.layer_cache, inputs.past_length
        if past_length and (inputs.need_weights or inputs.need_scores):
            raise ValueError(
                "an approximate layer's decode state holds running sums, not its map; "
                "request attentions or mixer scores with use_cache=False"
            )
        query, key, value = self.project_heads(x, inputs)
        query, key = self.rotate_queries_keys(query, key, inputs)
        key, value = self.expand_key_value_heads(key), self.expand_key_value_heads(value)
        state = cache.get_states()
        assert (state is None) == (past_length == 0), "the recurrent state must cover exactly the past tokens"
        padding = inputs.new_token_padding()
        if past_length == 0 and (inputs.reference or inputs.need_weights or inputs.need_scores):
            result = self.attend(query, key, value, inputs)
            keep = None if padding is None else padding[:, None, :, None].to(key.dtype)
            cache.set_states(fold_taylor_state((0.0,) * 6, key * self.scaling**0.5, value, keep))
            return result
        output, state = chunked_taylor_attention(
            query, key, value, padding, self.scaling, self.resolved_chunk_size, state=state, return_state=True
        )
        cache.set_states(state)
        return MixerOutput(self.merge_heads(output))
