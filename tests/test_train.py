"""`attnlab train` end to end on a tiny model: exact resume after SIGKILL, atomic checkpoints, the
divergence guard, DDP under torchrun (gloo), run configuration, and every bad-input path."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import attnlab  # noqa: F401  (registers the Auto classes)
from attnlab.cli import main
from attnlab.environment import installed_version
from attnlab.runconfig import check_resume_compatible, resolve_run_config, write_text_atomic

from .conftest import PicklePayload, ctrl_c_reaches_children

TINY_MODEL = [
    "--hidden-size",
    "32",
    "--intermediate-size",
    "64",
    "--num-hidden-layers",
    "2",
    "--num-attention-heads",
    "2",
]


def tiny_train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--preset",
        "cpu-tiny",
        *TINY_MODEL,
        "--data",
        str(corpus),
        "--tokenizer",
        "bpe:320",
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--global-batch-size",
        "4",
        "--max-steps",
        "12",
        "--warmup-steps",
        "2",
        "--save-every",
        "4",
        "--eval-every",
        "4",
        "--eval-sequences",
        "4",
        "--no-tensorboard",
        *extra,
    ]


FAULTY_ATTNLAB = Path(__file__).with_name("faulty_attnlab.py")


def run_attnlab(args: list[str], fault: str | None = None, launcher: list[str] | None = None, env=None):
    """`attnlab ARGS` in a child process (environment variables `env` added); with `fault`, through the
    test-only launcher that injects it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if fault:
        assert launcher is None
        command = [sys.executable, str(FAULTY_ATTNLAB), fault, *args]
    else:
        command = (launcher or [sys.executable, "-m"]) + ["attnlab", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def run_here(args: list[str], capfd) -> tuple[int, str]:
    """`attnlab ARGS` in this process (a child spends seconds importing torch and transformers): the exit
    status and everything written to stderr, file descriptor 2 included. The suite's one thread matches the
    children's OMP_NUM_THREADS=1, so a run here reproduces a child's losses bit for bit."""
    capfd.readouterr()
    try:
        status = main(args)
    except SystemExit as exit_:
        status = exit_.code
    return status, capfd.readouterr().err


def logged(out: Path, key: str) -> dict[int, float]:
    """Step → the value of `key` metrics.jsonl records for it."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record[key] for record in records}


def losses(out: Path) -> dict[int, float]:
    return logged(out, "loss")


def logged_steps(out: Path) -> int:
    """How many complete lines metrics.jsonl has (0 before it exists)."""
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.is_file() else 0


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen, deadline_s: float = 600) -> None:
    """Poll until `condition()` holds. Fails, saying `what` was awaited, if `process` ends first or after
    `deadline_s` seconds: a guard against a hang, never what decides a passing test."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit status {process.returncode}) before {what}:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting for {what} after {deadline_s:.0f} s")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def uninterrupted(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    result = run_attnlab(tiny_train_args(corpus, out))
    assert result.returncode == 0, result.stderr
    return out


def test_a_run_writes_metrics_checkpoints_and_a_loadable_final_model(uninterrupted):
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, 13))
    for record in records:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"} <= set(record)
        assert record["tokens"] == record["step"] * 4 * 32
    assert [record["step"] for record in records if "eval_loss" in record] == [4, 8, 12]
    assert records[-1]["loss"] < records[0]["loss"]
    assert sorted(p.name for p in uninterrupted.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]  # keep 2
    model = AutoModelForCausalLM.from_pretrained(uninterrupted)
    tokenizer = AutoTokenizer.from_pretrained(uninterrupted)
    assert model.config.vocab_size == 320 and len(tokenizer) <= 320
    resolved = yaml.safe_load((uninterrupted / "run_config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 12 and resolved["model"]["hidden_size"] == 32
    assert resolved["versions"]["torch"] == installed_version("torch")  # recorded by the training process
    checkpoint = AutoModelForCausalLM.from_pretrained(uninterrupted / "checkpoint-12")
    for (name, final), (_, saved) in zip(model.state_dict().items(), checkpoint.state_dict().items()):
        assert torch.equal(final, saved), name


def test_resume_after_sigkill_reproduces_every_loss(corpus, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    killed = run_attnlab(tiny_train_args(corpus, out), fault="kill-at-step:7")
    assert killed.returncode == -signal.SIGKILL
    assert max(losses(out)) == 6 and (out / "checkpoint-4").is_dir()
    resumed = run_attnlab(tiny_train_args(corpus, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out) == losses(uninterrupted)  # bit-identical on CPU, steps 5..12 recomputed from step 4


def test_a_crafted_trainer_state_is_refused_and_never_runs(corpus, uninterrupted, tmp_path, capfd):
    out = tmp_path / "crafted"
    shutil.copytree(uninterrupted, out)
    marker = tmp_path / "ran"
    state_file = out / "checkpoint-12" / "trainer_state.pt"
    torch.save({**torch.load(state_file, weights_only=True), "payload": PicklePayload(marker)}, state_file)
    manifest_file = out / "checkpoint-12" / "manifest.json"  # the attacker also rewrites the manifest
    manifest = json.loads(manifest_file.read_text())
    content = state_file.read_bytes()
    manifest["files"]["trainer_state.pt"] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    manifest_file.write_text(json.dumps(manifest))
    status, stderr = run_here(tiny_train_args(corpus, out, "--resume", "--max-steps", "16"), capfd)
    assert status == 2 and not marker.exists()
    assert stderr.strip().splitlines() == [
        f"attnlab: error: {state_file} holds Python objects other than tensors and plain values; attnlab does not "
        "unpickle them (that could run code). It was not written by attnlab: resume from a checkpoint you trust"
    ]
    assert losses(out) == losses(uninterrupted)  # nothing was rewritten on the way


def test_the_fault_environment_variable_of_old_versions_does_nothing(corpus, tmp_path):
    out = tmp_path / "unfaulted"
    env_fault = {**os.environ, "ATTNLAB_FAULT": "kill-at-step:2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "attnlab", *tiny_train_args(corpus, out, "--max-steps", "3")],
        capture_output=True,
        text=True,
        env=env_fault,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(losses(out)) == [1, 2, 3]


def test_an_unrelated_folder_is_refused_and_kept_byte_for_byte(corpus, tmp_path, capsys):
    out = tmp_path / "project"
    (out / "tensorboard").mkdir(parents=True)
    files = {"notes.txt": b"my notes\n", "config.json": b'{"mine": true}', "tensorboard/events": b"\x00\x01"}
    for name, content in files.items():
        (out / name).write_bytes(content)
    assert main(tiny_train_args(corpus, out)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"attnlab: error: {out} is not empty (config.json, notes.txt, tensorboard) and holds no attnlab run; choose "
        "a new or empty --out, or pass --overwrite to train there (attnlab's own files are replaced, the others kept)"
    ]
    assert sorted(str(path.relative_to(out)) for path in out.rglob("*")) == sorted([*files, "tensorboard"])
    assert all((out / name).read_bytes() == content for name, content in files.items())


def test_overwrite_replaces_attnlab_files_only(corpus, uninterrupted, tmp_path, capfd):
    out = tmp_path / "again"
    shutil.copytree(uninterrupted, out)
    (out / "notes.txt").write_text("mine\n")
    status, stderr = run_here(tiny_train_args(corpus, out, "--max-steps", "4"), capfd)
    assert status == 2 and "pass --resume to continue it, --overwrite to replace it" in stderr
    status, stderr = run_here(tiny_train_args(corpus, out, "--max-steps", "4", "--overwrite"), capfd)
    assert status == 0, stderr
    assert (out / "notes.txt").read_text() == "mine\n"
    assert sorted(losses(out)) == [1, 2, 3, 4] and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    status, stderr = run_here(tiny_train_args(corpus, out, "--resume", "--overwrite"), capfd)
    assert status == 2 and "pass one of them" in stderr


def test_a_second_writer_fails_at_once_and_the_first_keeps_its_run(corpus, uninterrupted, tmp_path, capfd):
    out, release = tmp_path / "busy", tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    held = [sys.executable, str(FAULTY_ATTNLAB), f"wait-at-step:6:{release}", *tiny_train_args(corpus, out)]
    first = subprocess.Popen(held, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: logged_steps(out) == 5, "the first run logged step 5 and waited before step 6", first)
        status, stderr = run_here(tiny_train_args(corpus, out), capfd)
        assert status == 2
        assert stderr.strip().splitlines() == [
            f"attnlab: error: {out} is in use by another attnlab process (PID {first.pid}); wait for it to end, "
            "or choose another folder"
        ]
        status, stderr = run_here(tiny_train_args(corpus, out, "--resume"), capfd)
        assert status == 2 and f"(PID {first.pid})" in stderr
    finally:
        release.touch()
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert losses(out) == losses(uninterrupted)  # the first run's metrics, whole


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.pt"])
def test_resume_skips_a_damaged_newest_checkpoint_and_matches_the_uninterrupted_run(
    corpus, uninterrupted, tmp_path, capfd, damaged
):
    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted, out)
    newest = out / "checkpoint-12" / damaged
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy or a save cut off
    status, stderr = run_here(tiny_train_args(corpus, out, "--resume"), capfd)
    assert status == 0, stderr
    size = (uninterrupted / "checkpoint-12" / damaged).stat().st_size
    expected = f"checkpoint-12 is damaged ({damaged} has {size // 2} bytes, {size} written); skipping it"
    assert f"attnlab: {expected}" in stderr.splitlines()
    assert losses(out) == losses(uninterrupted)  # steps 9..12 recomputed from checkpoint-8, bit for bit


def test_a_full_disk_while_saving_gives_one_line_and_a_resumable_folder(corpus, uninterrupted, tmp_path, capfd):
    out = tmp_path / "full"
    full = run_attnlab(tiny_train_args(corpus, out), fault="enospc-during-save:8")
    assert full.returncode == 1
    assert full.stderr.strip().splitlines()[-1] == (
        f"attnlab: error: No space left on device while writing checkpoint-8 in {out}; checkpoint-4 is intact "
        "(free space, then rerun with --resume)"
    )
    assert not list(out.glob(".checkpoint-*")) and not (out / "checkpoint-8").exists()
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 9, "lo')  # and the metrics line being written when the disk filled up
    status, stderr = run_here(tiny_train_args(corpus, out, "--resume"), capfd)
    assert status == 0, stderr
    assert f"attnlab: {out / 'metrics.jsonl'}: dropped its torn last line (a write that was cut off)" in stderr
    assert losses(out) == losses(uninterrupted)


def test_resume_refuses_what_it_cannot_continue_without_changing_anything(corpus, uninterrupted, tmp_path, capfd):
    out = tmp_path / "finished"
    shutil.copytree(uninterrupted, out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    status, stderr = run_here(tiny_train_args(corpus, out, "--resume", "--max-steps", "8"), capfd)
    assert status == 2
    assert stderr.strip().splitlines() == [
        "attnlab: error: --resume: checkpoint-12 is past the 8 steps this run is now asked for; give a larger "
        "--max-steps (or --tokens) to train on, nothing was changed"
    ]
    after = {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name != ".attnlab.lock"}
    assert after == {path: content for path, content in before.items() if path.name != ".attnlab.lock"}
    for text, message in [("[unclosed", "is not valid YAML"), ("just a string\n", "has no 'model:' and 'train:'")]:
        (out / "run_config.yaml").write_text(text)
        status, stderr = run_here(tiny_train_args(corpus, out, "--resume"), capfd)
        assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert message in stderr


def test_activation_checkpointing_trains_the_same_model(corpus, uninterrupted, tmp_path, capfd):
    """Recomputing each layer in backward changes memory, not arithmetic: the same loss at every step."""
    out = tmp_path / "checkpointed"
    status, stderr = run_here(tiny_train_args(corpus, out, "--activation-checkpointing"), capfd)
    assert status == 0, stderr
    assert losses(out) == losses(uninterrupted)
    assert yaml.safe_load((out / "run_config.yaml").read_text())["train"]["activation_checkpointing"] is True


def test_a_kill_while_saving_leaves_the_previous_checkpoint_intact(corpus, uninterrupted, tmp_path, capfd):
    out = tmp_path / "killed-saving"
    killed = run_attnlab(tiny_train_args(corpus, out), fault="kill-during-save:8")
    assert killed.returncode == -signal.SIGKILL
    (half_written,) = out.glob(".checkpoint-8.*.tmp")  # named for the writing process, never renamed
    assert (half_written / "model.safetensors").is_file()
    assert not (out / "checkpoint-8").exists()
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-4")  # the previous one still loads
    status, stderr = run_here(tiny_train_args(corpus, out, "--resume"), capfd)
    assert status == 0, stderr
    assert not list(out.glob(".checkpoint-*.tmp"))
    assert losses(out) == losses(uninterrupted)


def test_divergence_guard_stops_with_one_line_and_leaves_finite_checkpoints(corpus, tmp_path):
    out = tmp_path / "diverged"
    result = run_attnlab(tiny_train_args(corpus, out, "--layers", "hybrid:nonapprox"), fault="nan-at-step:6")
    assert result.returncode == 3
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("attnlab: error: training diverged at step 6: loss is nan")
    assert "largest pre-softmax activation: layer" in message and "checkpoint-4" in message
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-4")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_divergence_guard_can_skip_a_batch(corpus, tmp_path):
    out = tmp_path / "skipped"
    result = run_attnlab(tiny_train_args(corpus, out, "--max-nonfinite-skips", "1"), fault="nan-at-step:3")
    assert result.returncode == 0, result.stderr
    assert "skipping this batch (1/1)" in result.stderr
    assert sorted(losses(out)) == list(range(1, 13))


@pytest.mark.parametrize(("parallel", "batch_size"), [("ddp", 1), ("fsdp", 2)])
def test_two_cpu_processes_match_one_process(corpus, uninterrupted, tmp_path, capfd, parallel, batch_size):
    """torchrun (gloo), 2 ranks == 1 process × 4 sequences a step: the same global batches, so the same loss
    and gradient norm at every step and the same final weights. DDP accumulates: 2 micro-batches of 1 sequence
    on each rank (global batch 4 = 1 × 2 ranks × 2), synced on the last; FSDP takes 2 sequences at once.
    Float32 sums in another order: after the 12 steps the weights were measured ≤ 6e-6 apart (DDP and FSDP).
    DDP runs cpu-tiny's Muon; FSDP shards the matrices Muon needs whole, so it refuses Muon in one line and
    runs AdamW (against a one-process AdamW run)."""
    out = tmp_path / parallel
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    args = tiny_train_args(corpus, out, "--batch-size", str(batch_size), "--parallel", parallel)
    env = {"TMPDIR": str(tmp_path)}  # torchrun's logs: in tmp_path
    if parallel == "fsdp":
        refused = run_attnlab(args, launcher=launcher, env=env)
        assert refused.returncode != 0 and "--optimizer muon needs every matrix whole" in refused.stderr
        shutil.rmtree(out, ignore_errors=True)
        args += ["--optimizer", "adamw"]
        uninterrupted = tmp_path / "one-process-adamw"
        status, stderr = run_here(tiny_train_args(corpus, uninterrupted, "--optimizer", "adamw"), capfd)
        assert status == 0, stderr
    result = run_attnlab(args, launcher=launcher, env=env)
    assert result.returncode == 0, result.stderr
    distributed, single = losses(out), losses(uninterrupted)
    assert sorted(distributed) == list(range(1, 13))
    for step in distributed:
        assert abs(distributed[step] - single[step]) < 1e-4, (step, distributed[step], single[step])
    grad_norms, single_grad_norms = logged(out, "grad_norm"), logged(uninterrupted, "grad_norm")
    assert grad_norms == pytest.approx(single_grad_norms, rel=1e-5)  # the gradient's scale, step by step
    final = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())  # rank 0 wrote a plain model
    for name, expected in AutoModelForCausalLM.from_pretrained(uninterrupted).named_parameters():
        assert (final[name] - expected).abs().max().item() <= 5e-5, name
    assert result.stderr.count("the trained model, its metrics and checkpoints are in") == 1  # rank 0 says it


def test_fixedseqqk_takes_its_sequence_from_the_training_corpus(corpus, tmp_path):
    from attnlab.data import first_tokens, open_corpus

    out = tmp_path / "fixedseq"
    assert main(tiny_train_args(corpus, out, "--layers", "hybrid:fixedseqqk", "--max-steps", "2")) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    expected = first_tokens(open_corpus(str(corpus)), tokenizer, model.config.shadow_seq_len)
    assert model.model.shadow_token_ids.tolist() == expected
    assert model.config.fixed_sequence_source.startswith("corpus:")


# ----------------------------------------------------------------------------------------- configuration


def test_run_config_precedence_and_unknown_keys(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model:\n  num_hidden_layers: 2\ntrain:\n  lr: 0.01\n  seq_len: 64\n")
    run = resolve_run_config("cpu-tiny", config_file, {"layers": "hybrid:mlp"}, {"seq_len": 32})
    assert run.model["num_hidden_layers"] == 2 and run.model["hidden_size"] == 128  # file over preset
    assert run.train.lr == 0.01 and run.train.seq_len == 32  # flags over file
    config_file.write_text("train:\n  learning_rate: 0.01\n")
    with pytest.raises(ValueError, match="unknown train option.*learning_rate"):
        resolve_run_config("cpu-tiny", config_file)
    config_file.write_text("model:\n  hidden: 64\n")
    with pytest.raises(ValueError, match="unknown AttnLabConfig option.*hidden"):
        resolve_run_config("cpu-tiny", config_file)
    config_file.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ValueError, match="unknown section"):
        resolve_run_config("cpu-tiny", config_file)


def test_resume_compatibility_allows_budget_changes_only():
    saved = resolve_run_config("cpu-tiny").to_dict()
    check_resume_compatible(saved, resolve_run_config("cpu-tiny", train_overrides={"max_steps": 5000}))
    with pytest.raises(ValueError, match=re.escape(f"train.lr: {saved['train']['lr']} in the checkpoint, 0.1 now")):
        check_resume_compatible(saved, resolve_run_config("cpu-tiny", train_overrides={"lr": 0.1}))
    hybrid = resolve_run_config("cpu-tiny", model_overrides={"layers": "hybrid:mlp"})
    with pytest.raises(ValueError, match="model.layers: 'hybrid:mlp' in the checkpoint, unset now"):
        check_resume_compatible(hybrid.to_dict(), resolve_run_config("cpu-tiny"))  # --layers left out


def test_paper_presets_carry_the_paper_hyperparameters():
    for preset in ("paper-70m", "paper-160m", "paper-500m"):
        train = resolve_run_config(preset).train
        assert (train.beta1, train.beta2, train.eps, train.lr) == (0.9, 0.9999, 1e-8, 4e-4)
        assert (train.warmup_steps, train.weight_decay, train.grad_clip, train.seq_len) == (2000, 0.1, 1.0, 2048)
        assert train.global_batch_size * train.seq_len == 524_288  # ~0.5M tokens per step
        assert train.tokenizer == "EleutherAI/pythia-160m" and train.data == "hf:cerebras/SlimPajama-627B"
    assert resolve_run_config("qwen3-1.7b").train.lr == 3e-4


# ------------------------------------------------------------------------------------------ bad input


BAD_INPUTS = [  # (extra arguments, with {tmp} for the test's folder; what the one line says)
    (["--layers", "uniform:attention"], "unknown mixer 'attention'"),
    (["--layers", "standard,mlp", "--num-hidden-layers", "3"], "names 2 mixers but the model has num_hidden_layers=3"),
    (["--data", "{tmp}/missing.jsonl"], "missing.jsonl"),
    (["--data", "{tmp}/empty.txt"], "empty.txt"),
    (["--data", "{tmp}/bad.jsonl"], "line 2"),
    (["--seq-len", "512"], "exceeds the model's max_position_embeddings=256"),
    (["--global-batch-size", "6"], "not a multiple of batch_size"),
    (["--num-attention-heads", "3"], "does not divide hidden_size"),
]


def bad_input_args(corpus: Path, tmp_path: Path, extra: list[str]) -> list[str]:
    """The training arguments of a BAD_INPUTS case, with its empty and malformed data files written."""
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "empty.txt").write_text("")
    return tiny_train_args(corpus, tmp_path / "out", *(argument.format(tmp=tmp_path) for argument in extra))


@pytest.mark.parametrize(("extra", "expected"), BAD_INPUTS, ids=[expected for _, expected in BAD_INPUTS])
def test_bad_input_gives_one_line_and_exit_status_2(corpus, tmp_path, capfd, extra, expected):
    status, stderr = run_here(bad_input_args(corpus, tmp_path, extra), capfd)
    lines = stderr.strip().splitlines()
    assert status == 2 and len(lines) == 1 and expected in lines[0], (status, lines)


def test_bad_input_ends_a_fresh_process_with_one_line_and_no_traceback(corpus, tmp_path):
    """The same path as a user's shell meets it: a malformed data file, found while loading the data."""
    extra, expected = BAD_INPUTS[4]
    result = run_attnlab(bad_input_args(corpus, tmp_path, extra))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr


def test_unknown_preset_and_resume_mismatch_are_one_line_errors(corpus, uninterrupted, tmp_path, capfd):
    cases = [
        (["train", "--preset", "paper-7b"], "invalid choice: 'paper-7b' (choose from 'cpu-tiny'"),
        (tiny_train_args(corpus, uninterrupted, "--resume", "--lr", "0.5"), "cannot resume"),
        (tiny_train_args(corpus, uninterrupted), "already holds a run"),  # a finished run is not overwritten
        (tiny_train_args(corpus, tmp_path / "nothing", "--resume"), "holds no run"),
    ]
    for args, message in cases:
        status, stderr = run_here(args, capfd)
        assert status == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, (args, stderr)


@pytest.mark.parametrize(
    ("config", "flags", "message"),
    [
        ("model: 5\n", [], "'model:' must be a mapping of options, got 5"),
        ("train: [1, 2]\n", [], "'train:' must be a mapping of options, got [1, 2]"),
        ("train:\n  lr: abc\n", [], "train option lr must be float, got 'abc'"),
        ("train:\n  tokens: 2.5\n", [], "train option tokens must be int or unset, got 2.5"),
        (None, ["--eval-every", "-1"], "train option eval_every must not be negative, got -1"),
        (None, ["--layers", "bogus"], "unknown mixer 'bogus' in layer pattern 'bogus'; registered mixers: standard"),
    ],
)
def test_bad_settings_are_one_line_before_anything_is_written(corpus, tmp_path, capsys, config, flags, message):
    out = tmp_path / "out"
    extra = [*flags]
    if config is not None:
        (tmp_path / "config.yaml").write_text(config)
        extra += ["--config", str(tmp_path / "config.yaml")]
    assert main(tiny_train_args(corpus, out, *extra)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("attnlab: error: ") and message in error[0], error
    assert not out.exists()


def test_atomic_text_writes_leave_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    target = tmp_path / "run_config.yaml"
    write_text_atomic(target, "old\n")
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        write_text_atomic(target, "new\n")
    monkeypatch.undo()
    assert [path.name for path in tmp_path.iterdir()] == ["run_config.yaml"] and target.read_text() == "old\n"
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_ctrl_c_stops_training_with_one_line(corpus, tmp_path):
    """Ctrl-C mid-run (held before step 2 until a file appears that never does) ends it with one line."""
    out, never = tmp_path / "interrupted", tmp_path / "never-released"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(FAULTY_ATTNLAB), f"wait-at-step:2:{never}", *tiny_train_args(corpus, out)]
    with ctrl_c_reaches_children():
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: logged_steps(out) == 1, "the run logged step 1 and waited before step 2", process)
        process.send_signal(signal.SIGINT)
        try:
            stderr = process.communicate(timeout=600)[1]
        except subprocess.TimeoutExpired:
            pytest.fail("the run was still running 600 s after Ctrl-C")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        "attnlab: interrupted; the same command with --resume continues from what was saved"
    )


def test_a_run_that_saved_nothing_starts_again(corpus, uninterrupted, tmp_path, capfd):
    """Bad input found after the folder was claimed, or a kill before the first checkpoint, leaves a run
    that saved nothing: neither a plain rerun nor --resume refuses its folder, and the run that follows is
    the uninterrupted run, with none of the aborted attempts' metrics."""
    out = tmp_path / "retry"
    missing = tiny_train_args(corpus, out, "--data", str(tmp_path / "missing.jsonl"))  # found once data is opened
    assert run_here(missing, capfd)[0] == 2
    assert (out / "run_config.yaml").exists()
    killed = run_attnlab(tiny_train_args(corpus, out), fault="kill-at-step:3")  # --save-every 4
    assert killed.returncode == -signal.SIGKILL and "starting it from the beginning" in killed.stderr
    assert (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))
    status, stderr = run_here(tiny_train_args(corpus, out, "--resume"), capfd)
    assert status == 0, stderr
    assert losses(out) == losses(uninterrupted)


