"""`standard`: dot-product softmax attention, as in Qwen2 (docs/method.md §3).

    s_ij = RoPE_i(q_i)·RoPE_j(k_j) / sqrt(d_h),   A = softmax_j(s_ij) over j ≤ i,   o_i = Σ_j A_ij v_j.

The same computation serves the variants that only change where q and k come from (`staticembqk`,
`rndembqk`, `fixedseqqk`): both attention functions accept queries/keys of batch 1 — one input-independent
map per head, shared by the whole batch — and then compute that map once, not once per sequence: the
batch is folded into the value width, [1, heads, seq, B·d_h]. The CPU's fused kernel takes only one width
for q, k and v (a wider v sends it to the unfused math backend: dense L×L, no causal skipping), so on the
CPU a float32 shared map (without padding) goes through `shared_map_attention` (blocks of query rows, QKᵀ and
softmax once, one matmul for the batch), any other dtype through the fused kernel with q and k zero-padded
to the folded width (`padded_shared_map_attention`: one softmax, but QKᵀ at B·d_h wide). Measured forward +
backward of cpu-tiny's attention (4 heads, d_h 32; 2 threads), blocks of 128 rows against the padded kernel:
1.07–1.08× for 2 rows (L = 2048, 8192), 1.24–1.26× for 3, 1.44× for 5 (L = 4096), 2.1× for 9 (L = 2048),
2.4× for 33 (L = 512). Blocks of 256 rows were 0.9–1.07× as fast as 128 (faster only from 5 rows up).

Cached decoding (`forward_cached`): `standard` and `staticembqk` keep a KV cache (transformers'
`DynamicLayer`) of keys after QK-norm and RoPE and of values, [batch, kv_heads, seen, head_dim]; a step
appends the new keys/values and attends over all of them, O(seen·d) per token (docs/method.md §8: decode
6Bd² + 4BLd per layer). `rndembqk`/`fixedseqqk` read their queries and keys from the layer's shadow
tables (computed once per cache by the model, see `attnlab.cache.SharedMapLayer`) and cache only the
values; the batch-1 keys keep the map shared by the batch during decoding too.

Analytic cost (`cost`, docs/method.md §8) per layer, batch B, context L, h heads of width d_h, KV width d_kv:
prefill = projections (W_q, W_k, W_v, W_o: 8BLd² for multi-head attention) + 4BhL²d_h (QKᵀ and AV, dense);
decode = projections for one token (8Bd²) + 4Bh(L + 1)d_h (the new token attends over L cached keys and
itself); cache = keys + values = 2·B·L·d_kv·bytes. Spec §8 writes 6BLd² and 6Bd²: it leaves out W_o.
`rndembqk`/`fixedseqqk` (`shared_map_cost`): W_q, W_k run once on the shadow rows, not per sequence.

Layout: [batch, heads, seq, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

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
    the batch is folded into the value width, so the map is computed once: cost 2L²d + 2BL²d (docs/method.md §8); on
    the CPU by `shared_map_attention` or `padded_shared_map_attention` (module docstring).
    With `past_length` > 0 the queries are the last ones of the key sequence (cached decoding).
    """
    if past_length:
        return decode_softmax_attention(query, key, value, key_padding_mask, past_length)
    batch, heads, seq_len, value_dim = value.shape
    shared_map = query.shape[0] == 1 and batch > 1
    if key_padding_mask is None and shared_map and value.device.type == "cpu":
        if query.dtype == key.dtype == value.dtype == torch.float32:
            return shared_map_attention(query, key, value)
        return padded_shared_map_attention(query, key, value)
    if key_padding_mask is None and shared_map:
        folded = value.permute(1, 2, 0, 3).reshape(1, heads, seq_len, batch * value_dim)  # [1, heads, seq, B·d]
        output = F.scaled_dot_product_attention(query, key, folded, is_causal=True)
        return output.reshape(heads, seq_len, batch, value_dim).permute(2, 0, 1, 3)  # [batch, heads, seq, d]
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True)
    allowed = allowed_positions(seq_len, key_padding_mask, value.device)  # [batch, 1, seq, seq]
    query, key = query.expand(batch, -1, -1, -1), key.expand(batch, -1, -1, -1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed)


SHARED_MAP_BLOCK = 128  # query rows per block of `shared_map_attention` (module docstring)


def padded_shared_map_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The fused kernel on one map shared by the batch, the batch folded into the value width and q, k padded
    with zeros to that width (which leaves every q·k, and so the map, unchanged; the scale stays 1/sqrt(d_h)).

    query/key: [1, heads, seq, d]; value: [batch, heads, seq, d_v] with batch·d_v ≥ d → [batch, heads, seq, d_v].
    """
    batch, heads, seq_len, value_dim = value.shape
    folded = value.permute(1, 2, 0, 3).reshape(1, heads, seq_len, batch * value_dim)  # [1, heads, seq, B·d_v]
    padding = (0, batch * value_dim - query.shape[-1])
    output = F.scaled_dot_product_attention(
        F.pad(query, padding), F.pad(key, padding), folded, is_causal=True, scale=query.shape[-1] ** -0.5
    )
    return output.reshape(heads, seq_len, batch, value_dim).permute(2, 0, 1, 3)  # [batch, heads, seq, d_v]


def shared_map_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention with one map per head shared by the batch (docs/method.md §3, `rndembqk`/`fixedseqqk`).

    o_bi = Σ_{j ≤ i} A_ij v_bj with A = softmax_j(RoPE_i(q_i)·RoPE_j(k_j) / sqrt(d_h)), the same function as
    `fast_softmax_attention`. query/key: [1, heads, seq, d]; value: [batch, heads, seq, d_v] → [batch, heads,
    seq, d_v]. The batch is folded into the value width, so each block of A is computed once and applied
    to every sequence by one matmul: QKᵀ and the softmax cost one sequence, not B (docs/method.md §8: 2L²d + 2BL²d).
    """
    batch, heads, seq_len, value_dim = value.shape
    folded = value.permute(1, 2, 0, 3).reshape(heads, seq_len, batch * value_dim)  # [heads, seq, B·d_v]
    output = _SharedMapAttention.apply(query[0], key[0], folded, query.shape[-1] ** -0.5)  # [heads, seq, B·d_v]
    return output.view(heads, seq_len, batch, value_dim).permute(2, 0, 1, 3)  # [batch, heads, seq, d_v]


