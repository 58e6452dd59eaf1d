"""`attnlab eval` end to end through lm-evaluation-harness on a tiny trained checkpoint: offline tasks, a
local multiple-choice task YAML, per-sample log-likelihoods against the model's own logits, skip mode,
perplexity by context length, results files, the Table 1 layout, and every bad-input path."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from attnlab import AttnLabForCausalLM
from attnlab.cli import main
from attnlab.environment import installed_version
from attnlab.evaluation import (
    PAPER_TASKS,
    describe_pattern,
    evaluate_checkpoint,
    load_records,
    resolve_tasks,
    results_json,
    tokenizer_record,
    trained_seq_len,
)
from attnlab.runconfig import lock_output_file
from attnlab.tasks import BUILTIN_TASKS

from .conftest import PicklePayload, tiny_config

TINY_HYBRID = [
    "--hidden-size",
    "32",
    "--intermediate-size",
    "64",
    "--num-hidden-layers",
    "2",
    "--num-attention-heads",
    "2",
    "--layers",
    "standard,approximate",
]

# A small multiple-choice task with its data in a local JSONL file, as a user writes one to evaluate offline.
LOCAL_TASK_YAML = """\
task: local_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
LOCAL_TASK_DOCS = [
    {"question": "What colour is the sky on a clear day?", "choices": ["blue", "green", "red"], "label": 0},
    {"question": "What colour is grass?", "choices": ["purple", "green", "black"], "label": 1},
    {"question": "Which value does the function return?", "choices": ["None", "a list", "the string"], "label": 0},
    {"question": "What does the statement raise?", "choices": ["an exception", "a number", "a class"], "label": 0},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny hybrid (standard, approximate) model trained for 12 steps on CPython's documentation."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("eval")
    corpus = root / "topics.jsonl"
    corpus.write_text("".join(json.dumps({"text": topics[name]}) + "\n" for name in sorted(topics)[:60]))
    out = root / "run"
    status = main(
        [
            "train",
            "--preset",
            "cpu-tiny",
            *TINY_HYBRID,
            "--data",
            str(corpus),
            "--tokenizer",
            "bpe:320",
            "--out",
            str(out),
            "--seq-len",
            "128",
            "--batch-size",
            "4",
            "--global-batch-size",
            "4",
            "--max-steps",
            "12",
            "--warmup-steps",
            "2",
            "--save-every",
            "6",
            "--eval-every",
            "12",
            "--eval-sequences",
            "2",
            "--no-tensorboard",
        ]
    )
    assert status == 0
    return out


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("local_task")
    data = folder / "colours.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in LOCAL_TASK_DOCS))
    path = folder / "local_colours.yaml"
    path.write_text(LOCAL_TASK_YAML.format(data=data))
    return path


@pytest.fixture(scope="module")
def record(checkpoint, local_task) -> dict:
    selection = resolve_tasks(["lastword,cloze", "heldout", str(local_task)])
    return evaluate_checkpoint(checkpoint, selection, limit=12, batch_size=4, log_samples=True)


# ------------------------------------------------------------------------------------------------ tasks lists


def test_task_lists_expand_in_order_without_repeats(local_task):
    assert resolve_tasks("paper").names == PAPER_TASKS
    assert resolve_tasks("offline").names == BUILTIN_TASKS
    selection = resolve_tasks(["cloze,lastword", "cloze", str(local_task)])
    assert selection.names == ("cloze", "lastword", "local_colours")
    assert not selection.harness_tasks  # all ours or from files: the harness's own index is not needed
    assert resolve_tasks("cloze,arc_easy").harness_tasks


def test_a_task_file_is_indexed_through_links_to_its_siblings_only(local_task):
    folder = Path(resolve_tasks(str(local_task)).include_paths[-1])
    assert folder != local_task.parent
    assert sorted(p.name for p in folder.iterdir()) == ["local_colours.yaml"]  # not the data file
    assert (folder / "local_colours.yaml").resolve() == local_task.resolve()


def test_task_code_runs_only_when_allowed(tmp_path, capsys):
    """A task YAML's `!function` imports and runs a .py file beside it: opt-in, named in one line."""
    marker = tmp_path / "ran"
    (tmp_path / "helpers.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    coded = tmp_path / "coded.yaml"
    coded.write_text("task: coded\ncustom_dataset: !function helpers.make\noutput_type: loglikelihood\n")
    with pytest.raises(ValueError, match="runs Python code") as error:
        resolve_tasks(str(coded))
    assert str(error.value) == (
        f"task file {coded} runs Python code (!function); read it, and pass --allow-task-code if you trust it"
    )
    plain = tmp_path / "plain.yaml"
    plain.write_text("task: plain\noutput_type: loglikelihood\n")
    with pytest.raises(ValueError, match=f"task file {coded} runs Python code"):
        resolve_tasks(str(plain))  # a YAML beside it could be included, so it is named too
    coded.unlink()
    folder = Path(resolve_tasks(str(plain)).include_paths[-1])
    assert sorted(p.name for p in folder.iterdir()) == ["plain.yaml"]  # helpers.py is not reachable
    coded.write_text("task: coded\ncustom_dataset: !function helpers.make\noutput_type: loglikelihood\n")
    folder = Path(resolve_tasks(str(coded), allow_task_code=True).include_paths[-1])
    assert sorted(p.name for p in folder.iterdir()) == ["coded.yaml", "helpers.py", "plain.yaml"]
    assert not marker.exists()  # resolving reads YAML only; the harness imports helpers.py when it runs


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "no tasks given"),
        ("missing.yaml", "does not exist"),
        ("bad.yaml", "does not parse as YAML"),
        ("notask.yaml", "has no 'task: <name>' entry"),
    ],
)
def test_bad_task_specs_give_one_line(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text("task: [unclosed\n")
    Path("notask.yaml").write_text("output_type: multiple_choice\n")
    with pytest.raises(ValueError, match=message) as error:
        resolve_tasks(spec)
    assert "\n" not in str(error.value)


def test_pattern_kinds():
    assert describe_pattern(["standard"] * 3) == ("standard", "standard")
    assert describe_pattern(["mlp"] * 3) == ("uniform", "mlp")
    assert describe_pattern(["standard", "nonapprox", "standard"]) == ("hybrid", "nonapprox")
    assert describe_pattern(["mlp", "standard", "approximate"]) == ("mixed", "approximate+mlp")


# ------------------------------------------------------------------------------------- the harness end to end


def test_results_keep_the_harness_structure_with_sane_values(record, checkpoint):
    results = record["results"]
    assert set(results) == {"lastword", "cloze", "heldout", "local_colours"}
    for task, metric in [("lastword", "acc"), ("cloze", "acc"), ("cloze", "acc_norm"), ("local_colours", "acc")]:
        assert 0.0 <= results[task][f"{metric},none"] <= 1.0
        assert results[task][f"{metric}_stderr,none"] >= 0.0
    assert math.isfinite(results["lastword"]["perplexity,none"]) and results["lastword"]["perplexity,none"] > 1
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isfinite(results["heldout"][f"{metric},none"]) and results["heldout"][f"{metric},none"] > 0
    assert record["n-samples"]["lastword"]["effective"] == 12
    assert record["n-samples"]["local_colours"]["effective"] == len(LOCAL_TASK_DOCS)
    meta = record["attnlab"]
    assert meta["mixer_types"] == ["standard", "approximate"]
    assert (meta["kind"], meta["mixer"], meta["skip_nonstandard"]) == ("hybrid", "approximate", False)
    assert meta["checkpoint"] == str(checkpoint)
    assert meta["parameters"] > 0
    assert meta["versions"]["lm-eval"] == installed_version("lm-eval") is not None
    assert meta["versions"]["transformers"] == transformers.__version__
    assert meta["tokenizer"]["path"] == str(checkpoint) and len(meta["tokenizer"]["sha256"]) == 64
    assert tokenizer_record(checkpoint / "checkpoint-12") == meta["tokenizer"]  # a checkpoint uses its run's
    assert (meta["trained_seq_len"], meta["max_length"]) == (128, 128)  # not max_position_embeddings (256)


def test_the_tokenizer_record_changes_with_the_tokenizer(checkpoint, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy, ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard"))
    assert tokenizer_record(copy)["sha256"] == tokenizer_record(checkpoint)["sha256"]
    tokenizer = copy / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes() + b"\n")
    assert tokenizer_record(copy)["sha256"] != tokenizer_record(checkpoint)["sha256"]


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from the model's logits, tokenized as the harness does it:
    trailing spaces of the context move to the continuation, the pair is encoded whole, the continuation
    is what follows the context's own encoding, and the input keeps the last 128 tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuation_ids = whole[len(context_ids) :]
    window = 128  # the training --seq-len: the harness's window (LoadedCheckpoint.context_length)
    ids = torch.tensor([(context_ids + continuation_ids)[-(window + 1) :][:-1]])
    with torch.no_grad():
        log_probs = model(ids).logits.double().log_softmax(-1)[0, -len(continuation_ids) :]
    targets = torch.tensor(continuation_ids)
    total = log_probs.gather(1, targets[:, None]).sum().item()
    greedy = bool((log_probs.argmax(-1) == targets).all())
    return total, greedy


def test_harness_loglikelihoods_equal_the_models_own(record, checkpoint):
    from attnlab.evaluation import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    compared = 0
    for task in ("lastword", "local_colours", "cloze"):
        for sample in record["samples"][task][:3]:
            for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
                harness_value, harness_greedy = response[0]
                value, greedy = _direct_loglikelihood(loaded.model, loaded.tokenizer, context, continuation)
                assert harness_value == pytest.approx(value, abs=1e-4, rel=1e-5)
                assert harness_greedy == greedy
                compared += 1
    assert compared >= 3 + 3 * 3 + 3 * 4


def test_offline_task_documents_come_from_held_out_text(record):
    from attnlab.tasks import task_items

    lastword = task_items("lastword")
    for sample in record["samples"]["lastword"]:
        doc = lastword[sample["doc_id"]]
        assert sample["arguments"][0] == (doc["context"], " " + doc["target"])
    cloze = task_items("cloze")
    for sample in record["samples"]["cloze"]:
        doc = cloze[sample["doc_id"]]
        assert [pair[1] for pair in sample["arguments"]] == [" " + ending for ending in doc["endings"]]
        assert sample["target"] == doc["label"]


def test_skip_mode_removes_the_nonstandard_layers(checkpoint, record):
    from transformers import AutoModelForCausalLM

    from attnlab.evaluation import load_checkpoint

    skipped = evaluate_checkpoint(checkpoint, resolve_tasks("lastword"), limit=12, batch_size=4, skip_nonstandard=True)
    assert skipped["attnlab"]["skip_nonstandard"] is True
    assert skipped["results"]["lastword"]["perplexity,none"] != record["results"]["lastword"]["perplexity,none"]
    # The layers are (standard, approximate): skipping the second leaves the model's first layer alone.
    model = load_checkpoint(checkpoint, skip_nonstandard=True).model
    first_layer_only = AutoModelForCausalLM.from_pretrained(checkpoint, num_hidden_layers=1, mixer_types=["standard"])
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, first_layer_only(ids).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(model(ids).logits, load_checkpoint(checkpoint).model(ids).logits)


def rolling_log_likelihood(model, ids: list[int], prefix: int, context: int) -> float:
    """Σ log p(token) over `ids`, each token predicted once from at most `context` tokens, written out by
    hand: the first `context` tokens after `prefix` (the eos token), every later full chunk of `context`
    tokens after the token before it, and a last partial chunk after the `context` tokens before its end
    (lm-eval's non-overlapping rolling windows)."""
    windows = [([prefix, *ids[: context - 1]], 0, min(context, len(ids)))]  # (inputs, first target, end)
    for start in range(context, len(ids), context):
        end = min(start + context, len(ids))
        windows.append((ids[end - 1 - context : end - 1], start, end))
    total = 0.0
    for inputs, start, end in windows:
        with torch.no_grad():
            logits = model(torch.tensor([inputs])).logits[0].double()  # [len(inputs), vocab]
        predicted = logits[len(inputs) - (end - start) :].log_softmax(-1)  # the rows that predict ids[start:end]
        total += predicted.gather(1, torch.tensor(ids[start:end])[:, None]).sum().item()
    return total


def test_perplexity_by_context_equals_rolling_windows_by_hand(checkpoint, tmp_path):
    from pydoc_data.topics import topics

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(topics[name] for name in sorted(topics)[-6:]))
    results = tmp_path / "ppl.json"
    command = ["eval", str(checkpoint), "--ppl-contexts", "16,64", "--ppl-data", str(text), "--out", str(results)]
    assert main([*command, "--batch-size", "4"]) == 0
    table = json.loads(results.read_text())["ppl_contexts"]["by_context"]
    assert list(table) == ["16", "64"]

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    content = text.read_text()
    ids = tokenizer(content, add_special_tokens=False)["input_ids"]
    words, num_bytes = len(content.split()), len(content.encode("utf-8"))
    for context in (16, 64):
        log_likelihood = rolling_log_likelihood(model, ids, tokenizer.eos_token_id, context)
        values = table[str(context)]
        # float32 logits, windows batched differently: measured relative differences up to 6e-8
        assert values["word_perplexity"] == pytest.approx(math.exp(-log_likelihood / words), rel=1e-5)
        assert values["byte_perplexity"] == pytest.approx(math.exp(-log_likelihood / num_bytes), rel=1e-5)
        assert values["bits_per_byte"] == pytest.approx(-log_likelihood / num_bytes / math.log(2), rel=1e-5)
    assert table["16"]["word_perplexity"] != pytest.approx(table["64"]["word_perplexity"], rel=1e-3)
    with pytest.raises(ValueError, match="outside 2..256"):
        evaluate_checkpoint(checkpoint, None, ppl_contexts=[512], ppl_data=text)
    heldout = evaluate_checkpoint(checkpoint, None, ppl_contexts=[64], ppl_data="heldout", batch_size=32)
    assert math.isfinite(heldout["ppl_contexts"]["by_context"]["64"]["word_perplexity"])
    with pytest.raises(ValueError, match="--max-length 300 is outside 2..256"):
        evaluate_checkpoint(checkpoint, resolve_tasks("cloze"), max_length=300)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_eval_in_reduced_precision_records_the_dtype_and_tracks_float32(checkpoint, tmp_path, dtype):
    from pydoc_data.topics import topics

    text = tmp_path / "text.txt"
    text.write_text(topics[sorted(topics)[-1]])
    perplexities = {}
    for name in ("float32", dtype):
        out = tmp_path / f"{name}.json"
        command = ["eval", str(checkpoint), "--ppl-contexts", "64", "--ppl-data", str(text), "--dtype", name]
        assert main([*command, "--out", str(out)]) == 0
        record = json.loads(out.read_text())
        assert record["attnlab"]["dtype"] == name
        perplexities[name] = record["ppl_contexts"]["by_context"]["64"]["byte_perplexity"]
    # measured: bfloat16 0.1 %, float16 0.01 % from float32 (the rounding of the weights alone moves it)
    assert perplexities[dtype] != perplexities["float32"]
    assert perplexities[dtype] == pytest.approx(perplexities["float32"], rel=0.02)


