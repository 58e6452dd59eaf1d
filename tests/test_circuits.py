"""Circuit scores on hand-built maps and against an independent float64 computation, and ablations against
their closed forms (`attnlab.circuits`)."""

import pytest
import torch

from attnlab.circuits import (
    ablated,
    duplicate_token_score,
    head_scores,
    in_context_score,
    induction_score,
    mqar_scores,
    position_losses,
    previous_token_score,
    repeated_blocks,
    sink_score,
    task_head_scores,
)
from attnlab.synthetic import MQARTask, heldout_examples

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


def test_mqar_task_scores_are_one_for_perfect_heads_and_the_closed_form_for_a_uniform_one():
    task = MQARTask(seq_len=20, vocab_size=16, num_pairs=3)
    input_ids, labels = heldout_examples(task, seed=0, count=4)
    length = task.seq_len
    # Previous-token everywhere: the values read their keys.
    previous = one_hot_map(length, [0, *range(length - 1)]).expand(4, 2, -1, -1)
    assert mqar_scores(previous, input_ids, labels, 3)["previous_token"].tolist() == [1.0, 1.0]
    # Retrieval: each scored query position reads the position of its answer in the context.
    retrieval = torch.eye(length).expand(4, 1, -1, -1).clone()  # elsewhere each position reads itself
    for row in range(4):
        for query in (labels[row, 1:] != -100).nonzero().flatten().tolist():
            answer_position = input_ids[row, :6].tolist().index(int(labels[row, query + 1]))
            assert answer_position % 2 == 1  # values sit at odd positions
            retrieval[row, 0, query, query] = 0.0
            retrieval[row, 0, query, answer_position] = 1.0
    scores = mqar_scores(retrieval, input_ids, labels, 3)
    assert scores["retrieval"].item() == pytest.approx(1.0) and scores["previous_token"].item() == pytest.approx(0.0)
    uniform = mqar_scores(causal_uniform(length).expand(4, 1, -1, -1), input_ids, labels, 3)
    assert uniform["previous_token"].item() == pytest.approx(sum(1 / (2 * i + 2) for i in range(3)) / 3)
    positions = (labels[:, 1:] != -100).nonzero()[:, 1]  # a query at t reads 1/(t + 1) of every earlier position
    assert uniform["retrieval"].item() == pytest.approx((1 / (positions + 1).double()).mean().item())


def test_the_task_scores_of_a_model_equal_a_float64_computation_from_its_maps():
    model = attentive_model(layers=["nonapprox", "mlp", "standard"], num_hidden_layers=3)
    task = MQARTask(seq_len=24, vocab_size=model.config.vocab_size, num_pairs=4)
    input_ids, labels = heldout_examples(task, seed=1, count=6)
    scores = task_head_scores(model, task, input_ids, labels)
    assert scores[1] is None
    maps = model(input_ids, output_attentions=True).attentions
    for layer in (0, 2):
        for head in range(model.config.num_attention_heads):
            a = maps[layer][:, head].double()
            previous = [a[row, 2 * i + 1, 2 * i] for row in range(6) for i in range(4)]
            retrieval = []
            for row in range(6):
                context = input_ids[row, :8].tolist()
                for query in range(task.seq_len - 1):
                    if labels[row, query + 1] != -100:
                        retrieval.append(a[row, query, context.index(int(labels[row, query + 1]))])
            expected = {"previous_token": sum(previous) / len(previous), "retrieval": sum(retrieval) / len(retrieval)}
            for name, value in expected.items():
                assert scores[layer][name][head] == pytest.approx(value.item(), rel=1e-9), (layer, head, name)


