"""`standard`: dot-product softmax attention, as in Qwen2 (spec §3).

    s_ij = RoPE_i(q_i)·RoPE_j(k_j) / sqrt(d_h),   A = softmax_j(s_ij) over j ≤ i,   o_i = Σ_j A_ij v_j.

The same computation serves the variants that only change where q and k come from (`staticembqk`,
`rndembqk`, `fixedseqqk`): both attention functions accept queries/keys of batch 1 — one input-independent
map per head, shared by the whole batch — and then compute that map once, not once per sequence.

Cached decoding (`forward_cached`): `standard` and `staticembqk` keep a KV cache (transformers'
`DynamicLayer`) of keys after QK-norm and RoPE and of values, [batch, kv_heads, seen, head_dim]; a step
appends the new keys/values and attends over all of them, O(seen·d) per token (spec §8: decode
6Bd² + 4BLd per layer). `rndembqk`/`fixedseqqk` read their queries and keys from the layer's shadow
tables (computed once per cache by the model, see `attnlab.cache.SharedMapLayer`) and cache only the
values; the batch-1 keys keep the map shared by the batch during decoding too.

Analytic cost (`cost`, spec §8) per layer, batch B, context L, h heads of width d_h, KV width d_kv:
prefill = projections (W_q, W_k, W_v, W_o: 8BLd² for multi-head attention) + 4BhL²d_h (QKᵀ and AV, dense);
decode = projections for one token (8Bd²) + 4Bh(L + 1)d_h (the new token attends over L cached keys and
itself); cache = keys + values = 2·B·L·d_kv·bytes. Spec §8 writes 6BLd² and 6Bd²: it leaves out W_o.
`rndembqk`/`fixedseqqk` (`shared_map_cost`): W_q, W_k run once on the shadow rows, not per sequence.

Layout: [batch, heads, seq, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache import SharedMapLayer
from .base import MixerCost, MixerInputs, MixerOutput, PairwiseScoreMixer, allowed_positions, projection_flops


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
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    past_length: int = 0,
) -> torch.Tensor:
    """Fused causal softmax attention (`scaled_dot_product_attention`); the same function as the reference.

    When query/key have batch 1 and value has batch B (a map shared by the batch) and there is no padding,
    the batch is folded into the value width, so the map is computed once: cost 2L²d + 2BL²d (spec §8).
    With `past_length` > 0 the queries are the last ones of the key sequence (cached decoding).
    """
    if past_length:
        return decode_softmax_attention(query, key, value, key_padding_mask, past_length)
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


def decode_softmax_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None, past_length: int
) -> torch.Tensor:
    """Softmax attention of `new` queries (positions past_length…) over all cached keys, fused.

    query: [1|batch, heads, new, d]; key: [1|batch, heads, past_length + new, d]; value: [batch, heads, .., d];
    `key_padding_mask` covers all past_length + new keys. A batch-1 query/key (shared map) is folded as in
    `fast_softmax_attention`.
    """
    batch, heads, key_len, value_dim = value.shape
    query_len = query.shape[2]
    allowed = None  # a single new query sees every key: no mask needed
    if key_padding_mask is not None or query_len > 1:
        allowed = allowed_positions(query_len, key_padding_mask, value.device, past_length)  # [B|1, 1, new, keys]
    if key_padding_mask is None and query.shape[0] == 1 and batch > 1:
        folded = value.permute(1, 2, 0, 3).reshape(1, heads, key_len, batch * value_dim)  # [1, heads, keys, B·d]
        output = F.scaled_dot_product_attention(query, key, folded, attn_mask=allowed)
        return output.reshape(heads, query_len, batch, value_dim).permute(2, 0, 1, 3)  # [batch, heads, new, d]
    query, key = query.expand(batch, -1, -1, -1), key.expand(batch, -1, -1, -1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed)


def shared_map_cost(config, batch: int, seq_len: int, dtype_bytes: int = 2, cached: bool = True) -> MixerCost:
    """Cost of a layer whose map is input-independent (`rndembqk`, `fixedseqqk`; spec §8, corrected).

    precompute: W_q, W_k on the L_max shadow rows, once per model/cache (the shadow stream through the
    other layers is their cost at batch 1, not this mixer's). prefill: W_v, W_o per sequence, the map
    QKᵀ once (2hL²d_h) and AV per sequence (2BhL²d_h); the plain training forward (`cached=False`) also
    projects the batch-1 shadow rows (2Ld·(d_q + d_kv)). decode: W_v, W_o for one token and
    2h(L + 1)d_h·(1 + B). cache: the two RoPE'd tables (L_max·(d_q + d_kv)), the batch-1 keys seen so far
    (L·d_kv) and the values (B·L·d_kv). Spec §8's 2(B+1)Ld bytes is the keys + values; it omits the
    tables, and its prefill 6BLd² projects q and k per sequence, which attnlab does not.
    """
    heads, head_dim = config.num_attention_heads, config.head_dim_resolved
    q_width, kv_width = heads * head_dim, config.num_key_value_heads * head_dim
    table_rows = config.shadow_seq_len
    return MixerCost(
        prefill_flops=projection_flops(config, batch * seq_len, qk_tokens=0 if cached else seq_len)
        + 2 * heads * seq_len**2 * head_dim * (1 + batch),
        decode_flops_per_token=projection_flops(config, batch, qk_tokens=0)
        + 2 * heads * (seq_len + 1) * head_dim * (1 + batch),
        cache_bytes=(table_rows * (q_width + kv_width) + (batch + 1) * seq_len * kv_width) * dtype_bytes,
        precompute_flops=2 * table_rows * config.hidden_size * (q_width + kv_width),
    )


class StandardAttention(PairwiseScoreMixer):
    """Softmax attention over RoPE'd dot products (spec §3, `standard`)."""

    name = "standard"

    @classmethod
    def cost(cls, config, batch, seq_len, dtype_bytes=2, cached=True):
        """Module docstring: 8BLd² + 4BhL²d_h prefill, 8Bd² + 4Bh(L+1)d_h decode, 2BLd_kv values of cache."""
        heads, head_dim = config.num_attention_heads, config.head_dim_resolved
        kv_width = config.num_key_value_heads * head_dim
        return MixerCost(
            prefill_flops=projection_flops(config, batch * seq_len) + 4 * batch * heads * seq_len**2 * head_dim,
            decode_flops_per_token=projection_flops(config, batch) + 4 * batch * heads * (seq_len + 1) * head_dim,
            cache_bytes=2 * batch * seq_len * kv_width * dtype_bytes,
        )

    def reference_attention(self, query, key, value, allowed):
        return reference_softmax_attention(query, key, value, allowed, self.scaling)

    def fast_attention(self, query, key, value, key_padding_mask, past_length=0):
        return fast_softmax_attention(query, key, value, key_padding_mask, past_length)

    def forward_cached(self, x: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        """KV-cached attention for the new tokens (module docstring); the prefill is the uncached computation."""
        cache, past_length, new = inputs.layer_cache, inputs.past_length, x.shape[1]
        if isinstance(cache, SharedMapLayer):  # rndembqk / fixedseqqk: q, k from the precomputed shadow tables
            assert cache.query_table is not None, "the model fills the shadow tables before the first step"
            query = cache.query_table[:, :, past_length : past_length + new]  # [1, heads, new, head_dim]
            key = cache.key_table[:, :, past_length : past_length + new]  # [1, kv_heads, new, head_dim]
            value = self.project_values(x)
        else:
            query, key, value = self.project_heads(x, inputs)
            query, key = self.rotate_queries_keys(query, key, inputs)
        key, value = cache.update(key, value)  # every key/value so far: [.., past_length + new, head_dim]
        key, value = self.expand_key_value_heads(key), self.expand_key_value_heads(value)
        return self.attend(query, key, value, inputs, past_length)
