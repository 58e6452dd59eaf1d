"""The attnlab decoder: Qwen2.5's pre-norm stack with a chosen mixer in each layer (docs/method.md §2–3).

    h = h + Mixer_l(RMSNorm_l^attn(h));   h = h + SwiGLU_l(RMSNorm_l^mlp(h));   logits = LMHead(RMSNorm(h))

Three model-level pieces serve the variants whose queries/keys come from somewhere other than the layer's
own input: the static embeddings `e = Emb(t)` (`staticembqk`), and two *shadow streams* — a fixed random
sequence (`rndembqk`) and a fixed token sequence (`fixedseqqk`) — that run through the same layers, once
per forward with batch 1, so each layer's map is computed once and shared by the batch. Every Q/K source
passes through the layer's own attention pre-norm. Skip mode runs only the standard layers.

On the fast path a single shadow stream runs as one more row of the batch (`AttnLabModel._with_shadow_row`):
in a layer of its mixer the shadow row's own attention has exactly the map the batch uses (docs/method.md §3: there
the stream attends over itself), so one map per head serves the row and the batch; the row leaves after the
last layer that reads it. The reference path, requested maps or scores, a cache, and models with both
shadow mixers run each stream on its own (`AttnLabModel._shadow_stream`).

Incremental decoding: `generate` builds one `AttnLabCache` (attnlab.cache) holding each layer's own state —
a KV cache for standard/staticembqk, shared shadow queries/keys plus a value cache for rndembqk/fixedseqqk
(computed once per cache), O(1) running sums for approximate and nonapprox, nothing for mlp — and each
forward then runs only the new tokens. `use_cache=False` recomputes the whole sequence every step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation import GenerationMode
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from .cache import CACHE_NAME, ROLLBACK_REFUSAL, AttnLabCache, RecurrentStateLayer, take_cache
from .config import AttnLabConfig
from .losses import fused_causal_lm_loss
from .mixers import MixerInputs, MixerOutput, build_mixer
from .mixers.base import SHADOW_SOURCES
from .modules import RMSNorm, RotaryEmbedding, SwiGLU


@dataclass
class AttnLabModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `mixer_scores`: each layer's pre-softmax activations (or None)."""

    mixer_scores: tuple[torch.Tensor | None, ...] | None = None


@dataclass
class AttnLabCausalLMOutput(CausalLMOutputWithPast):
    mixer_scores: tuple[torch.Tensor | None, ...] | None = None


