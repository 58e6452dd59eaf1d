"""`AttnLabCache`: the incremental-decoding state of an attnlab model, one entry per layer (docs/method.md §3, §8).

A transformers `Cache` whose `layers[i]` is chosen by layer i's mixer, so a hybrid pattern keeps each
layer's own kind of state in one object:

  standard, staticembqk  `DynamicLayer` (transformers' KV cache): keys after QK-norm and RoPE, exactly as
                         the mixer uses them, and values, [batch, kv_heads, seen, head_dim]. Grows by one
                         position per token; a decode step costs O(seen·d) per token (docs/method.md §8: 6Bd² + 4BLd).
  rndembqk, fixedseqqk   `SharedMapLayer`: the layer's RoPE'd shadow queries/keys for all L_max positions
                         ([1, heads|kv_heads, L_max, head_dim], batch 1: the map is input-independent and
                         shared by the batch), computed ONCE per cache (= once per `generate` call, from one
                         batch-1 shadow-stream pass at length L_max) by `AttnLabModel`, plus the keys seen so
                         far as a batch-1 view of that table and the values [batch, kv_heads, seen, head_dim]
                         (docs/method.md §8: 2(B+1)Ld bytes at half precision). A fresh cache recomputes the tables, so
                         new weights never meet stale maps.
  approximate            `RecurrentStateLayer` with the order-0/1/2 sums of the Taylor feature map (paper
                         Appx. I): Σv [B,H,1,d_h], Σ1 [B,H,1,1], Σk̃vᵀ [B,H,d_h,d_h], Σk̃ [B,H,d_h,1],
                         Σ(k̃⊗k̃)vᵀ [B,H,d_h²,d_h], Σ(k̃⊗k̃) [B,H,d_h²,1]; constant size, O(d_h³) per head and
                         token. (Spec §8's `6Bd + 4Bd²/h` bytes counts the order-0/1 sums only; the order-2
                         sums dominate: B·h·d_h²·(d_h + 1) entries.)
  nonapprox              `RecurrentStateLayer` with the running max m [B,H], Σexp(s_j − m)·v_j [B,H,d_h] and
                         Σexp(s_j − m) [B,H] (paper eq. 18), float32; constant size (docs/method.md §8:
                         2Bd + 4Bh bytes), O(d) per token, rescaled when m grows so long contexts never overflow.
  mlp                    transformers' `DummyLayer`: the mixer is position-wise, there is nothing to keep.

`get_seq_length()` is the number of tokens the cache has absorbed (all layers see the same tokens; a
recurrent layer has no length of its own). Recurrent states cannot be rolled back, so `crop` (assisted
decoding) is refused for models with approximate/nonapprox layers; beam search (`reorder_cache`) works.

transformers 5.24 renamed the cache from `past_key_values` to `cache` (model outputs, `generate`'s model
keyword arguments, `prepare_inputs_for_generation`). `CACHE_NAME` is the name the installed transformers
uses, read once off its output class; attnlab models accept either name and return the cache under
`CACHE_NAME`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, DummyLayer, DynamicLayer, LinearAttentionCacheLayerMixin
from transformers.modeling_outputs import BaseModelOutputWithPast

if TYPE_CHECKING:
    from .config import AttnLabConfig

CACHE_NAMES = ("cache", "past_key_values")  # transformers ≥ 5.24, then the name before it
CACHE_NAME = next(name for name in CACHE_NAMES if name in BaseModelOutputWithPast.__dataclass_fields__)
ROLLBACK_REFUSAL = (
    "a recurrent (approximate/nonapprox) decode state cannot be rolled back, so assisted decoding cannot use it; "
    "generate without prompt_lookup_num_tokens and assistant_model (or skip those layers: skip_nonstandard=True)"
)


def take_cache(arguments: dict) -> Cache | None:
    """Remove the cache from `arguments` (given under either of `CACHE_NAMES`) and return it, or None.

    Refuses two different caches: one decode state per model call."""
    given = [cache for cache in (arguments.pop(name, None) for name in CACHE_NAMES) if cache is not None]
    if len(given) == 2 and given[0] is not given[1]:
        raise ValueError("two different caches were passed, as cache= and past_key_values=; pass one of them")
    return given[0] if given else None


TAYLOR_STATE_NAMES = ("value_sum", "key_count", "key_value_sum", "key_sum", "key2_value_sum", "key2_sum")
PREFIX_SOFTMAX_STATE_NAMES = ("running_max", "weighted_sum", "weight_sum")


class SharedMapLayer(DynamicLayer):
    """Values per sequence, keys (and queries) shared by the batch: the cache of `rndembqk`/`fixedseqqk`.

    `keys` is [1, kv_heads, seen, head_dim] (batch 1, from the precomputed table), `values`
    [batch, kv_heads, seen, head_dim]; batch operations therefore touch the values only.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.query_table: torch.Tensor | None = None  # [1, heads, L_max, head_dim], RoPE'd
        self.key_table: torch.Tensor | None = None  # [1, kv_heads, L_max, head_dim], RoPE'd

    def set_tables(self, query_table: torch.Tensor, key_table: torch.Tensor) -> None:
        self.query_table, self.key_table = query_table, key_table

    def reset(self) -> None:
        super().reset()
        self.query_table = self.key_table = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.values = self.values[indices, ...]


