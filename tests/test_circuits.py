"""Circuit scores on hand-built maps and against an independent float64 computation, and ablations against
their closed forms (`attnlab.circuits`)."""

import pytest
import torch

from attnlab.circuits import (
    ablated,
    duplicate_token_score,
    head_scores,
    induction_score,
    previous_token_score,
    repeated_blocks,
    sink_score,
)

from .test_model import attentive_model
from .test_train import TINY_MODEL


def causal_uniform(length: int) -> torch.Tensor:
    """[1, 1, L, L]: A[i, j] = 1/(i + 1) for j ≤ i."""
    return (torch.ones(length, length).tril() / torch.arange(1, length + 1)[:, None])[None, None]


def one_hot_map(length: int, targets: list[int]) -> torch.Tensor:
    """[1, 1, L, L] with row i all on key targets[i]."""
    maps = torch.zeros(1, 1, length, length)
    maps[0, 0, torch.arange(length), torch.tensor(targets)] = 1.0
    return maps


def test_a_perfect_previous_token_head_scores_one_and_a_uniform_one_its_closed_form():
    length = 10
    assert previous_token_score(one_hot_map(length, [0, *range(length - 1)])).item() == pytest.approx(1.0)
    closed_form = sum(1 / (i + 1) for i in range(1, length)) / (length - 1)
    assert previous_token_score(causal_uniform(length)).item() == pytest.approx(closed_form)
    assert sink_score(causal_uniform(length)).item() == pytest.approx(sum(1 / (i + 1) for i in range(length)) / length)


def test_a_perfect_induction_head_and_a_perfect_duplicate_head_score_one():
    block = 6
    # Induction: query i of the second copy reads the token after its first occurrence, i − block + 1.
    induction = one_hot_map(2 * block, [0] * block + [i - block + 1 for i in range(block, 2 * block)])
    assert induction_score(induction, block).item() == pytest.approx(1.0)
    assert duplicate_token_score(induction, block).item() == pytest.approx(0.0)
    duplicate = one_hot_map(2 * block, [0] * block + [i - block for i in range(block, 2 * block)])
    assert duplicate_token_score(duplicate, block).item() == pytest.approx(1.0)
    assert induction_score(duplicate, block).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2·block"):
        induction_score(duplicate, block + 1)


def test_repeated_blocks_repeat_distinct_tokens():
    tokens = repeated_blocks(vocab_size=20, block=8, batch=3, seed=1)
    assert tokens.shape == (3, 16) and torch.equal(tokens[:, :8], tokens[:, 8:])
    assert all(len(set(row[:8].tolist())) == 8 for row in tokens) and int(tokens.min()) >= 1
    with pytest.raises(ValueError, match="block < vocab_size"):
        repeated_blocks(vocab_size=8, block=8, batch=1)


def test_the_scores_of_a_model_equal_a_float64_computation_from_its_maps():
    model = attentive_model(layers=["standard", "mlp", "nonapprox"], num_hidden_layers=3)
    block = 8
    scores = head_scores(model, block=block, batch=4, seed=3)
    assert scores[1] is None  # mlp: no map, no scores
    tokens = repeated_blocks(model.config.vocab_size, block, 4, seed=3)
    maps = model(tokens, output_attentions=True).attentions
    for layer in (0, 2):
        a = maps[layer].double()  # [batch, heads, 2·block, 2·block]
        for head in range(model.config.num_attention_heads):
            rows = a[:, head]
            expected = {
                "previous_token": sum(rows[:, i, i - 1].mean() for i in range(1, 2 * block)) / (2 * block - 1),
                "duplicate_token": sum(rows[:, i, i - block].mean() for i in range(block, 2 * block)) / block,
                "induction": sum(rows[:, i, i - block + 1].mean() for i in range(block, 2 * block)) / block,
                "sink": sum(rows[:, i, 0].mean() for i in range(2 * block)) / (2 * block),
            }
            for name, value in expected.items():
                assert scores[layer][name][head] == pytest.approx(value.item(), rel=1e-9), (layer, head, name)


