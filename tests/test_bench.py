"""`attnlab bench` and the analytic costs (`Mixer.cost`): no timed assertions, tiny settings only."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnlab import AttnLabForCausalLM
from attnlab.bench import (
    BenchSettings,
    bench_config,
    layer_cache_bytes,
    minor_page_faults,
    model_forward_flops,
    new_cache,
    reset_resident_peak,
    run_bench,
    shadow_rows,
    take_turns,
)
from attnlab.cli import build_parser, main
from attnlab.environment import installed_version
from attnlab.mixers import BUILTIN_MIXERS, get_mixer

from .conftest import tiny_config

TINY_MODEL = {
    "vocab_size": 61,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_bench_writes_well_formed_results(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1000000")  # the allocator's tunables are recorded with the run
    settings = BenchSettings(
        model_overrides=TINY_MODEL,
        mixers=("standard", "nonapprox"),
        contexts=(8, 16),
        repeats=1,
        warmup=1,
        against_hf=True,
        threads=1,
        train_batch_size=2,
        train_seq_len=(16,),
        decode_tokens=2,
        matmul_size=256,
    )
    assert run_bench(settings, tmp_path)["files"] == ["bench.json", "bench.md", "decode.png"]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {"environment", "settings", "config", "train", "prefill", "decode", "decode_spread", "cache"} <= set(results)
    assert results["environment"]["threads"] == 1 and results["environment"]["torch"] == installed_version("torch")
    assert results["environment"]["allocator_environment"]["MALLOC_TOP_PAD_"] == "1000000"
    train = results["train"]["lengths"]["16"]
    for key in ("attnlab_tokens_per_s", "hf_qwen2_tokens_per_s", "ratio"):
        assert math.isfinite(train[key]) and train[key] > 0
    for name in ("standard", "nonapprox"):
        assert set(train["mixers"][name]) >= {"tokens_per_s", "mfu", "model_flops_per_step", "page_faults_per_step"}
        for section in ("prefill", "decode", "cache"):
            assert set(results[section][name]) == {"8", "16"}
        for context in ("8", "16"):
            assert results["decode"][name][context] > 0
            assert results["prefill"][name][context]["seconds"] > 0
            assert results["prefill"][name][context]["peak_memory_bytes"] > 0
            assert results["cache"][name][context]["match"]
    sections = ("train", "prefill", "decode", "decode_spread", "cache")
    numbers = list(_numbers({key: results[key] for key in sections}))
    assert numbers and all(math.isfinite(value) and value >= 0 for value in numbers)
    markdown = (tmp_path / "bench.md").read_text()
    assert "Memory allocator environment: " in markdown and "MALLOC_TOP_PAD_=1000000" in markdown
    assert "| standard |" in markdown and "Qwen2" in markdown and "page faults / step" in markdown
    assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The smallest run of one section: a second or two on one CPU thread.
TINY_BENCH = {
    "model_overrides": TINY_MODEL,
    "mixers": ("mlp",),
    "contexts": (8,),
    "repeats": 1,
    "warmup": 0,
    "threads": 1,
    "train_batch_size": 2,
    "train_seq_len": (16,),
    "decode_tokens": 1,
    "matmul_size": 64,
}


@pytest.mark.parametrize("section", ["train", "prefill", "cache"])
def test_a_bench_without_decode_names_only_the_files_it_wrote(tmp_path, section):
    results = run_bench(BenchSettings(**TINY_BENCH, sections=(section,)), tmp_path)
    assert results["files"] == ["bench.json", "bench.md"]
    assert sorted(path.name for path in tmp_path.iterdir()) == results["files"]  # no decode.png


def test_bf16_training_is_recorded_with_a_bf16_yardstick(tmp_path):
    """--bf16 trains under bf16 autocast (as the trainer does on CUDA): finite losses, and the dtype and the MFU
    yardstick's matmul dtype say so."""
    results = run_bench(BenchSettings(**TINY_BENCH, sections=("train",), bf16=True), tmp_path)
    environment = results["environment"]
    assert environment["dtype"] == "float32 weights, bfloat16 autocast in training"
    assert environment["matmul_peak"]["dtype"] == "bfloat16"
    assert all(row["tokens_per_s"] > 0 for row in results["train"]["lengths"]["16"]["mixers"].values())
    assert "bfloat16 matmul peak" in (tmp_path / "bench.md").read_text()


