"""Attention indicators (docs/method.md §6) on hand-built maps, streaming activation statistics, and `analyze_models`
end to end against an independent float64 computation from the model's own inspection outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab import AttnLabForCausalLM
from attnlab.analysis import (
    INDICATORS,
    ActivationStatistics,
    accumulate_layers,
    analyze_models,
    attention_indicators,
    concentration,
    entropy,
    head_diversity,
    local_focus,
    min_max_normalise,
    sink,
)
from attnlab.checkpoint import checkpoint_labels
from attnlab.data import build_tokenizer, heldout_sequences, open_corpus

from .conftest import tiny_config

L = 7


def uniform_causal(seq_len: int) -> torch.Tensor:
    """A[i, j] = 1 / (i + 1) for j <= i: every query averages its prefix."""
    rows = torch.arange(1, seq_len + 1, dtype=torch.float64)[:, None]
    return torch.ones(seq_len, seq_len, dtype=torch.float64).tril() / rows


def first_token(seq_len: int) -> torch.Tensor:
    maps = torch.zeros(seq_len, seq_len, dtype=torch.float64)
    maps[:, 0] = 1.0
    return maps


def heads(*maps: torch.Tensor) -> torch.Tensor:
    return torch.stack(maps)  # [heads, L, L]


# ------------------------------------------------------------------------------------------ hand-built maps


def test_uniform_causal_averaging():
    maps = heads(uniform_causal(L), uniform_causal(L))
    harmonic = sum(1 / (i + 1) for i in range(L))
    # H = −Σ over all entries: row i has i+1 entries of 1/(i+1), contributing log(i+1).
    assert entropy(maps).item() == pytest.approx(sum(math.log(i + 1) for i in range(L)), rel=1e-12)
    assert sink(maps).item() == pytest.approx(harmonic / L, rel=1e-12)  # mean of 1/(i+1)
    assert concentration(maps).item() == pytest.approx(math.sqrt(harmonic), rel=1e-12)
    assert local_focus(maps, 0).item() == pytest.approx(harmonic / L, rel=1e-12)
    assert local_focus(maps, 2).item() == pytest.approx(sum(1 / (i + 1) for i in range(2, L)) / (L - 2), rel=1e-12)
    assert head_diversity(maps).item() == 0.0


def test_uniform_averaging_has_the_largest_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, L, L, generator=generator, dtype=torch.float64) * 3
    random_maps = torch.softmax(logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), -math.inf), -1)
    per_head = torch.stack([entropy(random_maps[h : h + 1]) for h in range(16)])
    assert (per_head < entropy(uniform_causal(L)[None])).all()
    assert (per_head > 0).all()


def test_identity():
    maps = heads(torch.eye(L, dtype=torch.float64))
    values = attention_indicators(maps)
    assert values["locfoc0"].item() == 1.0
    assert values["locfoc1"].item() == values["locfoc2"].item() == values["locfoc3"].item() == 0.0
    assert values["entropy"].item() == 0.0  # 0·log 0 = 0 and 1·log 1 = 0
    assert values["conc"].item() == pytest.approx(math.sqrt(L), rel=1e-12)
    assert values["sink"].item() == pytest.approx(1 / L, rel=1e-12)  # only query 0 looks at token 0


def test_all_mass_on_the_first_token():
    values = attention_indicators(heads(first_token(L), first_token(L), first_token(L)))
    assert values["sink"].item() == 1.0
    assert values["entropy"].item() == 0.0
    assert values["locfoc0"].item() == pytest.approx(1 / L)  # only A[0, 0] lies on the diagonal
    assert values["locfoc1"].item() == pytest.approx(1 / (L - 1))  # only A[1, 0]
    assert values["headdiv"].item() == 0.0


def test_head_diversity_of_different_heads():
    """Identity vs uniform averaging, L = 3. Population std of two values a, b is |a − b| / 2; over the six
    causal positions: (0,0): 0, (1,0): 1/4, (1,1): 1/4, (2,0): 1/6, (2,1): 1/6, (2,2): 1/3 → sum 7/6."""
    maps = heads(torch.eye(3, dtype=torch.float64), uniform_causal(3))
    assert head_diversity(maps).item() == pytest.approx(7 / 36, rel=1e-12)
    # Three heads: identity, first token, identity at (i, j) = (1, 0) and (1, 1) etc. — checked against numpy.
    maps = heads(torch.eye(4, dtype=torch.float64), first_token(4), uniform_causal(4))
    causal = np.tril(np.ones((4, 4), dtype=bool))
    expected = np.std(maps.numpy()[:, causal], axis=0, ddof=0).mean()
    assert head_diversity(maps).item() == pytest.approx(expected, rel=1e-12)


def test_batched_maps_give_one_value_per_sequence():
    batch = torch.stack([heads(torch.eye(L, dtype=torch.float64)), heads(first_token(L))])  # [2, 1, L, L]
    values = attention_indicators(batch)
    assert all(value.shape == (2,) for value in values.values())
    assert values["sink"].tolist() == pytest.approx([1 / L, 1.0])
    assert values["locfoc0"].tolist() == pytest.approx([1.0, 1 / L])


def test_bad_maps_and_distances():
    with pytest.raises(ValueError, match="heads, L, L"):
        entropy(torch.ones(3, 4))
    with pytest.raises(ValueError, match="distance 3"):
        local_focus(torch.eye(3)[None], 3)


def test_min_max_normalise():
    assert min_max_normalise([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert min_max_normalise([1.5, 1.5]) == [0.5, 0.5]


def test_checkpoint_labels_are_short_and_unique(tmp_path):
    paths = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "solo", tmp_path / "x" / "checkpoint-5"]
    assert checkpoint_labels(paths) == ["a/run", "b/run", "solo", "x/checkpoint-5"]
    assert checkpoint_labels([tmp_path / "solo", tmp_path / "solo"]) == ["solo#1", "solo#2"]


# ------------------------------------------------------------------------------------ activation statistics


def _activation_values(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(5000, generator=generator) * torch.exp(2 * torch.randn(5000, generator=generator))
    values[::97] *= 1e4  # outliers well above 10³
    values[::13] = float("nan")  # masked positions are ignored
    values[5] = 0.0
    return values


def test_streaming_statistics_equal_one_pass():
    values = _activation_values()
    whole = ActivationStatistics()
    whole.update(values)
    streamed = ActivationStatistics()
    for chunk in torch.split(values, [1, 999, 2500, 1500]):
        streamed.update(chunk.reshape(-1, 1, 1) if len(chunk) == 2500 else chunk)  # shapes do not matter
    one, many = whole.summary(), streamed.summary()
    mean_one, mean_many = one.pop("mean"), many.pop("mean")
    assert one == many  # exact: counts, extremes, histogram and hence the quantiles
    assert mean_many == pytest.approx(mean_one, rel=1e-12)

    finite = values[~torch.isnan(values)].double()
    assert one["count"] == finite.numel()
    assert one["max_abs"] == finite.abs().max().item()
    assert one["min"] == finite.min().item() and one["max"] == finite.max().item()
    assert one["num_above_1e3"] == int((finite.abs() > 1e3).sum())
    assert one["frac_above_1e3"] == int((finite.abs() > 1e3).sum()) / finite.numel()
    assert mean_one == pytest.approx(finite.mean().item(), rel=1e-9)
    assert sum(one["abs_histogram"]["counts"]) == finite.numel()


def _assert_quantiles_close(got: dict, values: np.ndarray) -> None:
    """Each histogram quantile lies within one bin (7.5 %) of the sample quantiles around it."""
    for key, value in got.items():
        q = float(key)
        if q in (0.0, 1.0):
            assert value == np.quantile(values, q)  # exact min and max
            continue
        low = np.quantile(values, max(q - 5e-4, 0.0))
        high = np.quantile(values, min(q + 5e-4, 1.0))
        assert low - 0.08 * abs(low) - 1e-6 <= value <= high + 0.08 * abs(high) + 1e-6, f"quantile {key}: {value}"


def test_quantiles_match_the_sample_within_one_bin():
    values = _activation_values(seed=3)
    statistics = ActivationStatistics()
    statistics.update(values)
    summary = statistics.summary()
    finite = values[~torch.isnan(values)].double().numpy()
    _assert_quantiles_close(summary["quantiles"], finite)
    _assert_quantiles_close(summary["abs_quantiles"], np.abs(finite))


def test_infinite_values_are_counted_and_written_as_null():
    statistics = ActivationStatistics()
    statistics.update(torch.tensor([1.0, float("inf"), -2.0, float("nan")]))
    summary = statistics.summary()
    assert summary["count"] == 3 and summary["num_infinite"] == 1 and summary["num_above_1e3"] == 1
    assert summary["max_abs"] is None and summary["max"] is None and summary["min"] == -2.0
    assert summary["mean"] == pytest.approx(-0.5)
    json.dumps(summary, allow_nan=False)
    assert ActivationStatistics().summary() is None


# ------------------------------------------------------------------------------------------- end to end

SEQ_LEN = 24
NUM_SEQS = 5
PATTERNS = {"hybrid": "standard,nonapprox,standard,mlp", "other": "rndembqk,approximate,nonapprox,standard"}


def _save_model(folder: Path, layers: str, tokenizer, seed: int) -> None:
    """A tiny model whose weights are re-drawn large enough that its maps are far from uniform."""
    torch.manual_seed(seed)
    config = tiny_config(
        vocab_size=64 * math.ceil(len(tokenizer) / 64),
        num_hidden_layers=4,
        layers=layers,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AttnLabForCausalLM(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.3 * noise)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("analysis")
    data = root / "topics.jsonl"
    data.write_text("".join(json.dumps({"text": topics[name]}) + "\n" for name in sorted(topics)[:60]))
    corpus = open_corpus(str(data))
    tokenizer = build_tokenizer("bpe:300", corpus)
    checkpoints = []
    for seed, (name, layers) in enumerate(PATTERNS.items()):
        folder = root / name
        _save_model(folder, layers, tokenizer, seed)
        checkpoints.append(folder)
    metrics = checkpoints[0] / "metrics.jsonl"
    records = [{"step": s, "loss": 6 - s / 10, "tokens": 96 * s} for s in range(1, 21)]
    records[9]["eval_loss"], records[19]["eval_loss"] = 5.5, 4.5
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 21, "lo')  # a run still writing
    out = root / "out"
    summary = analyze_models(
        [str(path) for path in checkpoints],
        out,
        data=str(data),
        num_seqs=NUM_SEQS,
        seq_len=SEQ_LEN,
        batch_size=2,
        heatmap_model=0,
    )
    return {"root": root, "data": data, "checkpoints": checkpoints, "out": out, "summary": summary}


def _expected_indicators(maps: torch.Tensor) -> dict[str, float]:
    """Spec §6 written out in float64 on maps [batch, heads, L, L], averaged over heads, then sequences."""
    maps = maps.double()
    seq_len = maps.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    plogp = torch.where(maps > 0, maps * torch.log(torch.where(maps > 0, maps, 1.0)), 0.0)
    values = {
        "entropy": -plogp.sum((-1, -2)).mean(1),
        "conc": torch.linalg.matrix_norm(maps, "fro").mean(1),
        "headdiv": maps[..., causal].std(dim=1, unbiased=False).mean(-1),  # [batch, positions] → [batch]
        "sink": maps[..., 0].mean(-1).mean(1),
    }
    for n in range(4):
        diagonal = torch.stack([maps[..., i, i - n] for i in range(n, seq_len)], dim=-1)
        values[f"locfoc{n}"] = diagonal.mean(-1).mean(1)
    return {name: value.mean().item() for name, value in values.items()}


def test_indicators_equal_an_independent_computation(setup):
    document = json.loads((setup["out"] / "indicators.json").read_text())
    assert {key: value for key, value in setup["summary"].items() if key in document} == document
    labels = [model["label"] for model in document["models"]]
    assert labels == ["hybrid", "other"]
    corpus = open_corpus(str(setup["data"]))
    for model_entry, path in zip(document["models"], setup["checkpoints"]):
        model = AttnLabForCausalLM.from_pretrained(path).eval()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = heldout_sequences(corpus, tokenizer, seq_len=SEQ_LEN, max_sequences=NUM_SEQS)
        assert ids.shape == (NUM_SEQS, SEQ_LEN) and model_entry["num_sequences"] == NUM_SEQS
        assert model_entry["mixer_types"] == PATTERNS[model_entry["label"]].split(",")
        with torch.no_grad():
            out = model(ids, output_attentions=True, output_mixer_scores=True)
        entries = [entry for entry in document["layers"] if entry["model"] == model_entry["label"]]
        assert [entry["layer"] for entry in entries] == [0, 1, 2, 3]
        for entry, maps, scores in zip(entries, out.attentions, out.mixer_scores):
            assert entry["mixer"] == model_entry["mixer_types"][entry["layer"]]
            if maps is None:
                assert entry["mixer"] == "mlp" and entry["has_map"] is False and entry["logits"] is None
                assert all(entry[name] is None for name in INDICATORS)
                assert all(value is None for value in entry["normalised"].values())
                continue
            assert entry["has_map"] is True
            expected = _expected_indicators(maps)
            for name in INDICATORS:
                assert entry[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-9), (entry["layer"], name)
            values = scores[~torch.isnan(scores)].double()
            per_sequence = SEQ_LEN if entry["mixer"] == "nonapprox" else SEQ_LEN * (SEQ_LEN + 1) // 2
            logits = entry["logits"]
            assert logits["count"] == values.numel() == NUM_SEQS * 4 * per_sequence
            assert logits["max_abs"] == values.abs().max().item()
            assert logits["frac_above_1e3"] == (values.abs() > 1e3).double().mean().item()
            _assert_quantiles_close(logits["quantiles"], values.numpy())


def test_normalised_values_span_all_layers_of_all_models(setup):
    layers = [entry for entry in setup["summary"]["layers"] if entry["has_map"]]
    assert len(layers) == 7  # 3 of the hybrid (one mlp) + 4 of the other model
    for name in ("entropy", "conc", "headdiv"):
        raw = [entry[name] for entry in layers]
        normalised = [entry["normalised"][name] for entry in layers]
        assert min(normalised) == 0.0 and max(normalised) == 1.0
        assert normalised == pytest.approx([(v - min(raw)) / (max(raw) - min(raw)) for v in raw])


def test_all_figures_are_written(setup):
    figures = [Path(path) for path in setup["summary"]["figures"]]
    names = {path.name for path in figures}
    for stem in ("radar", "activations", "heatmaps", "loss_curves"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    for path in figures:
        assert path.parent == setup["out"] and path.stat().st_size > 1000
        head = path.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else b"<svg" in path.read_bytes()[:2000]
    assert not list(setup["out"].glob(".*.tmp"))


def test_maps_are_consumed_layer_by_layer_and_batching_does_not_matter(setup, monkeypatch):
    """The model's own output holds no map (each was dropped when its layer finished), and the result is the
    same whether sequences go one per forward (the large-L path) or several."""
    from attnlab import analysis

    model = AttnLabForCausalLM.from_pretrained(setup["checkpoints"][1]).eval()
    ids = torch.randint(0, 250, (3, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.model.register_forward_hook(lambda module, args, output: seen.append(output))
    batched = accumulate_layers(model, ids, batch_size=3, keep_mean_maps=True)
    handle.remove()
    main_pass = [output for output in seen if output.attentions is not None]
    assert len(main_pass) == 1 and all(maps is None for maps in main_pass[0].attentions)
    assert all(scores is None for scores in main_pass[0].mixer_scores)

    monkeypatch.setattr(analysis, "MAP_ELEMENTS_PER_FORWARD", 4 * 16 * 16)  # one sequence per forward
    single = accumulate_layers(model, ids, batch_size=3, keep_mean_maps=True)
    for one, many in zip(single, batched):
        assert one.num_sequences == many.num_sequences == 3
        for name in INDICATORS:
            assert one.indicators()[name] == pytest.approx(many.indicators()[name], rel=1e-6)
        torch.testing.assert_close(one.mean_map(), many.mean_map())
        assert one.activations.summary()["count"] == many.activations.summary()["count"]
    with torch.no_grad():
        reference = model(ids, output_attentions=True).attentions[1]  # layer 1: approximate
    torch.testing.assert_close(batched[1].mean_map(), reference.mean((0, 1)))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"checkpoints": ["missing-folder"]}, "does not exist"),
        ({"seq_len": 49}, "exceeds the 48 positions"),
        ({"num_seqs": 0}, "num_seqs must be a positive integer"),
        ({"heatmap_model": 2}, "heatmap_model must index"),
        ({"metrics_files": ["nowhere/metrics.jsonl"]}, "metrics file"),
        ({"data": "tiny"}, "held-out|split|documents|tokens"),
    ],
)
def test_bad_input_is_one_line(setup, tmp_path, change, message):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text('{"text": "one short document"}\n{"text": "and another one"}\n{"text": "a third"}\n')
    arguments = {"checkpoints": [str(path) for path in setup["checkpoints"]], "data": str(setup["data"]), "num_seqs": 1}
    arguments.update(change)
    if arguments["data"] == "tiny":
        arguments["data"] = str(tiny)
    with pytest.raises(ValueError, match=message) as error:
        analyze_models(out=tmp_path / "out", **arguments)
    assert "\n" not in str(error.value)


def _refuse_model_loading(monkeypatch) -> None:
    """Make any model load fail the test: the checks under test must come before the first model runs."""
    from attnlab import evaluation

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(evaluation, "load_checkpoint", no_loading)


@pytest.mark.parametrize(
    "case, message",
    [
        ("out-is-a-file", r"is a file, not a folder"),
        ("out-parent-missing", r"folder .*missing-parent does not exist"),
        ("synthetic-data", r"--data mqar:pairs=4 is a synthetic task, which has no text to analyse; .*text corpus"),
        ("bad-metrics", r"bad\.jsonl has no records with 'tokens' and 'loss'"),
        ("empty-metrics", r"empty\.jsonl has no records with 'tokens' and 'loss'"),
        ("bad-metrics-beside-checkpoint", r"line 1: not a JSON record"),
    ],
)
def test_bad_output_data_and_metrics_are_refused_before_any_model_runs(setup, tmp_path, monkeypatch, case, message):
    _refuse_model_loading(monkeypatch)
    checkpoints = [str(path) for path in setup["checkpoints"]]
    arguments = {"data": str(setup["data"]), "num_seqs": 1, "metrics_files": []}
    out = tmp_path / "out"
    if case == "out-is-a-file":
        out.write_text("not a folder")
    elif case == "out-parent-missing":
        out = tmp_path / "missing-parent" / "out"
    elif case == "synthetic-data":
        arguments["data"] = "mqar:pairs=4"
    elif case == "bad-metrics":
        (tmp_path / "bad.jsonl").write_text("{bad\n")
        arguments["metrics_files"] = [str(tmp_path / "bad.jsonl")]
    elif case == "empty-metrics":
        (tmp_path / "empty.jsonl").write_text("")
        arguments["metrics_files"] = [str(tmp_path / "empty.jsonl")]
    else:  # the metrics.jsonl found beside a checkpoint is checked as well as one given
        run = tmp_path / "run"
        run.mkdir()
        for item in setup["checkpoints"][1].iterdir():
            (run / item.name).symlink_to(item)
        (run / "metrics.jsonl").write_text('not json\n{"step": 1, "loss": 2.0, "tokens": 10}\n')
        checkpoints, arguments["metrics_files"] = [str(run)], None
    with pytest.raises(ValueError, match=message) as error:
        analyze_models(checkpoints, out, **arguments)
    assert "\n" not in str(error.value)
    assert out.is_file() if case == "out-is-a-file" else not out.exists()  # nothing created
    assert not [path for path in tmp_path.rglob("*") if path.name.startswith(".attnlab-")]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where nothing can be created")
def test_an_output_folder_where_nothing_can_be_created_is_refused(setup, monkeypatch):
    _refuse_model_loading(monkeypatch)
    with pytest.raises(ValueError, match=r"^--out /proc/an: cannot create anything in /proc \(") as error:
        analyze_models([str(setup["checkpoints"][0])], "/proc/an", data=str(setup["data"]), num_seqs=1)
    assert "\n" not in str(error.value)


def test_unreadable_weights_leave_no_output_folder(setup, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in setup["checkpoints"][0].iterdir():
        if item.suffix == ".safetensors":
            (broken / item.name).write_bytes(item.read_bytes()[:100])  # cut short
        elif item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="broken") as error:
        analyze_models([str(broken)], out, data=str(setup["data"]), num_seqs=1, metrics_files=[])
    assert "\n" not in str(error.value)
    assert not out.exists()


def test_fewer_sequences_than_asked_are_noted_in_one_line(setup, tmp_path, capsys):
    short = tmp_path / "short.jsonl"  # the setup corpus cut to short documents: a few dozen held-out sequences
    documents = [json.loads(line)["text"][:400] for line in setup["data"].read_text().splitlines()]
    short.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    out = tmp_path / "out"
    summary = analyze_models(
        [str(setup["checkpoints"][0])], out, data=str(short), num_seqs=5000, seq_len=SEQ_LEN, metrics_files=[]
    )
    available = summary["models"][0]["num_sequences"]
    assert 1 <= available < 5000 and summary["settings"]["num_seqs_requested"] == 5000
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("attnlab")]  # no progress bars
    assert len(notes) == 1 and notes[0].startswith("attnlab: note: ")
    assert f"holds only {available} sequence(s) of {SEQ_LEN} tokens" in notes[0] and "5000 asked for" in notes[0]
    analyze_models(
        [str(setup["checkpoints"][0])], out, data=str(short), num_seqs=available, seq_len=SEQ_LEN, metrics_files=[]
    )
    assert "attnlab" not in capsys.readouterr().err  # no note when the data gives every sequence asked for