@dataclass
class _StreamInputs:
    """What one pass through the stack shares across its layers."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    key_padding_mask: torch.Tensor | None
    static_embeddings: torch.Tensor  # e = Emb(t): [batch, seq, hidden]
    shadow_states: dict[str, dict[int, torch.Tensor]]  # source → {layer index: that layer's shadow input}
    shadow_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    reference: bool
    need_weights: bool = False
    need_scores: bool = False
    cache: AttnLabCache | None = None  # incremental decoding: the tokens of this pass follow `past_length` others
    past_length: int = 0
    # The fast path's shadow row (`AttnLabModel._with_shadow_row`): row 0 of the hidden states is the shadow
    # stream of `shadow_row_source` until the layer `last_shadow_layer` drops it; then `without_shadow_row`
    # (the same pass for the batch rows alone) serves the layers that follow.
    shadow_row_source: str | None = None
    last_shadow_layer: int = -1
    without_shadow_row: _StreamInputs | None = None


class AttnLabDecoderLayer(GradientCheckpointingLayer):
    """One pre-norm block; the mixer sits in the `self_attn` slot whatever its kind.

    With activation checkpointing on (`model.activation_checkpointing_enable()`) a training forward keeps only
    the block's input and recomputes the rest in backward (transformers' `GradientCheckpointingLayer`).
    """

    def __init__(self, config: AttnLabConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_type = config.mixer_types[layer_idx]
        self.self_attn = build_mixer(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, stream: _StreamInputs) -> tuple[torch.Tensor, MixerOutput]:
        source_kind = self.self_attn.qk_source
        reference = stream.reference
        normed = self.input_layernorm(hidden_states, reference)  # x = RMSNorm_l(h): [batch (+1), seq, hidden]
        qk_source, qk_positions = None, None
        if source_kind == "static_embeddings":
            qk_source = self.input_layernorm(stream.static_embeddings, reference)
        elif source_kind is not None and source_kind == stream.shadow_row_source:  # row 0: Q/K of every row
            qk_source, qk_positions = normed[:1], stream.shadow_position_embeddings
            if self.layer_idx == stream.last_shadow_layer:  # no later layer reads the shadow row
                hidden_states, normed, stream = hidden_states[1:], normed[1:], stream.without_shadow_row
        elif source_kind in stream.shadow_states:  # absent inside the shadow stream itself: attend as standard
            qk_source = self.input_layernorm(stream.shadow_states[source_kind][self.layer_idx], reference)
            qk_positions = stream.shadow_position_embeddings
        mixed = self.self_attn(
            normed,
            MixerInputs(
                position_embeddings=stream.position_embeddings,
                key_padding_mask=stream.key_padding_mask,
                qk_source=qk_source,
                qk_position_embeddings=qk_positions,
                reference=stream.reference,
                need_weights=stream.need_weights,
                need_scores=stream.need_scores,
                layer_cache=None if stream.cache is None else stream.cache.layers[self.layer_idx],
                past_length=stream.past_length,
            ),
        )
        hidden_states = hidden_states + mixed.hidden_states
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states, reference))
        return hidden_states, mixed


class AttnLabPreTrainedModel(PreTrainedModel):
    config_class = AttnLabConfig
    config: AttnLabConfig
    base_model_prefix = "model"
    _no_split_modules = ["AttnLabDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = False
    supports_gradient_checkpointing = True

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, every_n_layers=1):
        """transformers' hook for `activation_checkpointing_enable`; refuses reentrant checkpointing, which
        would cut the tensors a layer reads from outside its positional input (static embeddings,
        shadow-stream states) out of the graph: their gradients would silently go missing."""
        if enable and getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "attnlab layers read tensors besides their input (static embeddings, shadow-stream states), which "
                "reentrant checkpointing cuts from the graph; enable it with use_reentrant=False (the default)"
            )
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Embedding: N(0, initializer_range); norms: ones
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        if isinstance(module, AttnLabModel):
            if module.shadow_noise is not None:
                init.copy_(module.shadow_noise, default_shadow_noise(self.config))
            if module.shadow_token_ids is not None:
                init.copy_(module.shadow_token_ids, default_fixed_sequence(self.config))


def default_shadow_noise(config: AttnLabConfig) -> torch.Tensor:
    """ε ~ N(0, 1) of shape [L_max, hidden], drawn on the CPU from `config.shadow_noise_seed` (docs/method.md §3,
    σ = 1)."""
    generator = torch.Generator(device="cpu").manual_seed(config.shadow_noise_seed)
    return torch.randn(config.shadow_seq_len, config.hidden_size, generator=generator, device="cpu")


def default_fixed_sequence(config: AttnLabConfig) -> torch.Tensor:
    """The documented default t_s for `fixedseqqk` when no corpus was given: L_max ids drawn uniformly
    from the vocabulary with `config.fixed_sequence_seed`. Training replaces it with corpus tokens."""
    generator = torch.Generator(device="cpu").manual_seed(config.fixed_sequence_seed)
    return torch.randint(0, config.vocab_size, (config.shadow_seq_len,), generator=generator, device="cpu")


class AttnLabModel(AttnLabPreTrainedModel):
    """The decoder stack without the LM head."""

    def __init__(self, config: AttnLabConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(AttnLabDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim_resolved, config.rope_theta)
        sources = {layer.self_attn.qk_source for layer in self.layers}
        # Fixed shadow inputs are persistent buffers (saved with the model); filled in by `_init_weights`.
        self.shadow_noise = (
            nn.Buffer(torch.empty(config.shadow_seq_len, config.hidden_size)) if "shadow_noise" in sources else None
        )
        self.shadow_token_ids = (
            nn.Buffer(torch.zeros(config.shadow_seq_len, dtype=torch.long)) if "shadow_tokens" in sources else None
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @torch.no_grad()
    def set_fixed_sequence(self, token_ids: torch.Tensor | list[int], source: str) -> None:
        """Set the `fixedseqqk` shadow sequence t_s (L_max token ids) and record where it came from."""
        if self.shadow_token_ids is None:
            raise ValueError("this model has no fixedseqqk layer, so it has no fixed sequence to set")
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        if token_ids.shape != self.shadow_token_ids.shape:
            raise ValueError(
                f"the fixed sequence must hold exactly shadow_seq_len={self.config.shadow_seq_len} token ids, "
                f"got shape {tuple(token_ids.shape)}"
            )
        if token_ids.min() < 0 or token_ids.max() >= self.config.vocab_size:
            raise ValueError(f"fixed-sequence token ids must lie in [0, {self.config.vocab_size})")
        self.shadow_token_ids.copy_(token_ids)
        self.config.fixed_sequence_source = source

    def active_layers(self) -> list[AttnLabDecoderLayer]:
        """The layers a forward runs: all of them, or only the standard ones in skip mode."""
        if self.config.skip_nonstandard:
            return [layer for layer in self.layers if layer.mixer_type == "standard"]
        return list(self.layers)

    def _shadow_stream(
        self, source: str, layers: list[AttnLabDecoderLayer], seq_len: int, reference: bool
    ) -> tuple[dict[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Run the fixed shadow input (batch 1, positions 0..L−1) through `layers`, with gradients.

        Returns each layer's input X_{l−1} (indexed by layer number) and the stream's RoPE tables.
        Inside the stream a `rndembqk`/`fixedseqqk` layer attends over the shadow sequence itself.
        """
        hidden = self._shadow_input(source, seq_len)  # [1, seq, hidden]
        positions = self.rotary_emb(hidden, torch.arange(seq_len, device=hidden.device)[None])
        stream = _StreamInputs(
            position_embeddings=positions,
            key_padding_mask=None,
            static_embeddings=hidden,
            shadow_states={},
            shadow_position_embeddings=None,
            reference=reference,
        )
        last_user = max(i for i, layer in enumerate(layers) if layer.self_attn.qk_source == source)
        states: dict[int, torch.Tensor] = {}
        for layer in layers[:last_user]:
            states[layer.layer_idx] = hidden
            hidden, _ = layer(hidden, stream)
        states[layers[last_user].layer_idx] = hidden  # the last user needs only its input
        return states, positions

    def _shadow_input(self, source: str, seq_len: int) -> torch.Tensor:
        """X_0 of a shadow stream at positions 0..seq_len−1: ε (`rndembqk`) or Emb(t_s) (`fixedseqqk`), [1, seq, d]."""
        self._check_shadow_length(seq_len)
        if source == "shadow_noise":
            return self.shadow_noise[:seq_len].to(self.embed_tokens.weight.dtype)[None]
        return self.embed_tokens(self.shadow_token_ids[:seq_len])[None]

    def _with_shadow_row(
        self, source: str, layers: list[AttnLabDecoderLayer], stream: _StreamInputs, default_positions: bool
    ) -> tuple[torch.Tensor, _StreamInputs]:
        """The hidden states and the pass of the fast path with the shadow stream of `source` as row 0.

        Every layer treats rows independently except a layer of `source`, where row 0 gives the queries and
        keys of every row, its own included: that is the shadow stream's own attention (docs/method.md §3), with the
        map the batch uses, so the layer computes one map per head for the stream and the batch
        (`standard.shared_map_attention`) where separate streams compute it twice. The shadow row keeps
        positions 0..L−1; the last layer of `source` drops it after taking its queries and keys.
        """
        batch_embeddings = stream.static_embeddings  # e = Emb(t): [batch, seq, hidden]
        batch, seq_len, _ = batch_embeddings.shape
        shadow = self._shadow_input(source, seq_len)  # X_0: [1, seq, hidden]
        rows = torch.cat([shadow, batch_embeddings])  # [1 + batch, seq, hidden]
        shadow_positions = positions = stream.position_embeddings  # default positions: the same tables
        if not default_positions:
            shadow_positions = self.rotary_emb(shadow, torch.arange(seq_len, device=shadow.device)[None])
            positions = tuple(
                torch.cat([own, table.expand(batch, -1, -1)]) for own, table in zip(shadow_positions, positions)
            )  # [1 + batch, seq, head_dim]
        padding = stream.key_padding_mask
        if padding is not None:
            padding = torch.cat([padding.new_ones(1, seq_len), padding])  # [1 + batch, seq]
        batch_only = replace(stream, shadow_position_embeddings=shadow_positions)
        joint = replace(
            batch_only,
            position_embeddings=positions,
            key_padding_mask=padding,
            static_embeddings=rows,  # inside the shadow stream e is X_0
            shadow_row_source=source,
            last_shadow_layer=max(layer.layer_idx for layer in layers if layer.self_attn.qk_source == source),
            without_shadow_row=batch_only,
        )
        return rows, joint

    def _check_shadow_length(self, seq_len: int) -> None:
        if seq_len > self.config.shadow_seq_len:
            raise ValueError(
                f"input length {seq_len} exceeds shadow_seq_len={self.config.shadow_seq_len}, the length of the "
                "fixed sequence that rndembqk/fixedseqqk maps come from; use shorter inputs or a model built "
                "with a larger shadow_seq_len"
            )

    def _fill_shadow_tables(
        self, cache: AttnLabCache, layers: list[AttnLabDecoderLayer], total_len: int, reference: bool
    ) -> None:
        """Give every rndembqk/fixedseqqk layer of `cache` its RoPE'd shadow queries/keys, once per cache.

        One batch-1 shadow-stream pass per source at the full length L_max (the map of a length-L input is
        the top-left L×L block, docs/method.md §3), so no later step of the same cache runs the stream again; a new
        cache (a new `generate` call) recomputes them, so changed weights never meet stale maps.
        """
        for source in SHADOW_SOURCES:
            users = [layer for layer in layers if layer.self_attn.qk_source == source]
            if not users:
                continue
            self._check_shadow_length(total_len)
            if cache.layers[users[0].layer_idx].query_table is not None:
                continue
            states, positions = self._shadow_stream(source, layers, self.config.shadow_seq_len, reference)
            for layer in users:
                source_states = layer.input_layernorm(states[layer.layer_idx], reference)
                tables = layer.self_attn.rotated_queries_keys(source_states, positions, reference)
                cache.layers[layer.layer_idx].set_tables(*tables)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: AttnLabCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_mixer_scores: bool = False,
        mixer_implementation: str | None = None,
        past_key_values: AttnLabCache | None = None,
        **kwargs,
    ) -> AttnLabModelOutput:
        """With `cache` (an `AttnLabCache`, or a new one when `use_cache=True`; `past_key_values` is the same
        argument under its name before transformers 5.24) the inputs are the tokens after the cached ones,
        `attention_mask` covers the cached and the new tokens ([batch, past + seq]), and the updated cache is
        returned under `attnlab.cache.CACHE_NAME`, the installed transformers' name for it."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        given_cache = take_cache({"cache": cache, "past_key_values": past_key_values})
        if given_cache is not None and not isinstance(given_cache, AttnLabCache):
            raise ValueError(
                f"attnlab models decode with their own per-layer cache; pass an attnlab.cache.AttnLabCache (or "
                f"use_cache=True and no cache), not a {type(given_cache).__name__}"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = given_cache if given_cache is not None else AttnLabCache(self.config) if use_cache else None
        training_with_cache = cache is not None and self.training and torch.is_grad_enabled()
        if training_with_cache and any(layer.gradient_checkpointing for layer in self.layers):
            raise ValueError(
                "activation checkpointing recomputes each layer in backward, which would write the decode "
                "cache twice; train with use_cache=False, or call model.eval() to decode"
            )
        past_length = 0 if cache is None else cache.get_seq_length()
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        implementation = mixer_implementation or self.config.mixer_implementation
        if implementation not in ("fast", "reference"):
            raise ValueError(f"mixer_implementation must be 'fast' or 'reference', got {implementation!r}")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # e = Emb(t): [batch, seq, hidden]
        batch, seq_len, _ = inputs_embeds.shape
        default_positions = position_ids is None
        if default_positions:  # one RoPE table for the batch
            position_ids = torch.arange(past_length, past_length + seq_len, device=inputs_embeds.device)[None]
        key_padding_mask = _key_padding_mask(attention_mask, batch, past_length + seq_len)

        layers = self.active_layers()
        reference = implementation == "reference"
        sources = [source for source in SHADOW_SOURCES if any(layer.self_attn.qk_source == source for layer in layers)]
        shadow_row = (  # the fast path's joint pass (module docstring)
            len(sources) == 1
            and cache is None
            and not (reference or output_attentions or output_mixer_scores)
            and inputs_embeds.dtype == self.embed_tokens.weight.dtype
        )
        shadow_states: dict[str, dict[int, torch.Tensor]] = {}
        shadow_positions = None
        if cache is not None:
            self._fill_shadow_tables(cache, layers, past_length + seq_len, reference)
        elif not shadow_row:
            for source in sources:
                shadow_states[source], shadow_positions = self._shadow_stream(source, layers, seq_len, reference)
        stream = _StreamInputs(
            position_embeddings=self.rotary_emb(inputs_embeds, position_ids),
            key_padding_mask=key_padding_mask,
            static_embeddings=inputs_embeds,
            shadow_states=shadow_states,
            shadow_position_embeddings=shadow_positions,
            reference=reference,
            need_weights=output_attentions,
            need_scores=output_mixer_scores,
            cache=cache,
            past_length=past_length,
        )

        hidden_states = inputs_embeds
        if shadow_row:
            hidden_states, stream = self._with_shadow_row(sources[0], layers, stream, default_positions)
        # HF convention for hidden_states: every layer's input (the first is the embedding output), then the
        # final normed output.
        all_hidden_states, all_weights, all_scores = [], [], []
        for layer in layers:
            all_hidden_states.append(hidden_states[1:] if stream.shadow_row_source else hidden_states)
            hidden_states, mixed = layer(hidden_states, stream)
            if layer.layer_idx == stream.last_shadow_layer:  # the layer dropped the shadow row
                stream = stream.without_shadow_row
            all_weights.append(mixed.weights)
            all_scores.append(mixed.scores)
        hidden_states = self.norm(hidden_states, reference)
        all_hidden_states.append(hidden_states)
        if cache is not None:
            cache.seen_tokens += seq_len
        return AttnLabModelOutput(
            last_hidden_state=hidden_states,
            **{CACHE_NAME: cache},
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_weights) if output_attentions else None,
            mixer_scores=tuple(all_scores) if output_mixer_scores else None,
        )


def _key_padding_mask(attention_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """HF's 2-D attention mask (1 = token, 0 = padding) as a bool mask, or None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape != (batch, seq_len):
        raise ValueError(
            f"attention_mask must have shape [batch, seq] = {(batch, seq_len)} (1 for tokens, 0 for padding); "
            f"got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


def _loss_options(kwargs: dict) -> dict:
    """The keyword arguments of transformers' `ForCausalLMLoss` that the fused loss takes too."""
    return {key: kwargs[key] for key in ("ignore_index", "num_items_in_batch", "shift_labels") if key in kwargs}


class AttnLabForCausalLM(AttnLabPreTrainedModel, GenerationMixin):
    """The attnlab decoder with its LM head; HF-native (`from_pretrained`, `generate`, safetensors)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AttnLabConfig) -> None:
        super().__init__(config)
        self.model = AttnLabModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # `config.use_cache` stays False so training forwards build no cache; `generate` decodes
        # incrementally unless told `use_cache=False` (or a saved generation config says otherwise).
        if self.generation_config is not None:
            self.generation_config.use_cache = True

    def adjust_generation_fn(self, *args, **kwargs) -> None:
        """`from_pretrained`'s hook for the generation config. A folder without generation_config.json gets
        one built from config.json, whose `use_cache=False` is the training default: decode incrementally
        then too, as a new model does."""
        super().adjust_generation_fn(*args, **kwargs)
        if self.generation_config is not None and self.generation_config._from_model_config:
            self.generation_config.use_cache = True

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, **kwargs
    ):
        """transformers' resize, refused when the `fixedseqqk` fixed sequence holds ids the new vocabulary drops."""
        token_ids = self.model.shadow_token_ids
        if new_num_tokens is not None and token_ids is not None:
            size = (
                new_num_tokens
                if not pad_to_multiple_of
                else -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
            )
            if int(token_ids.max()) >= size:
                raise ValueError(
                    f"the fixedseqqk fixed sequence holds token id {int(token_ids.max())}, outside a vocabulary of "
                    f"{size}; set a new one first with model.model.set_fixed_sequence(ids, source)"
                )
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs) -> None:
        """`generate`'s hook for building the cache: an `AttnLabCache` (one state per layer, of its mixer's
        kind), instead of transformers' `DynamicCache`, which has no place for recurrent states. The cache
        goes into `model_kwargs` under the installed transformers' name for it (`CACHE_NAME`), whichever name
        the caller used; assisted decoding is refused up front when a running layer keeps a running sum.
        When a running layer's mixer keeps no decode state (`Mixer.cache_layer` is None), generation runs
        without a cache and recomputes the whole sequence every step."""
        user_cache = take_cache(model_kwargs)
        if user_cache is not None and not isinstance(user_cache, AttnLabCache):
            raise ValueError(
                f"attnlab models decode with attnlab.cache.AttnLabCache, not {type(user_cache).__name__}; "
                "pass AttnLabCache(model.config) or no cache"
            )
        use_cache = user_cache is not None or generation_config.use_cache is not False
        layers = self.model.active_layers()
        states = [layer.self_attn.cache_layer(self.config, layer.layer_idx) for layer in layers]
        if user_cache is None and None in states:  # a mixer without a decode state: recompute every step
            generation_config.use_cache = use_cache = False
        running_sums = any(isinstance(state, RecurrentStateLayer) for state in states)
        if use_cache and running_sums and generation_mode == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(ROLLBACK_REFUSAL)
        if user_cache is None and use_cache:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported: attnlab "
                    "models keep their own per-layer cache (leave cache_implementation unset)"
                )
            model_kwargs[CACHE_NAME] = AttnLabCache(self.config)
            return
        if user_cache is not None:
            model_kwargs[CACHE_NAME] = user_cache
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: AttnLabCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_mixer_scores: bool = False,
        mixer_implementation: str | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        past_key_values: AttnLabCache | None = None,
        **kwargs,
    ) -> AttnLabCausalLMOutput:
        """Logits (and the shifted next-token loss when `labels` are given; -100 labels are ignored).

        `return_logits=False` returns `logits=None` and, with `labels`, computes the loss fused with the LM
        head (`losses.fused_causal_lm_loss`: the same loss and gradients, without the [batch, seq, vocab]
        logits; the training path). Loss keyword arguments (`num_items_in_batch`, `ignore_index`,
        `shift_labels`) are those of transformers' `ForCausalLMLoss` on either path.
        `output_attentions=True` returns each layer's applied mixing matrix [batch, heads, seq, seq]
        (None for `mlp` layers); `output_mixer_scores=True` each layer's pre-softmax activations (docs/method.md §6);
        `mixer_implementation="reference"` runs every mixer's explicit float32 reference path.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_mixer_scores=output_mixer_scores,
            mixer_implementation=mixer_implementation,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = loss = None
        if return_logits:
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        elif labels is not None:
            loss = fused_causal_lm_loss(hidden_states, self.lm_head.weight, labels, **_loss_options(kwargs))
        return AttnLabCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            mixer_scores=outputs.mixer_scores,
        )
