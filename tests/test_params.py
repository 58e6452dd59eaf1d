"""Parameter counts of the variants, presets, and the `attnlab params` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from attnlab import AttnLabConfig, AttnLabForCausalLM
from attnlab.cli import main
from attnlab.params import count_parameters, variant_counts
from attnlab.presets import PAPER_PRESETS, load_preset, model_options, preset_names


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_variants_have_the_same_size_within_a_tenth_of_a_percent(preset):
    counts = variant_counts(model_options(preset))
    standard = next(count.uniform for count in counts if count.mixer == "standard")
    for count in counts:
        assert abs(count.uniform - standard) / standard < 1e-3, count
        assert abs(count.hybrid - standard) / standard < 1e-3, count


def test_paper_preset_sizes_match_their_names():
    millions = {name: count_parameters(AttnLabConfig(**model_options(name))) / 1e6 for name in PAPER_PRESETS}
    assert 70 <= millions["paper-70m"] <= 80
    assert 150 <= millions["paper-160m"] <= 200
    assert 450 <= millions["paper-500m"] <= 520
    assert 1600 <= millions["qwen3-1.7b"] <= 1800


def test_meta_count_equals_a_real_model_count():
    config = AttnLabConfig(**model_options("cpu-tiny"), layers="hybrid:rndembqk")
    real = AttnLabForCausalLM(config)
    assert count_parameters(config) == sum(p.numel() for p in real.parameters())


def test_standard_count_matches_the_formula():
    """Embeddings + per layer (attention with q/k/v biases + SwiGLU + two norms) + final norm (+ head)."""
    d, m, layers, vocab = 128, 512, 4, 4096
    per_layer = 4 * d * d + 3 * d + 3 * d * m + 2 * d
    expected = vocab * d + layers * per_layer + d
    assert count_parameters(AttnLabConfig(**model_options("cpu-tiny"))) == expected
    untied = AttnLabConfig(**{**model_options("cpu-tiny"), "tie_word_embeddings": False})
    assert count_parameters(untied) == expected + vocab * d


def test_presets_are_valid_configs():
    assert {"cpu-tiny", *PAPER_PRESETS} <= set(preset_names())
    for name in preset_names():
        AttnLabConfig(**model_options(name))
    assert model_options("qwen3-1.7b")["qk_norm"] is True
    assert load_preset("paper-500m")["model"]["num_hidden_layers"] == 24


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="available presets: cpu-tiny"):
        load_preset("paper-7b")


def test_params_command_prints_every_variant(capsys):
    assert main(["params", "--preset", "cpu-tiny", "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)["cpu-tiny"]
    assert [row["mixer"] for row in table][:2] == ["standard", "mlp"]
    assert len(table) == 7
    assert table[0]["uniform"] == count_parameters(AttnLabConfig(**model_options("cpu-tiny")))


def test_params_command_accepts_architecture_flags(capsys):
    assert main(["params", "--hidden-size", "64", "--num-key-value-heads", "2", "--no-tie-word-embeddings"]) == 0
    out = capsys.readouterr().out
    assert "hidden_size=64" in out and "| nonapprox |" in out
    expected = count_parameters(
        AttnLabConfig(
            **{**model_options("cpu-tiny"), "hidden_size": 64, "num_key_value_heads": 2, "tie_word_embeddings": False}
        )
    )
    assert f"{expected / 1e6:,.3f}M" in out


def test_bad_input_gives_one_line_and_exit_status_2():
    result = subprocess.run(
        [sys.executable, "-m", "attnlab", "params", "--num-attention-heads", "3"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "attnlab: error: num_attention_heads=3 does not divide hidden_size=128; "
        "choose a head count that divides the width (or set head_dim explicitly)"
    ]
    assert "Traceback" not in result.stderr


def test_a_model_too_large_to_build_is_one_line(capsys):
    assert main(["params", "--hidden-size", "100000000000"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert error.startswith("attnlab: error: cpu-tiny with hidden_size=100000000000: cannot build this model (")


def test_meta_device_uses_no_memory():
    with torch.device("meta"):
        model = AttnLabForCausalLM(AttnLabConfig(**model_options("paper-500m"), layers="hybrid:rndembqk"))
    assert all(p.is_meta for p in model.parameters())