SCRIPTED_HELD_OUT = {  # step → held-out loss
    "rising": {2: 3.0, 4: 2.5, 6: 2.51, 8: 2.6, 10: 2.7, 12: 2.8},  # best at 4; 6 is within the margin; 8 is not
    "falling": {2: 3.0, 4: 2.5, 6: 2.4, 8: 2.3, 10: 2.2, 12: 2.1},
}


@pytest.mark.parametrize("save_best", [False, True], ids=["last", "save-best"])
@pytest.mark.parametrize("course", SCRIPTED_HELD_OUT)
def test_overfitting_is_noted_once_and_the_best_checkpoint_survives(
    corpus, tmp_path, monkeypatch, capsys, course, save_best
):
    """Real training; only the held-out loss is scripted. A rising loss gives one line (at step 8, the first
    evaluation more than OVERFIT_MARGIN above the best), metrics.jsonl marks the best steps, the best checkpoint
    (4) is kept beside the newest with --keep-checkpoints 1, and --save-best makes it the final model. A falling
    loss gives no line and keeps only the newest checkpoint."""
    from attnlab import train as training

    scripted = iter(SCRIPTED_HELD_OUT[course].values())  # evaluations come at steps 2, 4, …, 12 in turn
    monkeypatch.setattr(training, "evaluate_heldout", lambda *args: {"eval_loss": next(scripted)})
    out = tmp_path / "run"
    extra = ["--eval-every", "2", "--keep-checkpoints", "1"] + (["--save-best"] if save_best else [])
    assert main(tiny_train_args(corpus, out, *extra)) == 0
    stderr = capsys.readouterr().err
    notes = [line for line in stderr.splitlines() if "is overfitting" in line]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best_steps = [record["step"] for record in records if record.get("eval_best")]
    checkpoints = sorted(int(path.name.split("-")[1]) for path in out.glob("checkpoint-*"))
    if course == "rising":
        assert notes == [
            "attnlab: held-out loss 2.6000 at step 8 is above its best, 2.5000 at step 4: the model is overfitting; "
            "checkpoint-4 is kept, and --save-best makes it the final model"
        ]
        assert best_steps == [2, 4] and checkpoints == [4, 12]
    else:
        assert notes == [] and best_steps == [2, 4, 6, 8, 10, 12] and checkpoints == [12]
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected_step = 4 if (course == "rising" and save_best) else 12
    expected = AutoModelForCausalLM.from_pretrained(out / f"checkpoint-{expected_step}").state_dict()
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    if expected_step == 4:  # and not the last step's weights
        last = AutoModelForCausalLM.from_pretrained(out / "checkpoint-12").state_dict()
        assert not all(torch.equal(final[name], last[name]) for name in last)
