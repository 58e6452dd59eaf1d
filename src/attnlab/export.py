"""Export an all-standard attnlab model as plain transformers `Qwen2ForCausalLM` (same weights, same logits)."""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM

from .config import AttnLabConfig


def qwen2_config(config: AttnLabConfig, **overrides) -> Qwen2Config:
    """The `Qwen2Config` that computes the same function as an all-standard, non-QK-norm attnlab config."""
    if set(config.mixer_types) != {"standard"} or config.qk_norm or not config.attention_bias:
        raise ValueError(
            "only an all-standard model with q/k/v biases and no QK-norm is a Qwen2 model; "
            f"this one has mixers {sorted(set(config.mixer_types))}, qk_norm={config.qk_norm}, "
            f"attention_bias={config.attention_bias}"
        )
    options = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    options.update(overrides)
    return Qwen2Config(**options)


def to_qwen2(model, **config_overrides) -> Qwen2ForCausalLM:
    """A `Qwen2ForCausalLM` holding this all-standard model's weights (loaded strictly)."""
    qwen = Qwen2ForCausalLM(qwen2_config(model.config, **config_overrides))
    qwen.load_state_dict(model.state_dict(), strict=True)
    return qwen.train(model.training)