def test_the_in_context_learning_score_is_late_minus_early_loss_and_position_losses_average_to_the_loss():
    losses = torch.arange(1, 64, dtype=torch.float64)  # the loss of token p is p: L = 64
    # early tokens 4..7, late tokens 60..63
    assert in_context_score(losses) == pytest.approx((60 + 61 + 62 + 63) / 4 - (4 + 5 + 6 + 7) / 4)
    with pytest.raises(ValueError, match="at least 16 tokens"):
        in_context_score(torch.zeros(10))
    model = attentive_model(layers=["standard", "standard"], num_hidden_layers=2)
    sequences = torch.randint(0, model.config.vocab_size, (5, 20), generator=torch.Generator().manual_seed(2))
    per_position = position_losses(model, sequences, batch_size=2)
    assert per_position.shape == (19,)
    with torch.no_grad():
        loss = model(input_ids=sequences, labels=sequences).loss
    assert per_position.mean().item() == pytest.approx(loss.item(), rel=1e-5)


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
    assert entry["task_scores"][0] is None and set(entry["task_scores"][1]) == {"previous_token", "retrieval"}
    assert entry["chance_accuracy"] == pytest.approx(1 / 7) and entry["icl_score"] is None  # vocab 16: 7 values
    ablation = entry["ablation"]
    assert ablation["layers"][0]["heads"] is None and len(ablation["layers"][1]["heads"]) == 2
    recall = evaluate_recall(recall_run, num_examples=32)
    assert ablation["baseline"]["accuracy"] == pytest.approx(recall["accuracy"])
    assert (out / "circuits-recall-hybrid-mlp.png").is_file() and (out / "circuits-recall-hybrid-mlp.svg").is_file()