def test_a_bad_max_length_is_refused_before_the_weights_are_read(checkpoint, monkeypatch):
    import attnlab.evaluation

    monkeypatch.setattr(attnlab.evaluation, "load_checkpoint", lambda *args, **kwargs: pytest.fail("weights read"))
    for length in (0, 257):
        with pytest.raises(ValueError, match=f"--max-length {length} is outside 2..256"):
            evaluate_checkpoint(checkpoint, resolve_tasks("cloze"), max_length=length)


# ----------------------------------------------------------------------------------------------- the command


def test_eval_and_table_commands_write_results_and_tables(checkpoint, tmp_path, capsys):
    out = tmp_path / "results.json"
    samples = tmp_path / "samples.jsonl"
    assert (
        main(
            [
                "eval",
                str(checkpoint),
                "--tasks",
                "lastword",
                "--limit",
                "5",
                "--batch-size",
                "4",
                "--out",
                str(out),
                "--samples",
                str(samples),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                str(checkpoint),
                str(checkpoint / "checkpoint-6"),
                "--tasks",
                "cloze",
                "--limit",
                "4",
                "--skip-nonstandard",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "skip.json"),
            ]
        )
        == 0
    )
    single = json.loads(out.read_text())
    assert single["results"]["lastword"]["acc,none"] == load_records(out)[0]["results"]["lastword"]["acc,none"]
    assert len([json.loads(line) for line in samples.read_text().splitlines()]) == 5
    assert [r["attnlab"]["checkpoint"] for r in load_records(tmp_path / "skip.json")] == [
        str(checkpoint),
        str(checkpoint / "checkpoint-6"),
    ]
    capsys.readouterr()
    assert main(["table", str(out), str(tmp_path / "skip.json"), "--out", str(tmp_path / "table1")]) == 0
    markdown = capsys.readouterr().out
    assert (tmp_path / "table1.md").read_text() == markdown
    lines = markdown.splitlines()
    assert lines[0] == "| group | model | lastword acc | lastword ppl | cloze acc | cloze acc_norm |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| reference", "| hybrid", "| skip", "| skip"]
    assert "approximate (run)" in markdown and "approximate (run/checkpoint-6)" in markdown
    csv_lines = (tmp_path / "table1.csv").read_text().splitlines()
    assert csv_lines[0].startswith("group,model,checkpoint,parameters,mixer_types,lastword acc,lastword acc stderr")
    assert len(csv_lines) == 1 + 2 + 3


