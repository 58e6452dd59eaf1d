"""The interface every mixer implements, and the pieces most of them share.

Tensor layout inside mixers: hidden states [batch, seq, hidden]; per-head tensors
[batch, heads, seq, head_dim]; mixing matrices [batch, heads, query, key]. All masks are causal
(key j ≤ query i). A key-padding mask marks real tokens; a padded query always keeps its own
position (the diagonal), so no softmax row is empty and real tokens never see padding.

Incremental decoding: when `MixerInputs.layer_cache` is set, `x` holds only the new tokens (positions
`past_length`, …, `past_length + seq − 1`), the key-padding mask covers the past and the new tokens,
and the mixer reads and extends its own entry of the model's `AttnLabCache` (see `attnlab.cache` for
the layout of each mixer's state). The first call with an empty cache is the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..modules import RMSNorm, apply_rotary

if TYPE_CHECKING:
    from transformers.cache_utils import CacheLayerMixin

    from ..config import AttnLabConfig

# Where a mixer may take its queries and keys from instead of its own input (`Mixer.qk_source`).
SHADOW_SOURCES = ("shadow_noise", "shadow_tokens")  # fixed sequences run through the same layers (rndembqk, fixedseqqk)
QK_SOURCES = (None, "static_embeddings", *SHADOW_SOURCES)


@dataclass
class MixerInputs:
    """Everything a mixer may need besides its normalised input `x`."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # RoPE cos, sin: [batch or 1, seq, head_dim]
    key_padding_mask: torch.Tensor | None = None  # [batch, seq] bool, True = real token; None = no padding
    qk_source: torch.Tensor | None = None  # normalised Q/K source [1 or batch, seq, hidden]; None = use x
    qk_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None  # RoPE of qk_source; None = as x
    reference: bool = False  # run the slow, explicit float32 reference path
    need_weights: bool = False  # return the mixing matrix (forces the reference path)
    need_scores: bool = False  # return the pre-softmax activations (forces the reference path)
    layer_cache: Any = None  # this layer's entry of an `AttnLabCache`; None = no incremental decoding
    past_length: int = 0  # tokens already in the cache (the position of x's first token)

    def new_token_padding(self) -> torch.Tensor | None:
        """The key-padding mask of the new tokens only ([batch, seq]), or None when none of them is padding."""
        if self.key_padding_mask is None:
            return None
        new = self.key_padding_mask[:, self.past_length :]
        return None if bool(new.all()) else new


@dataclass(frozen=True)
class MixerCost:
    """Analytic cost of one mixer layer (docs/method.md §8), a pure function of the config, batch and length.

    FLOPs count the multiply-adds of matrix products and dot products as 2 each: the projections
    (W_q, W_k, W_v, W_o, or the mlp mixer's three matrices; biases not counted) and the mixing itself.
    Element-wise work (softmax/exp, SiLU, RoPE, norms, masks, running-max rescales) and plain sums are
    left out. Pairwise maps are counted dense (L×L, as docs/method.md §8 does and as the reference and the chunked
    paths compute them; a causal fused kernel may skip up to half).
    """

    prefill_flops: int  # one forward over `seq_len` tokens (building the decode cache when `cached`)
    decode_flops_per_token: int  # one cached step that adds a token after `seq_len` cached ones
    cache_bytes: int  # what the layer's `AttnLabCache` entry holds after a prefill of `seq_len` tokens
    precompute_flops: int = 0  # once per model/cache, independent of batch and input (shadow Q/K tables)


def projection_flops(config: AttnLabConfig, tokens: int, qk_tokens: int | None = None) -> int:
    """W_q, W_k on `qk_tokens` (default: `tokens`) rows, W_v and W_o on `tokens` rows (2 per multiply-add)."""
    d, head_dim = config.hidden_size, config.head_dim_resolved
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    qk_tokens = tokens if qk_tokens is None else qk_tokens
    return 2 * qk_tokens * d * (q_width + kv_width) + 2 * tokens * d * (kv_width + q_width)