def test_attnlab_circuits_on_a_text_model_ablates_on_held_out_text_and_scores_in_context_learning(corpus, tmp_path):
    import json

    from attnlab import cli
    from attnlab.data import heldout_sequences, open_corpus
    from attnlab.evaluation import load_checkpoint

    run = tmp_path / "text-run"
    recipe = ["--data", str(corpus), "--tokenizer", "bpe:300", "--seq-len", "32", "--batch-size", "4"]
    steps = ["--global-batch-size", "4", "--max-steps", "2", "--warmup-steps", "1", "--eval-every", "0"]
    train = ["train", "--preset", "cpu-tiny", "--layers", "hybrid:nonapprox", *TINY_MODEL, *recipe, *steps]
    assert cli.main([*train, "--no-tensorboard", "--out", str(run)]) == 0
    out = tmp_path / "circuits"
    assert cli.main(["circuits", str(run), "--num-examples", "6", "--out", str(out)]) == 0
    entry = json.loads((out / "circuits.json").read_text())["models"]["text-run"]
    assert entry["task"] == f"held-out text of {corpus}" and entry["task_scores"] is None
    assert entry["chance_accuracy"] is None and entry["block"] == 16
    model = load_checkpoint(run).model.eval()
    sequences = heldout_sequences(open_corpus(str(corpus)), load_checkpoint(run).tokenizer, 32, 6)
    with torch.no_grad():
        logits = model(sequences).logits[:, :-1].double()
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), sequences[:, 1:], reduction="none").mean(0)
    assert entry["ablation"]["baseline"]["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    # tokens 2–3 against tokens 30–31 of 32 (losses[p − 1] is token p's)
    assert entry["icl_score"] == pytest.approx((losses[29:31].mean() - losses[1:3].mean()).item(), abs=1e-5)
    assert [layer["mixer"] for layer in entry["ablation"]["layers"]] == ["nonapprox", "standard"]
    assert cli.main(["circuits", str(run), "--task", "mqar:pairs=2,vocab=16", "--out", str(tmp_path / "t")]) == 0


def test_attnlab_circuits_refuses_bad_input_in_one_line(recall_run, tmp_path, capsys):
    from attnlab import cli

    (tmp_path / "file").write_text("x")
    assert cli.main(["circuits", str(recall_run), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["circuits", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert cli.main(["circuits", str(recall_run), "--data", "builtin", "--out", str(tmp_path / "c")]) == 2
    assert "--data applies to text models only" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def _circuits_entry(previous: float, retrieval: float, accuracy: float) -> dict:
    """A one-model circuits.json entry: layers standard, mlp (no map), standard, two heads each; `previous` is
    head 0's task previous-token score in layer 1, `retrieval` head 0's retrieval score in layer 3."""

    def scores(first: float) -> dict:
        zeros = [0.0, 0.0]
        return {
            "previous_token": [first, 0.1],
            "induction": [0.2, first + 0.3],
            "duplicate_token": zeros,
            "sink": zeros,
        }

    def heads(first: float) -> list[dict]:
        return [{"accuracy": first, "loss": 1.5}, {"accuracy": accuracy, "loss": 1.0}]

    return {
        "mixer_types": ["standard", "mlp", "standard"],
        "chance_accuracy": 0.1,
        "scores": [scores(0.4), None, scores(0.3)],
        "task_scores": [
            {"previous_token": [previous, 0.1], "retrieval": [0.0, 0.1]},
            None,
            {"previous_token": [0.1, 0.1], "retrieval": [retrieval, 0.2]},
        ],
        "icl_score": None,
        "ablation": {
            "mode": "mean",
            "baseline": {"accuracy": accuracy, "loss": 1.0},
            "layers": [
                {"layer": 0, "mixer": "standard", "accuracy": 0.2, "loss": 2.0, "heads": heads(0.25)},
                {"layer": 1, "mixer": "mlp", "accuracy": accuracy - 0.05, "loss": 1.0, "heads": None},
                {"layer": 2, "mixer": "standard", "accuracy": 0.5, "loss": 1.5, "heads": heads(0.5)},
            ],
        },
    }


def test_the_reports_who_does_what_section_tests_both_hypotheses_on_each_model(tmp_path):
    import json

    from attnlab.report import circuits_section
    from attnlab.study import Run, Study
    from attnlab.studyfolder import STUDY_FILES, run_folder

    entries = {  # (previous-token, retrieval, accuracy)
        "a": _circuits_entry(0.9, 0.8, 0.98),  # both steps, recalls: fits both
        "b": _circuits_entry(0.2, 0.1, 0.40),  # neither, fails: fits both
        "c": _circuits_entry(0.9, 0.1, 0.30),  # a previous-token step without retrieval, fails: fits two-step only
        "d": _circuits_entry(0.3, 0.9, 0.95),  # recalls without a previous-token head: fits neither
        "e": _circuits_entry(0.2, 0.1, 0.12),  # at chance
    }
    runs = [
        Run(f"recall-hybrid-{name}", "recall", "hybrid", name, f"hybrid:{name}", "cpu-tiny", {}, {}) for name in entries
    ]
    for run in runs:
        folder = run_folder(tmp_path, run.name) / STUDY_FILES / "circuits"
        folder.mkdir(parents=True)
        (folder / "circuits.json").write_text(json.dumps({"models": {run.name: entries[run.mixer]}}))
    lines = circuits_section(tmp_path, Study("s", runs))
    table = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| hybrid")}
    assert table["hybrid a"] == (
        "| hybrid a | SxS | 98.0 | L1.H0 (0.90) | L3.H0 (0.80) | L1.H0 (0.40) | L1.H1 (0.70) "
        "| L1 standard (20.0), L3 standard (50.0) | L1.H0 (25.0) | yes / yes |"
    )
    # b: 40 % — a layer is needed below 10 + (40 − 10)/2 = 25 %: L1 (20 %) only
    assert "| L1 standard (20.0) | L1.H0 (25.0) | yes / yes |" in table["hybrid b"]
    assert table["hybrid c"].endswith("| no / yes |") and table["hybrid d"].endswith("| no / no |")
    assert "| at chance |" in table["hybrid e"]
    claims = [line for line in lines if line.startswith("- **")]
    assert claims[0].startswith("- **fails for 2 of 5** — hypothesis: a model recalls iff some layer hosts the")
    assert "Fit: hybrid a, hybrid b, hybrid e. Do not fit: hybrid c, hybrid d." in claims[0]
    assert claims[1].startswith("- **fails for 1 of 5**") and "Do not fit: hybrid d." in claims[1]
    assert circuits_section(tmp_path, Study("s", [])) == []
