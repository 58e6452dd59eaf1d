"""`slidingwindow`: causal softmax attention in which position i reads only positions i − w + 1, …, i.

    A_ij = softmax_j(q_i·k_j / sqrt(d_h)) over j ∈ [i − w + 1, i],   o_i = Σ_j A_ij v_j

with RoPE on q and k, as the standard mixer. The window w is this mixer's own setting,
`mixer_options={"slidingwindow": {"window": w}}` (default 16), saved with the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer

from attnlab import Mixer, MixerCost, MixerOutput, register_mixer
from attnlab.modules import apply_rotary


@register_mixer
class SlidingWindowAttention(Mixer):
    name = "slidingwindow"

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.window = int(self.options(config).get("window", 16))
        if self.window < 1:
            raise ValueError(f"slidingwindow needs a window of at least 1 token, got {self.window}")
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x, inputs):
        batch, new, _ = x.shape
        past = inputs.past_length

        def heads(projected):  # [batch, new, heads·d_h] → [batch, heads, new, d_h]
            return projected.view(batch, new, self.num_heads, self.head_dim).transpose(1, 2)

        cos, sin = inputs.position_embeddings
        query = apply_rotary(heads(self.q_proj(x)), cos, sin, inputs.reference)
        key = apply_rotary(heads(self.k_proj(x)), cos, sin, inputs.reference)
        value = heads(self.v_proj(x))
        if inputs.layer_cache is not None:  # decoding: every key/value so far, [batch, heads, past + new, d_h]
            key, value = inputs.layer_cache.update(key, value)
        allowed = self.allowed(new, past, inputs.key_padding_mask, x.device)  # [batch or 1, 1, new, past + new]
        if inputs.reference or inputs.need_weights or inputs.need_scores:  # the explicit float32 reference
            scores = query.float() @ key.float().transpose(-1, -2) * self.scaling  # [batch, heads, new, past + new]
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            mixed = (weights @ value.float()).to(x.dtype)
        else:
            scores = weights = None
            mixed = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed)
        return MixerOutput(
            self.o_proj(mixed.transpose(1, 2).reshape(batch, new, -1)),
            weights=weights if inputs.need_weights else None,
            scores=scores.masked_fill(~allowed, float("nan")) if inputs.need_scores else None,
        )

    def allowed(self, new, past, key_padding_mask, device):
        """True where query i (at position past + i) may read key j: i − w < j ≤ i, the key is not padding,
        and always its own position (so no row is empty)."""
        queries = torch.arange(past, past + new, device=device)[:, None]
        keys = torch.arange(past + new, device=device)
        window = (keys <= queries) & (keys > queries - self.window)  # [new, past + new]
        if key_padding_mask is None:
            return window[None, None]
        return (window & key_padding_mask[:, None, None, :].to(device)) | (keys == queries)

    @classmethod
    def cache_layer(cls, config, layer_idx):
        """A KV cache (transformers' DynamicLayer); a real implementation would keep only the last w."""
        return DynamicLayer()

    @classmethod
    def cost(cls, config, batch, seq_len, dtype_bytes=2, cached=True):
        """Projections 8BLd·(h·d_h); scores and mixing 4B·h·d_h per (query, key) pair inside the window."""
        window = min(int(cls.options(config).get("window", 16)), seq_len)
        heads, head_dim, hidden = config.num_attention_heads, config.head_dim_resolved, config.hidden_size
        pairs = window * seq_len - window * (window - 1) // 2  # Σ_i min(i + 1, w)
        projections = 8 * hidden * heads * head_dim
        return MixerCost(
            prefill_flops=batch * (seq_len * projections + 4 * heads * head_dim * pairs),
            decode_flops_per_token=batch * (projections + 4 * heads * head_dim * window),
            cache_bytes=2 * batch * seq_len * heads * head_dim * dtype_bytes,
        )