@dataclass
class MixerOutput:
    hidden_states: torch.Tensor  # [batch, seq, hidden]
    weights: torch.Tensor | None = None  # [batch, heads, seq, seq]: the mixing matrix applied
    scores: torch.Tensor | None = None  # pre-softmax activations (per mixer), NaN where masked


class Mixer(nn.Module):
    """The public mixer interface: the token-mixing sublayer of one decoder layer (`attnlab.Mixer`).

    A mixer is built as `Mixer(config, layer_idx)` (the `AttnLabConfig` and the 0-based layer) and sits in
    the layer's `self_attn` slot: h = h + Mixer(RMSNorm(h)) (docs/method.md §2). To add one, subclass this
    class, give it a unique lower-case `name`, and register it (`attnlab.register_mixer`, or an entry point
    in the `attnlab.mixers` group; see `attnlab.mixers.registry`). Then every layer pattern, training,
    evaluation, analysis, bench, generation and the study take it like a built-in mixer.

    What a subclass defines:
      `forward(x, inputs) -> MixerOutput` (required). `x` is the normalised input [batch, seq, hidden];
        `inputs` (`MixerInputs`) holds RoPE's cos/sin, the key-padding mask (True = real token; padded rows
        need no particular output, but real tokens must never read padded ones), the Q/K source when
        `qk_source` is set, and the flags below. Return the new states [batch, seq, hidden] in
        `MixerOutput.hidden_states`; the layer adds them to the residual stream. Causal: position i may read
        positions ≤ i only.
      The reference path: when `inputs.reference` is set, compute the same function the slow, explicit way
        (float32, L×L when the mixer has a map), so a fast path can be tested against it.
      Maps: when `has_mixing_matrix` and `inputs.need_weights` (or `need_scores`), also return the map A
        [batch, heads, seq, seq] that was applied (rows of a normalised map sum to 1) in
        `MixerOutput.weights` (the pre-normalisation activations in `scores`, NaN where masked); the
        indicators of `attnlab analyze` are computed from it. A mixer without a map sets
        `has_mixing_matrix = False` and its indicators are "n/a".
      `cache_layer(config, layer_idx)` (optional): the layer's incremental-decoding state, a transformers
        cache layer kept in the model's `AttnLabCache`. Then `forward` is also called with
        `inputs.layer_cache` set and `x` holding only the new tokens (see the module docstring). The
        default, None, means no incremental decoding: `generate` recomputes the whole sequence each step.
      `cost(config, batch, seq_len, dtype_bytes, cached)` (optional; `attnlab bench` needs it): the
        analytic FLOPs and cache bytes of one layer (`MixerCost`).
      Settings of its own (a window, a rank, ...): read them with `self.options(config)`, from the config's
        `mixer_options` ({name: {option: value}}), so they are saved with the model.
      `qk_source`: where the queries/keys come from when not from `x` (built-in relaxations only): None,
        `"static_embeddings"` (staticembqk), `"shadow_noise"` (rndembqk) or `"shadow_tokens"` (fixedseqqk).
        The decoder layer passes that source through its own attention pre-norm (docs/method.md §3).
    """

    name: ClassVar[str]
    qk_source: ClassVar[str | None] = None
    has_mixing_matrix: ClassVar[bool] = True

    def __init__(self, config: AttnLabConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.head_dim = config.head_dim_resolved
        self.scaling = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        raise NotImplementedError(f"mixer {type(self).__qualname__} must define forward(x, inputs)")

    @classmethod
    def options(cls, config: AttnLabConfig) -> dict[str, Any]:
        """This mixer's settings from `config.mixer_options[name]` (empty when none were given)."""
        return dict((config.mixer_options or {}).get(cls.name, {}))

    @classmethod
    def cache_layer(cls, config: AttnLabConfig, layer_idx: int) -> CacheLayerMixin | None:
        """A fresh decode state for one layer of this mixer (kept in `AttnLabCache.layers[layer_idx]`), or
        None: no incremental decoding (`generate` then recomputes the whole sequence every step)."""
        return None

    @classmethod
    def cost(
        cls, config: AttnLabConfig, batch: int, seq_len: int, dtype_bytes: int = 2, cached: bool = True
    ) -> MixerCost:
        """Analytic cost of one layer of this mixer (`MixerCost`; docs/method.md §8, corrected where noted per mixer).

        `seq_len` is the context L: the prefill length, and the number of cached tokens before the decode
        step. `dtype_bytes` is the compute dtype's size (2 = half precision, as the paper quotes; 4 = fp32).
        `cached=True` counts the prefill that also builds the decode cache (generation); `cached=False`
        the plain forward of training.
        """
        raise NotImplementedError(
            f"mixer {cls.name!r} defines no analytic cost; implement {cls.__qualname__}.cost (see attnlab.Mixer) "
            "to bench it"
        )


class ProjectedMixer(Mixer):
    """A mixer with the standard mixer's parameters: W_q, W_k, W_v (+ biases), W_o, optional QK-norm.

    Parameter names follow transformers' Qwen2/Qwen3 attention (`q_proj`, …, `q_norm`, `k_norm`).
    """

    def __init__(self, config: AttnLabConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def split_heads(self, projected: torch.Tensor) -> torch.Tensor:
        # [batch, seq, heads * head_dim] → [batch, heads, seq, head_dim]
        batch, seq, _ = projected.shape
        return projected.view(batch, seq, -1, self.head_dim).transpose(1, 2)

    def project_queries_keys(self, source: torch.Tensor, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k = W_q source + b_q, W_k source + b_k, split into heads and QK-normed (no RoPE)."""
        query = self.split_heads(self.q_proj(source))  # [batch, heads, seq, head_dim]
        key = self.split_heads(self.k_proj(source))  # [batch, kv_heads, seq, head_dim]
        if self.q_norm is not None:
            query, key = self.q_norm(query, reference), self.k_norm(key, reference)
        return query, key

    def project_values(self, x: torch.Tensor) -> torch.Tensor:
        return self.split_heads(self.v_proj(x))  # [batch, kv_heads, seq, head_dim]

    def project_heads(self, x: torch.Tensor, inputs: MixerInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k from `inputs.qk_source` if given, else from `x` (docs/method.md §3); v from `x`. Split into heads
        [batch, (kv_)heads, seq, head_dim] and QK-normed, no RoPE.

        (One matmul over the concatenated W_q, W_k, W_v was measured: the matmul gets slightly faster, but
        q, k, v become strided slices of one [batch, seq, 3·hidden] tensor, which slows RoPE and the fused
        attention more than that; so the projections stay separate.)
        """
        source = x if inputs.qk_source is None else inputs.qk_source
        query, key = self.project_queries_keys(source, inputs.reference)
        return query, key, self.project_values(x)

    def rotated_queries_keys(
        self, source: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE'd q, k of a normalised Q/K source at the given positions (the precomputed shadow tables)."""
        query, key = self.project_queries_keys(source, reference)
        cos, sin = position_embeddings
        return apply_rotary(query, cos, sin, reference), apply_rotary(key, cos, sin, reference)

    def rotate_queries_keys(
        self, query: torch.Tensor, key: torch.Tensor, inputs: MixerInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE_i(q_i), RoPE_j(k_j), with the positions of the Q/K source."""
        cos, sin = inputs.qk_position_embeddings or inputs.position_embeddings
        return apply_rotary(query, cos, sin, inputs.reference), apply_rotary(key, cos, sin, inputs.reference)

    def expand_key_value_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """GQA: [batch, kv_heads, seq, d] → [batch, heads, seq, d], each K/V head shared by its group."""
        if self.num_key_value_groups == 1:
            return tensor
        return tensor.repeat_interleave(self.num_key_value_groups, dim=1)

    def merge_heads(self, per_head: torch.Tensor) -> torch.Tensor:
        # [batch, heads, seq, head_dim] → o_proj([batch, seq, heads * head_dim]) : [batch, seq, hidden]
        batch, _, seq, _ = per_head.shape
        return self.o_proj(per_head.transpose(1, 2).reshape(batch, seq, -1))


def allowed_positions(
    seq_len: int, key_padding_mask: torch.Tensor | None, device: torch.device, past_length: int = 0
) -> torch.Tensor:
    """Boolean [batch or 1, 1, query, key] mask: causal, padded keys removed, the diagonal always kept.

    With `past_length` P (cached decoding) the `seq_len` queries sit at positions P, …, P + seq_len − 1 and
    the keys at 0, …, P + seq_len − 1; `key_padding_mask` then covers all P + seq_len keys.
    """
    if past_length:
        key_positions = torch.arange(past_length + seq_len, device=device)
        query_positions = torch.arange(past_length, past_length + seq_len, device=device)[:, None]
        causal, diagonal = key_positions <= query_positions, key_positions == query_positions  # [query, key]
    else:
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        diagonal = None
    if key_padding_mask is None:
        return causal[None, None]
    if diagonal is None:
        diagonal = torch.eye(seq_len, dtype=torch.bool, device=device)
    return (causal & key_padding_mask[:, None, None, :].to(device)) | diagonal


def masked_scores(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Pre-softmax activations for analysis: NaN where a position is masked."""
    return scores.masked_fill(~allowed, float("nan"))


class PairwiseScoreMixer(ProjectedMixer):
    """A mixer whose map comes from pairwise scores s_ij = RoPE_i(q_i)·RoPE_j(k_j) / sqrt(d_h).

    Subclasses give the two paths of the same function: `reference_attention` (explicit float32 L×L,
    also used whenever weights or scores are requested, so the returned map is the one applied) and
    `fast_attention` (the training path), plus `forward_cached`, the incremental-decoding path.
    """

    def reference_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns output [batch, heads, seq, d], map A and scores s [batch, heads, seq, seq]."""
        raise NotImplementedError

    def fast_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        past_length: int = 0,
    ) -> torch.Tensor:
        """`past_length` > 0: the queries are the last ones of the key sequence (cached decoding)."""
        raise NotImplementedError

    def forward_cached(self, x: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        """The same function as `forward`, for the new tokens only, reading and extending `inputs.layer_cache`."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        if inputs.layer_cache is not None:
            return self.forward_cached(x, inputs)
        query, key, value = self.project_heads(x, inputs)
        query, key = self.rotate_queries_keys(query, key, inputs)  # [1|batch, heads|kv_heads, seq, head_dim]
        key = self.expand_key_value_heads(key)
        value = self.expand_key_value_heads(value)  # [batch, heads, seq, head_dim]
        return self.attend(query, key, value, inputs)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, inputs: MixerInputs, past_length: int = 0
    ) -> MixerOutput:
        """The map applied to `value` and merged: the reference path when asked for (or for weights/scores),
        else the fast one. query: [1|batch, heads, new, d]; key/value: [.., past_length + new, d]."""
        if inputs.reference or inputs.need_weights or inputs.need_scores:
            allowed = allowed_positions(query.shape[2], inputs.key_padding_mask, value.device, past_length)
            output, weights, scores = self.reference_attention(query, key, value, allowed)
            return MixerOutput(
                self.merge_heads(output),
                weights=weights if inputs.need_weights else None,
                scores=masked_scores(scores, allowed) if inputs.need_scores else None,
            )
        return MixerOutput(
            self.merge_heads(self.fast_attention(query, key, value, inputs.key_padding_mask, past_length))
        )
