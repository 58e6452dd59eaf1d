"""`approximate`: softmax's exponential replaced by its 2nd-order Taylor polynomial (spec §3; "Based").

    s_ij = RoPE_i(q_i)·RoPE_j(k_j) / sqrt(d_h),  f(s) = 1 + s + s²/2,  A_ij = f(s_ij) / Σ_{j' ≤ i} f(s_ij').

f(s) ≥ 1/2, so the normaliser is positive. With the feature map (paper Appx. I, eqs. 14–17)
φ(u) = [1, u / d_h^{1/4}, vec(u uᵀ) / (sqrt(2)·sqrt(d_h))] we have φ(q)·φ(k) = f(q·k / sqrt(d_h)), so
causal attention becomes running sums of order 0, 1 and 2 over keys and values:

    S0 = Σ_j v_j,   S1 = Σ_j k̃_j v_jᵀ,   S2 = Σ_j (k̃_j ⊗ k̃_j) v_jᵀ   (k̃ = k / d_h^{1/4}; same sums without v
    for the normaliser),  o_i = (S0 + q̃_i·S1 + ½ (q̃_i ⊗ q̃_i)·S2) / (n + q̃_i·z1 + ½ (q̃_i ⊗ q̃_i)·z2).

The fast path is chunked: inside a chunk the polynomial is applied to the explicit chunk×chunk scores,
across chunks the order-0/1/2 sums carry the prefix — linear in sequence length, and the state a
recurrent decoder keeps. Because φ has 1 + d_h + d_h² entries, the sums cost about 4·L·d_h³ per head
against 4·L²·d_h for the explicit form, so the default chunk is 2·d_h²: a paper-size head (d_h = 64)
runs the explicit form up to 8192 tokens and the linear form beyond. Layout: [batch, heads, seq, head_dim].
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
    seq_len = query.shape[2]
    feature_scale = scaling**0.5  # q̃ = q / d_h^{1/4}, so q̃·k̃ = s
    query, key = query * feature_scale, key * feature_scale
    keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None].to(query.dtype)  # [B, 1, L, 1]
    # Running sums over the keys of all previous chunks (order 0, 1, 2), numerator and normaliser; they
    # become tensors after the first chunk ([B, H, 1, d_v], [B, H, 1, 1], [B, H, d, d_v], [B, H, d, 1],
    # [B, H, d², d_v], [B, H, d², 1]), so a single-chunk call never allocates the d²-sized state.
    value_sum = key_count = key_value_sum = key_sum = key2_value_sum = key2_sum = 0.0
    outputs = []
    for start in range(0, seq_len, chunk_size):
        stop = min(start + chunk_size, seq_len)
        q, k, v = query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop]
        chunk_padding = None if key_padding_mask is None else key_padding_mask[:, start:stop]
        # Inside the chunk: the polynomial on explicit scores, causally masked.
        within = taylor_exp(q @ k.transpose(-1, -2)) * allowed_positions(stop - start, chunk_padding, q.device)
        numerator = within @ v  # [B, H, C, d_v]
        normaliser = within.sum(-1, keepdim=True)  # [B, H, C, 1]
        if start > 0:  # prefix from earlier chunks: φ(q̃)·Σφ(k̃)v and φ(q̃)·Σφ(k̃)
            q2 = (q.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2)  # q̃ ⊗ q̃: [B, H, C, d²]
            numerator = numerator + value_sum + q @ key_value_sum + 0.5 * (q2 @ key2_value_sum)
            normaliser = normaliser + key_count + q @ key_sum + 0.5 * (q2 @ key2_sum)
        outputs.append(numerator / normaliser)
        if stop == seq_len:
            break
        # Fold this chunk's keys into the running sums (padded keys contribute nothing).
        if keep is not None:
            chunk_keep = keep[:, :, start:stop]
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
    chunk_size: int | None = None  # fast path: queries per chunk; None = 2·d_h² (see the module docstring)

    def reference_attention(self, query, key, value, allowed):
        return reference_taylor_attention(query, key, value, allowed, self.scaling)

    def fast_attention(self, query, key, value, key_padding_mask):
        chunk_size = self.chunk_size or 2 * self.head_dim**2
        return chunked_taylor_attention(query, key, value, key_padding_mask, self.scaling, chunk_size)