def _one_line_error(capsys, argv) -> str:
    """Exit status 2 and one error line at the end of stderr (progress bars may come before it)."""
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("attnlab: error: ") == 1, stderr
    error = "attnlab: error: " + stderr.split("attnlab: error: ")[1]
    assert error.endswith("\n") and "\n" not in error[:-1], error
    return error.strip()


def test_bad_checkpoints_give_one_line(tmp_path, capsys):
    assert "does not exist" in _one_line_error(capsys, ["eval", str(tmp_path / "nowhere"), "--tasks", "cloze"])
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _one_line_error(capsys, ["eval", str(tmp_path / "empty")])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert "holds a 'qwen2' model, not an attnlab one" in _one_line_error(capsys, ["eval", str(foreign)])
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    assert "is not a JSON model config" in _one_line_error(capsys, ["eval", str(tmp_path / "list")])


def test_a_model_folder_reads_only_its_own_tokenizer_and_run_config(checkpoint, tmp_path, capsys):
    """A model copied next to another run's files must not borrow that run's tokenizer or settings."""
    neighbour = tmp_path / "other-run"
    shutil.copytree(checkpoint, neighbour, ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard"))
    model = neighbour / "my-model"
    shutil.copytree(checkpoint, model, ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard", "tokenizer*"))
    (model / "run_config.yaml").unlink()
    error = _one_line_error(capsys, ["eval", str(model), "--tasks", "lastword", "--out", str(tmp_path / "r.json")])
    assert (
        error == f"attnlab: error: no tokenizer in {model}; attnlab train saves one in --out (copy it beside the model)"
    )
    assert trained_seq_len(model) is None  # not the neighbour's seq_len
    (model / "run_config.yaml").write_text("train: 5\n")
    assert trained_seq_len(model) is None


def test_pickled_weights_are_refused_without_being_read(tmp_path, capsys):
    """attnlab writes safetensors only; a pytorch_model.bin is a pickle, which loading would execute."""
    pickled = tmp_path / "pickled"
    model = AttnLabForCausalLM(tiny_config())
    model.config.save_pretrained(pickled)
    marker = tmp_path / "ran"
    torch.save({"weights": model.state_dict(), "payload": PicklePayload(marker)}, pickled / "pytorch_model.bin")
    error = _one_line_error(capsys, ["eval", str(pickled), "--tasks", "cloze"])
    assert "holds pickled PyTorch weights (*.bin), which attnlab does not load" in error
    assert not marker.exists()
    torch.load(pickled / "pytorch_model.bin", weights_only=False)  # what a pickle loader would have done
    assert marker.exists()


def test_bad_tasks_give_one_line(checkpoint, tmp_path, capsys):
    error = _one_line_error(capsys, ["eval", str(checkpoint), "--tasks", "clozee", "--out", str(tmp_path / "r.json")])
    assert "unknown task 'clozee'; did you mean cloze" in error
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: broken\ndoc_to_text: [\n")
    assert "does not parse as YAML" in _one_line_error(capsys, ["eval", str(checkpoint), "--tasks", str(broken)])
    assert not (tmp_path / "r.json").exists()  # nothing half-written


def test_a_task_that_needs_the_network_says_so(checkpoint, tmp_path, capsys):
    hub_task = tmp_path / "hub_task.yaml"
    hub_task.write_text(
        "task: hub_task\ndataset_path: attnlab-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
    )
    error = _one_line_error(capsys, ["eval", str(checkpoint), "--tasks", str(hub_task)])
    assert "task 'hub_task'" in error
    assert "Hugging Face Hub, which is unreachable" in error or "could not be loaded" in error


def test_a_task_that_fails_to_build_is_not_blamed_on_the_hub(checkpoint, tmp_path, capsys, monkeypatch):
    import attnlab.data.hub

    # The Hub unreachable, as offline: only a failure to fetch data is blamed on it, not a template error.
    monkeypatch.setattr(attnlab.data.hub, "hub_unreachable_reason", lambda: "https://hub.test: no network")
    data = tmp_path / "colours.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in LOCAL_TASK_DOCS))
    undefined_field = tmp_path / "mytask.yaml"
    undefined_field.write_text(
        LOCAL_TASK_YAML.replace("local_colours", "mytask")
        .replace("{{{{question}}}}", "{{{{premise}}}}")
        .format(data=data)
    )
    error = _one_line_error(capsys, ["eval", str(checkpoint), "--tasks", str(undefined_field)])
    assert (
        error == "attnlab: error: task 'mytask' failed to build: UndefinedError: 'premise' is undefined; check its YAML"
    )
    hub_task = tmp_path / "hub_task.yaml"
    hub_task.write_text(
        "task: hub_task\ndataset_path: attnlab-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
    )
    error = _one_line_error(capsys, ["eval", str(checkpoint), "--tasks", str(hub_task)])
    assert error.startswith(
        "attnlab: error: task 'hub_task' needs data from the Hugging Face Hub, which is unreachable "
        "(https://hub.test: no network), and it is not in the local cache (ConnectionError: "
    )


def test_only_errors_from_the_hub_client_are_blamed_on_the_hub():
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
    from huggingface_hub.errors import OfflineModeIsEnabled
    from jinja2.exceptions import UndefinedError

    from attnlab.evaluation import _is_hub_error

    def raised_from(cause: BaseException) -> BaseException:
        try:
            raise RuntimeError("the harness wraps it") from cause
        except RuntimeError as error:
            return error

    assert _is_hub_error(ConnectionError("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)"))
    assert _is_hub_error(raised_from(OfflineModeIsEnabled("offline")))
    assert _is_hub_error(DatasetNotFoundError("Dataset 'x/y' doesn't exist on the Hub"))  # Hub reachable: its answer
    assert not _is_hub_error(UndefinedError("'premise' is undefined"))
    assert not _is_hub_error(FileNotFoundError("Unable to find '/data/missing.jsonl'"))  # a local file
    assert not _is_hub_error(DataFilesNotFoundError("No (supported) data files found in /data"))


def test_ppl_contexts_need_data(checkpoint, capsys):
    assert "needs --ppl-data" in _one_line_error(capsys, ["eval", str(checkpoint), "--ppl-contexts", "16,32"])


def test_generation_tasks_decode_greedily_as_full_recomputation_does(checkpoint, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in ["The function", "A class is"]))
    task = tmp_path / "gen.yaml"
    task.write_text(
        f"task: tiny_generation\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['<never>']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    record = evaluate_checkpoint(checkpoint, resolve_tasks(str(task)), batch_size=2, log_samples=True)
    from attnlab.evaluation import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    for sample in record["samples"]["tiny_generation"]:
        prompt = sample["doc"]["prompt"]
        ids = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        expected = loaded.model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        assert sample["resps"][0][0] == loaded.tokenizer.decode(expected[0, ids.shape[1] :])


def test_a_continuation_longer_than_the_window_is_refused_in_one_line(checkpoint, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    long_answer = " ".join(["positional arguments and keyword arguments"] * 12)
    data.write_text(json.dumps({"question": "What?", "choices": [long_answer, "no"], "label": 0}) + "\n")
    task = tmp_path / "long_choice.yaml"
    task.write_text(LOCAL_TASK_YAML.replace("local_colours", "long_choice").format(data=data))
    error = _one_line_error(
        capsys, ["eval", str(checkpoint), "--tasks", str(task), "--max-length", "16", "--out", str(tmp_path / "r.json")]
    )
    assert "does not fit the 16-token window; raise --max-length" in error
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------------------------------ recall


def test_recall_of_a_missing_checkpoint_says_it_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    error = _one_line_error(capsys, ["recall", str(missing), "--out", str(tmp_path / "r.json")])
    assert error == f"attnlab: error: checkpoint {missing} does not exist"


def test_recall_tells_a_bad_task_from_a_run_not_trained_on_one(checkpoint, tmp_path, capsys):
    out = ["--out", str(tmp_path / "r.json")]
    error = _one_line_error(capsys, ["recall", str(checkpoint), "--task", "bogus:x=1", *out])
    assert error == "attnlab: error: unknown synthetic task 'bogus' in 'bogus:x=1'; valid tasks: mqar, induction"
    error = _one_line_error(capsys, ["recall", str(checkpoint), "--task", "mqar:keys=4", *out])
    assert "bad option 'keys=4' in synthetic task 'mqar:keys=4'" in error
    error = _one_line_error(capsys, ["recall", str(checkpoint), *out])  # trained on a corpus, no --task
    assert f"{checkpoint} was not trained on a synthetic task (train.data = " in error
    assert not (tmp_path / "r.json").exists()


def test_unwritable_outputs_are_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    import attnlab.evaluation

    monkeypatch.setattr(attnlab.evaluation, "run_harness", lambda *a, **k: pytest.fail("the evaluation ran"))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    base = ["eval", str(checkpoint), "--tasks", "lastword", "--limit", "2"]
    error = _one_line_error(capsys, [*base, "--out", str(folder)])
    assert error == f"attnlab: error: --out {folder} is a folder; give a file path such as {folder / 'results.json'}"
    error = _one_line_error(capsys, [*base, "--out", str(tmp_path / "r.json"), "--samples", str(tmp_path / "no/s")])
    assert error == f"attnlab: error: --samples {tmp_path / 'no/s'}: folder {tmp_path / 'no'} does not exist"
    two = ["eval", str(checkpoint), str(tmp_path / "nowhere"), "--tasks", "lastword", "--out", str(tmp_path / "r.json")]
    error = _one_line_error(capsys, two)
    assert error == f"attnlab: error: checkpoint {tmp_path / 'nowhere'} does not exist"  # checked before the first
    assert "is a folder" in _one_line_error(capsys, ["recall", str(checkpoint), "--task", "mqar", "--out", str(folder)])
    if Path("/proc/self").is_dir():  # a folder that exists but takes no new files
        error = _one_line_error(capsys, [*base, "--out", "/proc/results.json"])
        assert error.startswith("attnlab: error: --out /proc/results.json: cannot write in /proc (")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-folder"]  # no results, no temporary files


def test_perplexity_inputs_are_checked_before_the_tasks_run(checkpoint, tmp_path, capsys, monkeypatch):
    import attnlab.evaluation

    monkeypatch.setattr(attnlab.evaluation, "run_harness", lambda *a, **k: pytest.fail("the evaluation ran"))
    base = ["eval", str(checkpoint), "--tasks", "lastword", "--out", str(tmp_path / "r.json")]
    error = _one_line_error(capsys, [*base, "--ppl-contexts", "16", "--ppl-data", str(tmp_path / "missing.txt")])
    assert str(tmp_path / "missing.txt") in error
    error = _one_line_error(capsys, [*base, "--ppl-contexts", "0", "--ppl-data", "heldout"])
    assert error == "attnlab: error: context length 0 is outside 2..256 (the model's max_position_embeddings)"
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "other-width"])
def test_weights_that_cannot_be_read_give_one_line(checkpoint, tmp_path, capsys, damage):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken, ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard"))
    if damage == "truncated":  # an interrupted copy
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    for argv in (
        ["eval", str(broken), "--tasks", "lastword", "--out", str(tmp_path / "r.json")],
        ["recall", str(broken), "--task", "mqar:pairs=2,queries=2,vocab=64", "--out", str(tmp_path / "r.json")],
    ):
        error = _one_line_error(capsys, argv)
        assert error.startswith(f"attnlab: error: checkpoint {broken}: the weights cannot be read or do not fit")


def test_bad_batch_sizes_are_refused_by_the_parser(checkpoint, capsys):
    for argv in (
        ["eval", str(checkpoint), "--batch-size", "auto:0"],
        ["eval", str(checkpoint), "--batch-size", "auto:abc"],
        ["eval", str(checkpoint), "--batch-size", "0"],
        ["recall", str(checkpoint), "--batch-size", "0"],
        ["recall", str(checkpoint), "--num-examples", "-1"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "expected a positive integer" in capsys.readouterr().err


def test_a_single_recall_example_has_no_standard_error(checkpoint, tmp_path, capsys):
    out = tmp_path / "recall.json"
    task = "mqar:pairs=2,queries=2,vocab=64"
    assert main(["recall", str(checkpoint), "--task", task, "--num-examples", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["stderr"] is None  # strict JSON: no NaN
    assert "± n/a %" in capsys.readouterr().err


def test_table_reads_files_only_and_keeps_dots_in_its_prefix(record, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(results_json([record]))
    assert "is a folder; give a results file" in _one_line_error(capsys, ["table", str(tmp_path)])
    assert main(["table", str(results), "--out", str(tmp_path / "table1_v1.0")]) == 0
    assert {path.name for path in tmp_path.iterdir()} == {"results.json", "table1_v1.0.md", "table1_v1.0.csv"}


def test_existing_outputs_are_replaced_only_with_overwrite(checkpoint, record, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(results_json([record]))
    (tmp_path / "t.csv").write_text("mine\n")
    error = _one_line_error(capsys, ["table", str(results), "--out", str(tmp_path / "t")])
    assert (
        error
        == f"attnlab: error: --out {tmp_path / 't.csv'} exists; pass --overwrite to replace it, or give another path"
    )
    assert (tmp_path / "t.csv").read_text() == "mine\n" and not (tmp_path / "t.md").exists()
    assert main(["table", str(results), "--out", str(tmp_path / "t"), "--overwrite"]) == 0
    assert (tmp_path / "t.csv").read_text() != "mine\n"
    for command in (["eval", str(checkpoint), "--tasks", "lastword"], ["recall", str(checkpoint), "--task", "mqar"]):
        error = _one_line_error(capsys, [*command, "--out", str(results)])
        assert "exists; pass --overwrite to replace it" in error
        with lock_output_file(results):  # as another eval or recall writing this file holds it
            error = _one_line_error(capsys, [*command, "--out", str(results), "--overwrite"])
        assert error == (
            f"attnlab: error: {results} is in use by another attnlab process (PID {os.getpid()}); wait for it to "
            "end, or choose another path"
        )
    assert results.read_text() == results_json([record])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git, which the harness calls")
def test_an_evaluation_outside_a_git_repository_prints_no_git_error(checkpoint, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval records `git describe` of the working folder
    argv = ["eval", str(checkpoint), "--tasks", "lastword", "--limit", "2", "--out", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert "not a git repository" not in capfd.readouterr().err


def test_a_task_that_fails_to_build_points_at_where_its_data_comes_from(checkpoint, tmp_path, capsys):
    bogus = tmp_path / "bogus"
    error = _one_line_error(capsys, ["eval", str(checkpoint), "--tasks", "lastword", "--corpus", str(bogus)])
    assert error.startswith("attnlab: error: task 'lastword' failed to build: ")
    assert str(bogus) in error and error.endswith("; check --corpus (the built-in tasks read its held-out text)")