def test_mean_ablation_of_an_output_that_is_the_same_for_every_sequence_changes_nothing():
    model = attentive_model(layers=["standard", "standard"], num_hidden_layers=2)
    same = torch.randint(0, model.config.vocab_size, (1, 12)).expand(3, 12)  # three identical sequences
    reference = model(same).logits
    for head in (None, 2):
        with ablated(model, 1, head=head, mode="mean"):
            torch.testing.assert_close(model(same).logits, reference, rtol=0, atol=1e-6)
        with ablated(model, 1, head=head, mode="zero"):
            assert (model(same).logits - reference).abs().max() > 1e-3
    torch.testing.assert_close(model(same).logits, reference, rtol=0, atol=0)  # the hooks are gone


def test_zero_ablating_a_head_equals_removing_its_columns_of_the_output_projection():
    model = attentive_model(layers=["standard", "nonapprox"], num_hidden_layers=2)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for layer in (0, 1):
        with ablated(model, layer, head=1, mode="zero"):
            ablated_logits = model(tokens).logits
        projection = model.model.layers[layer].self_attn.o_proj
        width = model.config.head_dim_resolved
        saved = projection.weight.detach().clone()
        with torch.no_grad():
            projection.weight[:, width : 2 * width] = 0
        torch.testing.assert_close(ablated_logits, model(tokens).logits, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            projection.weight.copy_(saved)


def test_mean_ablating_a_layer_gives_every_sequence_the_batch_mean_of_its_output():
    model = attentive_model(layers=["standard", "standard"], num_hidden_layers=2)
    tokens = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    mixer, original, replaced = model.model.layers[0].self_attn, [], []
    before = mixer.register_forward_hook(lambda module, inputs, output: original.append(output.hidden_states))
    with ablated(model, 0, mode="mean"):  # forward hooks run in order: `after` sees the replacement
        after = mixer.register_forward_hook(lambda module, inputs, output: replaced.append(output.hidden_states))
        model(tokens)
    before.remove(), after.remove()
    assert not torch.allclose(original[0][0], original[0][1])
    torch.testing.assert_close(replaced[0], original[0].mean(0, keepdim=True).expand_as(original[0]))


def test_bad_ablations_are_one_line_errors():
    model = attentive_model(layers=["standard", "mlp"], num_hidden_layers=2)
    with pytest.raises(ValueError, match="has no head 0"), ablated(model, 1, head=0):
        pass
    with pytest.raises(ValueError, match="has no head 9"), ablated(model, 0, head=9):
        pass
    with pytest.raises(ValueError, match="ablation mode"), ablated(model, 0, mode="noise"):
        pass


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory):
    """A 2-layer hybrid mlp trained for a few steps on 2-pair MQAR, as the study's recall runs are."""
    from attnlab import cli

    out = tmp_path_factory.mktemp("circuits") / "recall-hybrid-mlp"
    recipe = ["--data", "mqar:pairs=2,vocab=16", "--seq-len", "16", "--batch-size", "8", "--global-batch-size", "8"]
    steps = ["--max-steps", "3", "--warmup-steps", "1", "--eval-every", "0", "--no-tensorboard"]
    arguments = [
        "train",
        "--preset",
        "cpu-tiny",
        "--layers",
        "hybrid:mlp",
        *TINY_MODEL,
        *recipe,
        *steps,
        "--out",
        str(out),
    ]
    assert cli.main(arguments) == 0
    return out


