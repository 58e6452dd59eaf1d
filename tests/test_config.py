"""Layer-pattern resolution (every form, every error) and AttnLabConfig validation."""

from __future__ import annotations

import pytest

from attnlab import BUILTIN_MIXERS, AttnLabConfig, resolve_layer_pattern

S = "standard"


def variant_layers(pattern: str, depth: int) -> list[int]:
    """1-based numbers of the layers that use the variant (not standard)."""
    return [i for i, name in enumerate(resolve_layer_pattern(pattern, depth), start=1) if name != S]


def test_default_is_all_standard():
    assert resolve_layer_pattern(None, 3) == [S, S, S]


@pytest.mark.parametrize("mixer", BUILTIN_MIXERS)
def test_uniform(mixer):
    assert resolve_layer_pattern(f"uniform:{mixer}", 5) == [mixer] * 5


def test_hybrid_puts_the_variant_in_odd_numbered_layers():
    assert resolve_layer_pattern("hybrid:mlp", 6) == ["mlp", S, "mlp", S, "mlp", S]
    assert resolve_layer_pattern("hybrid:mlp", 5) == ["mlp", S, "mlp", S, "mlp"]


def test_explicit_list_and_comma_string_agree():
    names = ["nonapprox", "standard", "rndembqk"]
    assert resolve_layer_pattern(names, 3) == names
    assert resolve_layer_pattern(" nonapprox, standard ,rndembqk ", 3) == names


# Paper Table 11 lists, for 24 layers, the layers that KEEP standard attention; the variant fills the rest.
TABLE_11_STANDARD = {
    "even": set(range(2, 25, 2)),
    "odd": set(range(1, 24, 2)),
    "top": set(range(1, 13)),
    "middle": set(range(1, 7)) | set(range(19, 25)),
    "bottom": set(range(13, 25)),
    "quarter": {4, 8, 12, 16, 20, 24},
    "first": {1},
    "last": {24},
    "bilateral": {1, 24},
}


@pytest.mark.parametrize("placement", sorted(TABLE_11_STANDARD))
def test_placements_match_paper_table_11_at_24_layers(placement):
    resolved = resolve_layer_pattern(f"{placement}:approximate", 24)
    standard = {i for i, name in enumerate(resolved, start=1) if name == S}
    assert standard == TABLE_11_STANDARD[placement]
    assert all(name == "approximate" for name in resolved if name != S)


def test_placements_scale_to_other_depths():
    assert variant_layers("top:mlp", 6) == [4, 5, 6]
    assert variant_layers("bottom:mlp", 6) == [1, 2, 3]
    assert variant_layers("middle:mlp", 8) == [3, 4, 5, 6]
    assert variant_layers("quarter:mlp", 8) == [1, 2, 3, 5, 6, 7]
    assert variant_layers("first:mlp", 4) == [2, 3, 4]
    assert variant_layers("last:mlp", 4) == [1, 2, 3]
    assert variant_layers("bilateral:mlp", 4) == [2, 3]
    assert resolve_layer_pattern("even:mlp", 4) == resolve_layer_pattern("hybrid:mlp", 4)


@pytest.mark.parametrize(
    "pattern, depth, message",
    [
        ("uniform:attention", 4, "unknown mixer 'attention'"),
        ("sideways:mlp", 4, "unknown layer pattern form 'sideways'"),
        ("standard,mlp", 3, "names 2 mixers but the model has num_hidden_layers=3"),
        (["standard", "softmax"], 2, "unknown mixer 'softmax' in layer 2"),
        (42, 2, "must be a string or a list"),
        ("uniform:mlp", 0, "num_hidden_layers must be a positive integer"),
    ],
)
def test_bad_patterns_raise_actionable_errors(pattern, depth, message):
    with pytest.raises(ValueError, match=message):
        resolve_layer_pattern(pattern, depth)


def test_unknown_mixer_error_lists_the_valid_mixers():
    with pytest.raises(ValueError) as error:
        resolve_layer_pattern("uniform:softmax", 2)
    assert all(name in str(error.value) for name in BUILTIN_MIXERS)


def test_config_resolves_layers_into_mixer_types():
    config = AttnLabConfig(num_hidden_layers=4, layers="hybrid:rndembqk")
    assert config.mixer_types == ["rndembqk", S, "rndembqk", S]
    assert AttnLabConfig(num_hidden_layers=2, mixer_types=["mlp", S]).mixer_types == ["mlp", S]


def test_config_does_not_touch_transformers_layer_types():
    config = AttnLabConfig(num_hidden_layers=2, layers="uniform:mlp")
    assert getattr(config, "layer_types", None) is None


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "does not divide hidden_size=100"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads=3 must divide"),
        (dict(num_hidden_layers=2, layers="standard"), "names 1 mixers"),
        (dict(num_hidden_layers=2, layers="uniform:mlp", mixer_types=[S, S]), "pass only one of them"),
        (dict(num_hiden_layers=3), "unknown AttnLabConfig option"),
        (dict(mixer_implementation="turbo"), "mixer_implementation"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(hidden_size=36, num_attention_heads=4), "must be even for RoPE"),
    ],
)
def test_config_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        AttnLabConfig(**options)


def test_head_dim_may_be_set_explicitly():
    config = AttnLabConfig(hidden_size=64, num_attention_heads=2, head_dim=16)
    assert config.head_dim_resolved == 16


def test_mlp_mixer_width_matches_the_standard_mixer_parameters():
    config = AttnLabConfig(hidden_size=896, num_attention_heads=14, num_key_value_heads=14)
    attention_params = 4 * 896 * 896 + 3 * 896  # W_q, W_k, W_v, W_o + q/k/v biases
    assert config.mlp_mixer_size == round(attention_params / (3 * 896))
    gqa = AttnLabConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, attention_bias=False)
    assert gqa.mlp_mixer_size == round((64 * 64 * 2 + 2 * 64 * 32) / (3 * 64))


def test_shadow_seq_len_defaults_to_max_positions():
    assert AttnLabConfig(max_position_embeddings=96).shadow_seq_len == 96
    assert AttnLabConfig(max_position_embeddings=96, shadow_seq_len=32).shadow_seq_len == 32
