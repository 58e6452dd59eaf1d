"""Export an all-standard attnlab model as plain transformers Qwen2 / Qwen3 (same weights, same logits)."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from .config import AttnLabConfig


def qwen2_config(config: AttnLabConfig, **overrides) -> Qwen2Config:
    """The `Qwen2Config` that computes the same function as an all-standard, non-QK-norm attnlab config."""
    if config.qk_norm or not config.attention_bias:
        raise ValueError(
            "only an all-standard model with q/k/v biases and no QK-norm is a Qwen2 model; "
            f"this one has qk_norm={config.qk_norm}, attention_bias={config.attention_bias}"
        )
    return Qwen2Config(**{**_backbone_options(config, "Qwen2"), **overrides})


def qwen3_config(config: AttnLabConfig, **overrides) -> Qwen3Config:
    """The `Qwen3Config` that computes the same function as an all-standard QK-norm attnlab config."""
    if not config.qk_norm:
        raise ValueError("only an all-standard model with QK-norm (qk_norm=True) is a Qwen3 model")
    options = {**_backbone_options(config, "Qwen3"), "attention_bias": config.attention_bias}
    return Qwen3Config(**{**options, **overrides})


def to_qwen2(model, **config_overrides) -> Qwen2ForCausalLM:
    """A `Qwen2ForCausalLM` holding this all-standard model's weights (loaded strictly)."""
    return _load_into(Qwen2ForCausalLM(qwen2_config(model.config, **config_overrides)), model)


def to_qwen3(model, **config_overrides) -> Qwen3ForCausalLM:
    """A `Qwen3ForCausalLM` holding this all-standard QK-norm model's weights (loaded strictly)."""
    return _load_into(Qwen3ForCausalLM(qwen3_config(model.config, **config_overrides)), model)


def _backbone_options(config: AttnLabConfig, family: str) -> dict:
    if set(config.mixer_types) != {"standard"}:
        raise ValueError(
            f"only an all-standard model is a {family} model; this one has mixers {sorted(set(config.mixer_types))}"
        )
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim_resolved,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def _load_into(twin, model):
    state = model.state_dict()
    for name, tensor in twin.state_dict().items():
        if name.endswith("self_attn.o_proj.bias") and name not in state:
            # Qwen3's attention_bias also biases o_proj, which attnlab (as Qwen2) has without one: zero is the same
            state[name] = torch.zeros_like(tensor)
    twin.load_state_dict(state, strict=True)
    like = next(model.parameters())
    return twin.to(device=like.device, dtype=like.dtype).train(model.training)