def test_attnlab_circuits_writes_scores_ablations_and_figures(recall_run, tmp_path):
    import json

    from attnlab import cli
    from attnlab.evaluation import evaluate_recall

    out = tmp_path / "circuits"
    assert cli.main(["circuits", str(recall_run), "--num-examples", "32", "--out", str(out)]) == 0
    entry = json.loads((out / "circuits.json").read_text())["models"]["recall-hybrid-mlp"]
    assert entry["mixer_types"] == ["mlp", "standard"] and entry["block"] == 8
    assert entry["scores"][0] is None  # mlp: n/a
    assert set(entry["scores"][1]) == {"previous_token", "duplicate_token", "induction", "sink"}
    assert all(len(values) == 2 and all(0 <= v <= 1 for v in values) for values in entry["scores"][1].values())
    ablation = entry["ablation"]
    assert ablation["layers"][0]["heads"] is None and len(ablation["layers"][1]["heads"]) == 2
    recall = evaluate_recall(recall_run, num_examples=32)
    assert ablation["baseline"]["accuracy"] == pytest.approx(recall["accuracy"])
    assert (out / "circuits-recall-hybrid-mlp.png").is_file() and (out / "circuits-recall-hybrid-mlp.svg").is_file()


def test_attnlab_circuits_refuses_bad_input_in_one_line(recall_run, tmp_path, capsys):
    from attnlab import cli

    (tmp_path / "file").write_text("x")
    assert cli.main(["circuits", str(recall_run), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["circuits", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def _circuits_entry(previous: float, accuracy: float, head_drop: float) -> dict:
    """A one-model circuits.json entry: layer 1 mlp (no map), layer 2 standard with two heads."""
    standard_scores = {"previous_token": [previous, 0.1], "induction": [0.2, 0.6], "duplicate_token": [0.0, 0.1]}
    return {
        "mixer_types": ["mlp", "standard"],
        "scores": [None, {**standard_scores, "sink": [0.3, 0.2]}],
        "ablation": {
            "mode": "mean",
            "baseline": {"accuracy": accuracy, "loss": 1.0},
            "layers": [
                {"layer": 0, "mixer": "mlp", "accuracy": accuracy - 0.1, "loss": 1.0, "heads": None},
                {
                    "layer": 1,
                    "mixer": "standard",
                    "accuracy": 0.1,
                    "loss": 2.0,
                    "heads": [{"accuracy": head_drop, "loss": 1.5}, {"accuracy": accuracy, "loss": 1.0}],
                },
            ],
        },
    }


def test_the_reports_who_does_what_section_tests_the_hypothesis_on_each_model(tmp_path):
    import json

    from attnlab.report import circuits_section
    from attnlab.study import Run, Study
    from attnlab.studyfolder import STUDY_FILES, run_folder

    runs = [
        Run(f"recall-hybrid-{name}", "recall", "hybrid", name, f"hybrid:{name}", "cpu-tiny", {}, {})
        for name in ("a", "b", "c")
    ]
    entries = {  # a: recalls with a previous-token head (fits); b: fails without one (fits); c: recalls without
        "a": _circuits_entry(previous=0.9, accuracy=0.98, head_drop=0.2),
        "b": _circuits_entry(previous=0.2, accuracy=0.40, head_drop=0.3),
        "c": _circuits_entry(previous=0.3, accuracy=0.95, head_drop=0.9),
    }
    for run in runs:
        folder = run_folder(tmp_path, run.name) / STUDY_FILES / "circuits"
        folder.mkdir(parents=True)
        record = {"models": {run.name: entries[run.mixer]}}
        (folder / "circuits.json").write_text(json.dumps(record))
    lines = circuits_section(tmp_path, Study("s", runs))
    table = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| hybrid")}
    assert table["hybrid a"].startswith("| hybrid a | xS | 98.0 | L2.H0 (0.90) | L2.H1 (0.60) | L2.H0 (20.0) |")
    assert table["hybrid a"].endswith("| L2 standard: 10.0 | yes |")
    assert table["hybrid b"].endswith("| yes |") and table["hybrid c"].endswith("| no |")
    claim = next(line for line in lines if line.startswith("- **"))
    assert claim.startswith("- **fails for 1 of 3**") and "Fit: hybrid a, hybrid b. Do not fit: hybrid c." in claim
    assert circuits_section(tmp_path, Study("s", [])) == []