class RecurrentStateLayer(LinearAttentionCacheLayerMixin):
    """A fixed-size recurrent state: named tensors whose shapes do not depend on the tokens seen.

    Built on transformers' linear-attention cache layer (`recurrent_states[i]`, `has_previous_state[i]`),
    one state index per name; there are no convolution states.
    """

    is_compileable = False  # generate must not build 4-D masks for us (see AttnLabCache.is_compileable)

    def __init__(self, state_names: tuple[str, ...]) -> None:
        super().__init__(number_of_states=len(state_names))
        self.state_names = state_names

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        if recurrent_states is not None:
            self.dtype, self.device = recurrent_states.dtype, recurrent_states.device
            self.is_recurrent_states_initialized[state_idx] = True

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0) -> torch.Tensor:
        raise NotImplementedError("attnlab mixers keep no convolution state")

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        if not self.is_recurrent_states_initialized[state_idx]:
            self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
        self.recurrent_states[state_idx] = recurrent_states
        self.has_previous_state[state_idx] = True
        return recurrent_states

    def get_states(self) -> tuple[torch.Tensor, ...] | None:
        """The state tensors in `state_names` order, or None before the first (prefill) step."""
        if not all(self.has_previous_state.values()):
            return None
        return tuple(self.recurrent_states[i] for i in range(self.number_of_states))

    def set_states(self, states: tuple[torch.Tensor, ...]) -> None:
        for index, state in enumerate(states):
            self.update_recurrent_state(state, index)

    def named_states(self) -> dict[str, torch.Tensor]:
        states = self.get_states() or ()
        return dict(zip(self.state_names, states))

    def reset(self) -> None:
        for index in range(self.number_of_states):
            self.recurrent_states[index] = None
            self.is_recurrent_states_initialized[index] = False
            self.has_previous_state[index] = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda state: state.index_select(0, beam_idx.to(state.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda state: state.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda state: state[indices, ...])

    def _map_batch(self, function) -> None:
        for index in range(self.number_of_states):
            if self.has_previous_state[index]:
                self.recurrent_states[index] = function(self.recurrent_states[index])

    @property
    def is_croppable(self) -> bool:
        """Only while it holds no state (a layer that skip mode never runs): a running sum cannot be rolled back."""
        return not any(self.has_previous_state.values())

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0 and not self.is_croppable:
            raise ValueError(ROLLBACK_REFUSAL)


class AttnLabCache(Cache):
    """One decode state per layer, of the kind its mixer needs (module docstring); built by `generate`."""

    def __init__(self, config: AttnLabConfig) -> None:
        layers = [config.mixer_class(i).cache_layer(config, i) for i in range(config.num_hidden_layers)]
        if config.skip_nonstandard:  # layers that skip mode never runs need no state of their own
            layers = [
                DummyLayer() if state is None and name != "standard" else state
                for name, state in zip(config.mixer_types, layers)
            ]
        if None in layers:
            without = sorted({name for name, layer in zip(config.mixer_types, layers) if layer is None})
            raise ValueError(
                f"mixer(s) {', '.join(without)} keep no decode state (Mixer.cache_layer is None), so there is no "
                "AttnLabCache for this model; generate without a cache (use_cache=False recomputes every step)"
            )
        super().__init__(layers=layers)
        self.mixer_types = list(config.mixer_types)
        self.seen_tokens = 0  # tokens absorbed so far (the position of the next token)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        super().crop(tokens_to_remove)
        self.seen_tokens -= abs(tokens_to_remove)

    @property
    def is_compileable(self) -> bool:
        """False: attnlab layers read the 2-D padding mask, so generate must not build 4-D masks."""
        return False

    def state_shapes(self, layer_idx: int) -> dict[str, tuple[int, ...]]:
        """The shapes of what layer `layer_idx` keeps (empty for `mlp`, or before the first step)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, RecurrentStateLayer):
            return {name: tuple(state.shape) for name, state in layer.named_states().items()}
        if isinstance(layer, DynamicLayer) and layer.is_initialized:
            return {"keys": tuple(layer.keys.shape), "values": tuple(layer.values.shape)}
        return {}