def test_the_hf_comparison_shows_the_standard_row_it_divides_by(tmp_path):
    results = run_bench(BenchSettings(**TINY_BENCH, sections=("train",), against_hf=True), tmp_path)
    train = results["train"]["lengths"]["16"]
    assert list(train["mixers"]) == ["standard", "mlp"]  # standard measured for the ratio, so reported
    assert train["attnlab_tokens_per_s"] == train["mixers"]["standard"]["tokens_per_s"]
    assert results["settings"]["mixers"] == ["mlp"]  # what was asked for: prefill/decode/cache measure only it
    markdown = (tmp_path / "bench.md").read_text()
    rows = [line.split(" | ")[2] for line in markdown.splitlines() if line.startswith("| ")]
    assert rows == ["model", "standard", "mlp", "hf_qwen2 (sdpa)"]
    saved = json.loads((tmp_path / "bench.json").read_text())["train"]["lengths"]["16"]
    assert saved["mixers"].keys() == {"standard", "mlp"} and saved["batch_size"] == 2  # the explicit batch size wins
    assert "B = 2 sequences per step (--train-batch-size)" in markdown


def test_bench_cli_rejects_unknown_mixer(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--mixers", "standard,nope"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("attnlab: error:") and "nope" in error and "\n" not in error


@pytest.mark.parametrize("mixer", BUILTIN_MIXERS)
def test_measured_cache_bytes_equal_the_formula(mixer):
    config = tiny_config(layers=f"uniform:{mixer}", num_key_value_heads=2)  # GQA: d_kv ≠ d
    torch.manual_seed(0)
    model = AttnLabForCausalLM(config).eval()
    batch, context = 2, 5
    ids = torch.randint(0, config.vocab_size, (batch, context + 1))
    cache = new_cache(model, context + 1)
    with torch.no_grad():
        model(ids[:, :context], cache=cache, use_cache=True)
        measured = [layer_cache_bytes(layer) for layer in cache.layers]
        assert measured == [get_mixer(mixer).cost(config, batch, context, dtype_bytes=4).cache_bytes] * 2
        model(ids[:, context:], cache=cache, use_cache=True)  # one decode step
        measured = [layer_cache_bytes(layer) for layer in cache.layers]
        assert measured == [get_mixer(mixer).cost(config, batch, context + 1, dtype_bytes=4).cache_bytes] * 2


def test_analytic_costs_match_hand_counts():
    # d = 8, h = 2 heads of d_h = 4, B = 1, L = 3. Projections: four 8×8 matrices, 2·64 FLOPs each per token
    # → 512 per token, 1536 for the prefill. mlp width m = round((4·64 + 3·8) / 24) = 12. L_max = 16.
    config = tiny_config(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    assert config.mlp_mixer_size == 12

    def cost(name, **options):
        return get_mixer(name).cost(config, 1, 3, **options)

    for name in ("standard", "staticembqk"):
        # prefill 1536 + QKᵀ and AV, dense: 2 heads · 2·(3·3·4) · 2 = 288; decode 512 + 2 heads · 2·2·(4 keys · 4)
        assert cost(name) == get_mixer(name).cost(config, 1, 3)
        assert (cost(name).prefill_flops, cost(name).decode_flops_per_token, cost(name).cache_bytes) == (1824, 640, 96)
    mlp = cost("mlp")  # 6·3·8·12, 6·8·12, nothing cached
    assert (mlp.prefill_flops, mlp.decode_flops_per_token, mlp.cache_bytes) == (1728, 576, 0)
    # nonapprox: scores 2·3·4 + folds 2·3·4 + chunk weights·v 2·9·4 = 120 per head; decode 6·4 per head;
    # state: max, normaliser and a 4-wide sum per head in float32 = 2 · 6 · 4 bytes whatever the dtype.
    nonapprox = cost("nonapprox")
    assert (nonapprox.prefill_flops, nonapprox.decode_flops_per_token, nonapprox.cache_bytes) == (1776, 560, 48)
    # approximate: one chunk (size 2·d_h² = 32 ≥ 3): within 4·9·4 = 144, fold 3 keys · 2·(64 + 16) = 480 per head;
    # decode per head: within 4·4, read 2·(64 + 32 + 4), fold 2·(64 + 16) = 376; state 2·5·21 entries.
    approximate = cost("approximate")
    assert (approximate.prefill_flops, approximate.decode_flops_per_token, approximate.cache_bytes) == (2784, 1264, 420)
    # training forward, the blocked kernel: one block of 8 rows (3 tokens padded to a multiple of 8), [q̃, 1]·[k̃, 1]
    # and t²·[v, 1] for all 8·8 pairs: 8·8·2·(5 + 6) = 1408 per head.
    assert cost("approximate", cached=False).prefill_flops == 1536 + 2 * 1408
    for name in ("rndembqk", "fixedseqqk"):
        # prefill: W_v, W_o 2·3·8·16 = 768, map once 2·2·(9·4) = 144, AV 144; training adds W_q, W_k on the
        # 3 shadow rows (768). decode: W_v, W_o 256 + 2 heads·2·(4·4)·(1 + 1). cache: tables 16·(8 + 8),
        # batch-1 keys 3·8 and values 3·8, at 2 bytes. precompute: W_q, W_k on 16 rows.
        shared = cost(name)
        assert (shared.prefill_flops, shared.decode_flops_per_token, shared.cache_bytes) == (1056, 384, 608)
        assert shared.precompute_flops == 4096 and cost(name, cached=False).prefill_flops == 1824


def test_the_training_flops_count_each_shadow_stream_up_to_its_last_reader():
    """A shadow stream is one more batch-1 row through every active layer before the last that reads it."""
    layers = ["standard", "rndembqk", "fixedseqqk", "rndembqk"]
    config = tiny_config(num_hidden_layers=4, layers=layers)
    assert shadow_rows(config) == [2, 2, 1, 0]  # ε up to layer 3 (layers 0–2), Emb(t_s) up to layer 2 (0–1)
    assert shadow_rows(tiny_config(num_hidden_layers=4, layers=layers, skip_nonstandard=True)) == [0, 0, 0, 0]
    assert shadow_rows(tiny_config(layers="uniform:standard")) == [0, 0]
    batch, length, width = 3, 8, config.hidden_size

    def mixer(name, rows):
        return get_mixer(name).cost(config, rows, length, 4, cached=False).prefill_flops

    feed_forward = 6 * length * width * config.intermediate_size  # per row and layer
    expected = mixer("standard", 5) + mixer("rndembqk", 5) + mixer("fixedseqqk", 4) + mixer("rndembqk", 3)
    expected += (5 + 5 + 4 + 3) * feed_forward + 2 * batch * length * width * config.vocab_size
    assert model_forward_flops(config, batch, length) == expected


@pytest.mark.skipif(minor_page_faults() is None, reason="the platform does not count page faults")
def test_take_turns_counts_the_page_faults_of_each_step():
    """A step that writes 64 MB of fresh memory faults its pages in (16384 pages of 4 KiB, or 32 huge pages);
    a step that allocates nothing does not."""

    def fresh_memory(_batch):
        buffer = bytearray(64 * 2**20)  # zero-filled by the kernel, one fault per page on first touch
        buffer[::4096] = b"\x01" * len(range(0, len(buffer), 4096))
        return 0.0

    times, faults, warmup_seconds = take_turns(
        {"fresh": fresh_memory, "idle": lambda _batch: 0.0}, torch.zeros(1, 1), warmup=1, steps_per_turn=2, repeats=2
    )
    assert [len(turns) for turns in times.values()] == [2, 2] and len(faults["fresh"]) == len(faults["idle"]) == 4
    assert warmup_seconds.keys() == {"fresh", "idle"} and min(warmup_seconds.values()) >= 0
    assert min(faults["fresh"]) >= 32 and min(faults["fresh"]) > 4 * max(faults["idle"])


# --- the train section at several lengths (issue 19) --------------------------------------------------------


def test_train_seq_len_takes_a_list_and_a_single_length_is_a_list_of_one():
    parse = build_parser().parse_args
    assert parse(["bench", "--out", "b", "--train-seq-len", "512,2048,8192"]).train_seq_len == (512, 2048, 8192)
    assert parse(["bench", "--out", "b", "--train-seq-len", "512"]).train_seq_len == (512,)


def test_a_bad_train_seq_len_ends_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--out", str(tmp_path), "--train-seq-len", "512,2k"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("attnlab bench: error:") and "'512,2k'" in error and "\n" not in error
    assert main(["bench", "--out", str(tmp_path), "--train-seq-len", "512,0"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--train-seq-len must be positive integers" in error and "\n" not in error


def test_the_batch_size_follows_the_tokens_per_step_unless_given():
    settings = BenchSettings()
    assert settings.train_tokens_per_step == 16384 and settings.train_batch_size is None
    assert [settings.train_batch(length) for length in (512, 2048, 8192, 3000, 32768)] == [32, 8, 2, 5, 1]
    assert BenchSettings(train_tokens_per_step=1000).train_batch(64) == 15
    assert BenchSettings(train_batch_size=3).train_batch(8192) == 3  # given, it wins


def test_max_position_embeddings_covers_the_longest_length(tmp_path, capsys):
    settings = BenchSettings(sections=("train",), train_seq_len=(512, 4096))  # cpu-tiny's own is 256
    config, extended = bench_config(settings, "uniform:rndembqk")
    assert extended and config.max_position_embeddings == config.shadow_seq_len == 4096
    given = BenchSettings(sections=("train",), train_seq_len=(512,), model_overrides={"max_position_embeddings": 1024})
    assert bench_config(given, "uniform:standard")[0].max_position_embeddings == 1024
    command = ["bench", "--out", str(tmp_path), "--sections", "train", "--train-seq-len", "512,8192"]
    assert main([*command, "--max-position-embeddings", "2048"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--max-position-embeddings 2048 is below the longest sequence measured (8192" in error
    assert "at least 8192" in error and "\n" not in error and not list(tmp_path.iterdir())


def _cells(markdown: str, length: int, model: str) -> list[str]:
    """The cells of the training table's row for (L, model)."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] == str(length) and cells[2] == model:
            return cells
    raise AssertionError(f"no row for L={length}, {model}")


def test_the_train_section_at_two_lengths(tmp_path):
    """B·L fixed at 1024: B = 64 at L = 16, 16 at L = 64. Every ratio is the table's tokens/s ratio; the analytic
    ones are the training FLOPs from `Mixer.cost`, SwiGLU and the LM head; the figure is linked and a PNG."""
    settings = BenchSettings(
        model_overrides=TINY_MODEL,
        mixers=("mlp", "nonapprox"),
        sections=("train",),
        train_seq_len=(16, 64),
        train_tokens_per_step=1024,
        repeats=1,
        warmup=1,
        train_steps=1,
        threads=1,
        matmul_size=64,
    )
    results = run_bench(settings, tmp_path)
    assert results["files"] == ["bench.json", "bench.md", "train_throughput.png", "train_throughput.svg"]
    lengths = json.loads((tmp_path / "bench.json").read_text())["train"]["lengths"]
    markdown = (tmp_path / "bench.md").read_text()
    assert "B = 1024 // L sequences per step (--train-tokens-per-step), at least 1" in markdown
    peak_memory_measured = reset_resident_peak() is not None  # Linux: the peak resident memory can be reset
    for length, batch in ((16, 64), (64, 16)):
        row = lengths[str(length)]
        assert (row["seq_len"], row["batch_size"], row["tokens_per_step"]) == (length, batch, 1024)
        assert list(row["mixers"]) == ["standard", "mlp", "nonapprox"]  # standard added: the ratios' base
        standard = row["mixers"]["standard"]
        for name, values in row["mixers"].items():
            ratio = values["tokens_per_s"] / standard["tokens_per_s"]
            assert values["ratio_to_standard"] == pytest.approx(ratio, rel=1e-12)
            cells = _cells(markdown, length, name)
            assert cells[1] == str(batch) and cells[3] == f"{values['tokens_per_s']:.0f}"
            assert cells[5] == f"{ratio:.2f}×"
            config = bench_config(settings, f"uniform:{name}")[0]
            layers, tokens, width = config.num_hidden_layers, batch * length, config.hidden_size
            mixer = {
                mixer_name: get_mixer(mixer_name).cost(config, batch, length, cached=False).prefill_flops
                for mixer_name in ("standard", name)
            }
            mixer_ratio = mixer["standard"] / mixer[name]
            rest = layers * 6 * tokens * width * config.intermediate_size + 2 * tokens * width * config.vocab_size
            model_ratio = (layers * mixer["standard"] + rest) / (layers * mixer[name] + rest)
            assert values["mixer_flops_ratio_to_standard"] == pytest.approx(mixer_ratio, rel=1e-12)
            assert values["analytic_ratio_to_standard"] == pytest.approx(model_ratio, rel=1e-12)
            assert cells[6] == f"{model_ratio:.2f}×" and cells[7] == f"{mixer_ratio:.2f}×"
            assert values["page_faults_per_step"] is not None and values["page_faults_per_step"] >= 0
            assert values["warmup_seconds"] > 0
            if peak_memory_measured:
                assert values["peak_memory_bytes"] > 0 and cells[9] != "–"
            else:
                assert values["peak_memory_bytes"] is None
    assert lengths["16"]["mixers"]["nonapprox"]["mixer_flops_ratio_to_standard"] != 1.0
    assert "![training tokens/s against L](train_throughput.png)" in markdown
    assert (tmp_path / "train_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
