"""Synthetic diagnostics (`attnlab.synthetic`): MQAR and induction examples, their determinism, the task
specs, the train stream across ranks and resumes, `recall_accuracy` against a hand count, and `attnlab
train --data mqar:…` end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutput

import attnlab  # noqa: F401  (registers the Auto classes)
from attnlab import synthetic
from attnlab import train as attnlab_train
from attnlab.evaluation import load_checkpoint
from attnlab.losses import IGNORE_INDEX
from attnlab.runconfig import resolve_run_config
from attnlab.synthetic import (
    BLANK_TOKEN,
    InductionTask,
    MQARTask,
    SyntheticTrainStream,
    make_examples,
    parse_task_spec,
    recall_accuracy,
)
from attnlab.train import TrainingDiverged, train

from .faulty_attnlab import InjectedFault

MQAR_SPECS = [
    "mqar",
    "mqar:pairs=8,queries=8,vocab=256",
    "mqar:pairs=4,queries=fill,vocab=32",
    "mqar:pairs=6,queries=3,vocab=64,filler=noise",
    "mqar:pairs=3,queries=fill,vocab=40,filler=noise",
]


# ------------------------------------------------------------------------------------------- examples


@pytest.mark.parametrize("spec", MQAR_SPECS)
def test_every_mqar_target_is_the_value_paired_with_its_key(spec):
    task = parse_task_spec(spec, seq_len=48)
    n = task.keys_per_range
    input_ids, labels = make_examples(task, seed=3, stream="train", indices=range(40))
    assert input_ids.shape == labels.shape == (40, 48) and input_ids.dtype == labels.dtype == torch.long
    assert 0 <= input_ids.min() and input_ids.max() < task.vocab_size
    context = 2 * task.num_pairs
    for row, row_labels in zip(input_ids.tolist(), labels.tolist()):
        keys, values = row[0:context:2], row[1:context:2]
        assert len(set(keys)) == len(set(values)) == task.num_pairs
        assert all(1 <= key < 1 + n for key in keys) and all(1 + n <= value < 1 + 2 * n for value in values)
        pairs = dict(zip(keys, values))
        scored = [t for t, label in enumerate(row_labels) if label != IGNORE_INDEX]
        queries = [t + 1 for t in range(context, len(row) - 1) if row[t] in pairs]  # after each query key
        assert scored == queries and len(scored) == task.num_queries
        for t in scored:
            assert row_labels[t] == pairs[row[t - 1]]  # the value paired with the key earlier in the sequence
            assert row[t] == BLANK_TOKEN  # the answer itself never appears in the input
        filler = [token for t, token in enumerate(row) if t >= context and t not in scored and row[t] not in pairs]
        if task.filler == "noise":
            assert all(token >= 1 + 2 * n for token in filler)
        else:
            assert set(filler) <= {BLANK_TOKEN}


def test_mqar_queries_visit_every_key_once_per_round():
    task = parse_task_spec("mqar:pairs=4,queries=fill,vocab=64", seq_len=32)  # 12 queries: 3 rounds
    assert task.num_queries == 12 and task.chance_accuracy == 1 / 31
    input_ids, labels = make_examples(task, seed=0, stream="train", indices=range(20))
    for row, row_labels in zip(input_ids, labels):
        asked = row[:-1][row_labels[1:] != IGNORE_INDEX].tolist()
        assert sorted(asked) == sorted(row[0:8:2].tolist() * 3)


def test_induction_scores_the_repeated_part():
    task = parse_task_spec("induction:vocab=16,prefix=5", seq_len=23)
    input_ids, labels = make_examples(task, seed=0, stream="train", indices=range(10))
    assert torch.equal(input_ids[:, 5:], input_ids[:, :18])  # the prefix, repeated
    assert (labels[:, :6] == IGNORE_INDEX).all() and torch.equal(labels[:, 6:], input_ids[:, 6:])
    assert parse_task_spec("induction", seq_len=20) == InductionTask(seq_len=20, vocab_size=64, prefix_len=10)


@pytest.mark.parametrize("spec", ["mqar:pairs=4,queries=fill,filler=noise", "induction:vocab=20"])
def test_examples_depend_on_seed_stream_and_index_only(spec):
    task = parse_task_spec(spec, seq_len=32)
    inputs, labels = make_examples(task, 7, "train", range(12))
    again = make_examples(task, 7, "train", [5, 3, 11])
    assert torch.equal(again[0], inputs[[5, 3, 11]]) and torch.equal(again[1], labels[[5, 3, 11]])
    stream = SyntheticTrainStream(task, seed=7)
    batches = [stream.next_batch(size) for size in (1, 4, 7)]  # any batch sizes give the same examples
    assert torch.equal(torch.cat([inputs for inputs, _ in batches]), inputs)
    assert torch.equal(torch.cat([labels for _, labels in batches]), labels)
    assert not torch.equal(make_examples(task, 8, "train", range(12))[0], inputs)  # another seed
    heldout = synthetic.heldout_examples(task, 7, 12)
    assert not torch.equal(heldout[0], inputs)  # the held-out stream is another stream
    assert torch.equal(heldout[0][:4], synthetic.heldout_examples(task, 7, 4)[0])


def test_task_specs_parse_or_give_one_clear_error():
    assert parse_task_spec("mqar:pairs=8,queries=8,vocab=256", 64) == MQARTask(64, 256, 8, 8, "blank")
    assert parse_task_spec("mqar", 64) == MQARTask(seq_len=64, vocab_size=64, num_pairs=4, num_queries=4)
    assert parse_task_spec(" mqar: pairs = 2 , ", 16).num_pairs == 2
    assert synthetic.is_task_spec("mqar:pairs=2") and synthetic.is_task_spec("induction")
    assert not synthetic.is_task_spec("builtin") and not synthetic.is_task_spec("hf:wikitext")
    bad = {
        "copy:vocab=8": "unknown synthetic task 'copy'",
        "mqar:pairs": "bad option 'pairs'",
        "mqar:keys=4": "bad option 'keys=4'.*keys vocab, pairs, queries, filler",
        "mqar:pairs=four": "bad value 'four' for pairs",
        "mqar:pairs=2,pairs=3": "given twice",
        "mqar:pairs=0": "num_pairs must be a positive integer",
        "mqar:pairs=40,vocab=64": "gives 31 of each",
        "mqar:pairs=8,queries=20": "raise --seq-len or lower pairs/queries",
        "mqar:filler=random": "filler must be blank or noise",
        "induction:prefix=31": "leaves nothing to score",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_task_spec(spec, 32)
    with pytest.raises(ValueError, match="synthetic task 'mqar:pairs=40'"):  # at configuration time
        resolve_run_config("cpu-tiny", train_overrides={"data": "mqar:pairs=40", "seq_len": 32})


# --------------------------------------------------------------------------------------------- stream


def test_stream_state_round_trip_and_ranks():
    task = parse_task_spec("mqar:pairs=4,queries=fill", 32)
    stream = SyntheticTrainStream(task, seed=1)
    for _ in range(3):
        stream.next_batch(5)
    state = json.loads(json.dumps(stream.state_dict()))  # JSON-serialisable
    assert state["cursor"] == 15 and stream.epoch == 0
    expected = [stream.next_batch(5) for _ in range(3)]
    resumed = SyntheticTrainStream(task, seed=1)
    resumed.load_state_dict(state)
    for (inputs, labels), (again_inputs, again_labels) in zip(expected, [resumed.next_batch(5) for _ in range(3)]):
        assert torch.equal(inputs, again_inputs) and torch.equal(labels, again_labels)
    with pytest.raises(ValueError, match="cannot resume the data stream: the checkpoint has seed=1"):
        SyntheticTrainStream(task, seed=2).load_state_dict(state)
    # Two ranks drawing 3 examples each see, together, what one process drawing 6 sees.
    ranks = [SyntheticTrainStream(task, seed=1, rank=rank, world_size=2) for rank in (0, 1)]
    single = SyntheticTrainStream(task, seed=1)
    for _ in range(2):
        together = torch.cat([stream.next_batch(3)[0] for stream in ranks])
        assert torch.equal(together, single.next_batch(6)[0])


# ----------------------------------------------------------------------------------------- evaluation


class FirstValueGuesser(nn.Module):
    """Predicts, at every position, the first context value (input_ids[:, 1]) with logit `margin`, all other
    tokens 0: right exactly when a query asks for the first pair."""

    def __init__(self, vocab_size: int, margin: float) -> None:
        super().__init__()
        self.vocab_size, self.margin = vocab_size, margin
        self.calls_under_grad = 0

    def forward(self, input_ids: torch.Tensor) -> CausalLMOutput:
        self.calls_under_grad += torch.is_grad_enabled()
        guess = input_ids[:, 1:2].expand_as(input_ids)  # [batch, seq]
        return CausalLMOutput(logits=self.margin * nn.functional.one_hot(guess, self.vocab_size).float())


def test_recall_accuracy_matches_a_hand_count():
    task = parse_task_spec("mqar:pairs=4,queries=6,vocab=32", 32)
    model = FirstValueGuesser(task.vocab_size, margin=2.0).train()
    result = recall_accuracy(model, task, num_examples=30, batch_size=7, device="cpu", seed=5)
    input_ids, labels = synthetic.heldout_examples(task, 5, 30)
    per_example = []  # hand count: a query is right exactly when its answer is the first context value
    for row, row_labels in zip(input_ids.tolist(), labels.tolist()):
        answers = [label for label in row_labels if label != IGNORE_INDEX]
        per_example.append(sum(answer == row[1] for answer in answers))
    correct = sum(per_example)
    mean = correct / 180  # 30 examples × 6 queries
    stderr = math.sqrt(sum((right / 6 - mean) ** 2 for right in per_example) / 29) / math.sqrt(30)
    # cross-entropy of logits margin·onehot(guess): log(e^margin + V − 1) − margin·[answer == guess]
    loss = math.log(math.exp(2.0) + 31) - 2.0 * mean
    assert 0 < correct < 180  # the count is informative
    assert result["correct"] == correct and result["scored"] == 180 and result["examples"] == 30
    assert result["accuracy"] == pytest.approx(mean) and result["stderr"] == pytest.approx(stderr)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert model.calls_under_grad == 0 and model.training  # no_grad, and the training mode is restored


# ------------------------------------------------------------------------------------------- training


def mqar_run():
    """A tiny hybrid fixedseqqk model, 6 steps on 3-pair MQAR, a checkpoint every 2 steps, evaluation every 3."""
    model = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}
    model |= {"max_position_embeddings": 40, "layers": "hybrid:fixedseqqk"}
    settings = {"data": "mqar:pairs=3,queries=fill,vocab=24", "seq_len": 16, "batch_size": 4, "global_batch_size": 4}
    settings |= {"max_steps": 6, "warmup_steps": 2, "save_every": 2, "eval_every": 3, "eval_sequences": 8}
    settings |= {"tensorboard": False, "device": "cpu"}
    return resolve_run_config("cpu-tiny", model_overrides=model, train_overrides=settings)


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_on_mqar_logs_accuracy_and_saves_a_loadable_model(tmp_path):
    out = train(mqar_run(), tmp_path / "mqar")
    records = read_metrics(out)
    assert [record["step"] for record in records] == list(range(1, 7))
    evaluated = [record for record in records if "eval_accuracy" in record]
    assert [record["step"] for record in evaluated] == [3, 6]
    assert all(0.0 <= record["eval_accuracy"] <= 1.0 and record["eval_loss"] > 0 for record in evaluated)
    assert not (out / "tokenizer.json").exists()  # no tokenizer is built for a synthetic task
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 24
    task = parse_task_spec("mqar:pairs=3,queries=fill,vocab=24", 16)
    assert model.model.shadow_token_ids.tolist() == synthetic.first_tokens(task, 0, 40)
    assert model.config.fixed_sequence_source == f"synthetic:{task.spec}"
    assert "data: mqar:pairs=3,queries=fill,vocab=24" in (out / "run_config.yaml").read_text()
    result = recall_accuracy(model, task, num_examples=8, batch_size=4, device="cpu")
    assert result["accuracy"] == pytest.approx(evaluated[-1]["eval_accuracy"])  # the same held-out set
    with pytest.raises(ValueError, match=r"trained on the synthetic task 'mqar:.*score it with `attnlab recall"):
        load_checkpoint(out)  # eval and analyze need text: they point to recall instead


def test_resume_on_mqar_reproduces_every_loss(tmp_path, monkeypatch):
    uninterrupted = read_metrics(train(mqar_run(), tmp_path / "whole"))
    monkeypatch.setattr(attnlab_train, "fault_hooks", InjectedFault("nan-at-step:5"))  # stops after checkpoint-4
    with pytest.raises(TrainingDiverged):
        train(mqar_run(), tmp_path / "interrupted")
    monkeypatch.undo()
    resumed = read_metrics(train(mqar_run(), tmp_path / "interrupted", resume=True))
    assert resumed == [{**record, "tokens_per_s": resumed[i]["tokens_per_s"]} for i, record in enumerate(uninterrupted)]
