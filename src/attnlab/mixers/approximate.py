"""`approximate`: softmax's exponential replaced by its 2nd-order Taylor polynomial (spec §3; "Based").

    s_ij = RoPE_i(q_i)·RoPE_j(k_j) / sqrt(d_h),  f(s) = 1 + s + s²/2,  A_ij = f(s_ij) / Σ_{j' ≤ i} f(s_ij').

f(s) ≥ 1/2, so the normaliser is positive. With the feature map (paper Appx. I, eqs. 14–17)
φ(u) = [1, u / d_h^{1/4}, vec(u uᵀ) / (sqrt(2)·sqrt(d_h))] we have φ(q)·φ(k) = f(q·k / sqrt(d_h)), so
causal attention becomes running sums of order 0, 1 and 2 over keys and values:

    S0 = Σ_j v_j,   S1 = Σ_j k̃_j v_jᵀ,   S2 = Σ_j (k̃_j ⊗ k̃_j) v_jᵀ   (k̃ = k / d_h^{1/4}; same sums without v
    for the normaliser),  o_i = (S0 + q̃_i·S1 + ½ (q̃_i ⊗ q̃_i)·S2) / (n + q̃_i·z1 + ½ (q̃_i ⊗ q̃_i)·z2).

The fast path is chunked: inside a chunk the polynomial is applied to the explicit chunk×chunk scores,
across chunks the order-0/1/2 sums carry the prefix — linear in sequence length, and the state a
recurrent decoder keeps. Layout: [batch, heads, seq, head_dim].
"""

from __future__ import annotations

import torch

from .base import PairwiseScoreMixer, allowed_positions


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


def chunked_taylor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scaling: float,
    chunk_size: int,
) -> torch.Tensor:
    """Linear-time causal Taylor attention; the same function as `reference_taylor_attention`."""
    batch, heads, seq_len, head_dim = query.shape
    value_dim = value.shape[-1]
    feature_scale = scaling**0.5  # q̃ = q / d_h^{1/4}, so q̃·k̃ = s
    query, key = query * feature_scale, key * feature_scale
    keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None].to(query.dtype)  # [B, 1, L, 1]
    # Running sums over the keys of all previous chunks (order 0, 1, 2), numerator and normaliser.
    value_sum = query.new_zeros(batch, heads, 1, value_dim)
    key_count = query.new_zeros(batch, heads, 1, 1)
    key_value_sum = query.new_zeros(batch, heads, head_dim, value_dim)
    key_sum = query.new_zeros(batch, heads, head_dim, 1)
    key2_value_sum = query.new_zeros(batch, heads, head_dim * head_dim, value_dim)
    key2_sum = query.new_zeros(batch, heads, head_dim * head_dim, 1)
    outputs = []
    for start in range(0, seq_len, chunk_size):
        stop = min(start + chunk_size, seq_len)
        q, k, v = query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop]
        chunk_keep = None if keep is None else keep[:, :, start:stop]
        q2 = (q.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2)  # q̃ ⊗ q̃: [B, H, C, d²]
        # Prefix from earlier chunks: φ(q̃)·Σφ(k̃)v and φ(q̃)·Σφ(k̃).
        numerator = value_sum + q @ key_value_sum + 0.5 * (q2 @ key2_value_sum)  # [B, H, C, d_v]
        normaliser = key_count + q @ key_sum + 0.5 * (q2 @ key2_sum)  # [B, H, C, 1]
        # Inside the chunk: the polynomial on explicit scores, causally masked.
        allowed = allowed_positions(stop - start, None if key_padding_mask is None else key_padding_mask[:, start:stop], q.device)
        within = taylor_exp(q @ k.transpose(-1, -2)) * allowed  # [B, H, C, C]
        numerator = numerator + within @ v
        normaliser = normaliser + within.sum(-1, keepdim=True)
        outputs.append(numerator / normaliser)
        # Fold this chunk's keys into the running sums (padded keys contribute nothing).
        if chunk_keep is not None:
            k, v_kept, ones = k * chunk_keep, v * chunk_keep, chunk_keep
        else:
            v_kept, ones = v, torch.ones_like(v[..., :1])
        k2 = (k.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2)  # [B, H, C, d²]
        value_sum = value_sum + v_kept.sum(-2, keepdim=True)
        key_count = key_count + ones.sum(-2, keepdim=True)
        key_value_sum = key_value_sum + k.transpose(-1, -2) @ v
        key_sum = key_sum + k.sum(-2).unsqueeze(-1)
        key2_value_sum = key2_value_sum + k2.transpose(-1, -2) @ v
        key2_sum = key2_sum + k2.sum(-2).unsqueeze(-1)
    return torch.cat(outputs, dim=2)


class TaylorAttention(PairwiseScoreMixer):
    """2nd-order Taylor approximation of softmax attention (spec §3, `approximate`)."""

    name = "approximate"
    chunk_size: int = 64  # fast path: queries per chunk (explicit inside, running sums across)

    def reference_attention(self, query, key, value, allowed):
        return reference_taylor_attention(query, key, value, allowed, self.scaling)

    def fast_attention(self, query, key, value, key_padding_mask):
        return chunked_taylor_attention(query, key, value, key_padding_mask, self.scaling, self.chunk_size)