class _SharedMapAttention(torch.autograd.Function):
    """softmax(causal(q kᵀ · scale)) v for q, k: [heads, seq, d] and v: [heads, seq, width], exact, in blocks of
    `SHARED_MAP_BLOCK` query rows (a block of rows a..b−1 sees keys 0..b−1, so the upper triangle is skipped
    up to one block's diagonal). Memory O(heads · block · seq): backward recomputes each block of the map.

    With P = softmax(S), O = P v and δ_i = Σ_w ∂L/∂O_iw · O_iw (= Σ_j P_ij ∂L/∂P_ij):
    ∂L/∂v = Pᵀ ∂L/∂O,  ∂L/∂S = P ⊙ (∂L/∂O vᵀ − δ),  ∂L/∂q = ∂L/∂S k · scale,  ∂L/∂k = ∂L/∂Sᵀ q · scale.
    """

    @staticmethod
    def forward(ctx, query, key, value, scale):
        scaled_query, key = (query * scale).contiguous(), key.contiguous()
        outputs = [block @ value[:, : block.shape[-1]] for block in _map_blocks(scaled_query, key)]
        output = torch.cat(outputs, dim=1)  # [heads, seq, width]
        ctx.save_for_backward(scaled_query, key, value, output)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        scaled_query, key, value, output = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        delta = torch.linalg.vecdot(grad_output, output).unsqueeze(-1)  # δ: [heads, seq, 1]
        grad_query, grad_key, grad_value = [], torch.zeros_like(key), torch.zeros_like(value)
        grad_space = key.new_empty(_workspace_size(key))  # ∂L/∂P, then ∂L/∂S, of every block in turn
        start = 0
        for weights in _map_blocks(scaled_query, key):  # P of rows start..stop−1: [heads, rows, stop]
            stop = weights.shape[-1]
            rows = slice(start, start + weights.shape[1])
            grad_value[:, :stop] += weights.transpose(1, 2) @ grad_output[:, rows]
            grad_scores = grad_space[: weights.numel()].view(weights.shape)
            torch.bmm(grad_output[:, rows], value[:, :stop].transpose(1, 2), out=grad_scores)  # ∂L/∂P
            grad_scores.sub_(delta[:, rows]).mul_(weights)  # ∂L/∂S
            grad_query.append(grad_scores @ key[:, :stop])
            grad_key[:, :stop] += grad_scores.transpose(1, 2) @ scaled_query[:, rows]
            start = rows.stop
        return torch.cat(grad_query, dim=1).mul_(ctx.scale), grad_key, grad_value, None


def _workspace_size(key: torch.Tensor) -> int:
    """Elements of the largest block of the map (the last one): heads · block · seq."""
    heads, seq_len, _ = key.shape
    return heads * min(SHARED_MAP_BLOCK, seq_len) * seq_len


def _map_blocks(scaled_query: torch.Tensor, key: torch.Tensor):
    """Yield the causal map P in blocks of query rows: rows a..b−1 as [heads, b − a, b] (keys 0..b−1).

    The scores and the map live in two workspaces reused by every block (a yielded block is overwritten by
    the next one). scaled_query, key: [heads, seq, d], contiguous.
    """
    heads, seq_len, _ = key.shape
    block = min(SHARED_MAP_BLOCK, seq_len)
    above_diagonal = torch.ones(block, block, dtype=torch.bool, device=key.device).triu_(1)
    scores_space = key.new_empty(_workspace_size(key))
    weights_space = torch.empty_like(scores_space)
    for start in range(0, seq_len, block):
        stop = min(start + block, seq_len)
        rows = stop - start
        scores = scores_space[: heads * rows * stop].view(heads, rows, stop)
        torch.bmm(scaled_query[:, start:stop], key[:, :stop].transpose(1, 2), out=scores)
        scores[:, :, start:].masked_fill_(above_diagonal[:rows, :rows], float("-inf"))  # j > i
        yield torch.softmax(scores, dim=-1, out=weights_space[: heads * rows * stop].view(heads, rows, stop))


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
    """Cost of a layer whose map is input-independent (`rndembqk`, `fixedseqqk`; docs/method.md §8, corrected).

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
    """Softmax attention over RoPE'd dot products (docs/method.md §3, `standard`)."""

    name = "standard"

    @classmethod
    def cache_layer(cls, config, layer_idx):
        """transformers' KV cache of RoPE'd keys and values (module docstring)."""
        return DynamicLayer()

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
