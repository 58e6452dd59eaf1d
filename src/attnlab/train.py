"""`attnlab train`: pretraining as the paper does it (docs/method.md §4), from one command, resumable, on 1..N devices.

Reads top to bottom: set up devices → data and tokenizer → model → optimizer and schedule → (resume) →
the loop (accumulate, clip, guard against divergence, step, log, evaluate, checkpoint) → final model.

`--data` names a text corpus, or a synthetic task (`mqar:…`, `induction:…`; see `attnlab.synthetic`).
For a task there is no tokenizer: the model's vocabulary is the task's, batches come with their own
labels (-100 where nothing is scored), and the held-out evaluation also logs `eval_accuracy`.

Under `torchrun` every rank runs this same function: DDP (or FSDP2 with `parallel: fsdp`), gloo on CPU,
NCCL on CUDA; the data stream is sharded by rank; rank 0 logs and writes files.

Faults (a kill before a step or during a save, a non-finite loss) are injected by the test suite through
`fault_hooks`, which only its own launcher replaces; no environment variable reaches them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from . import data as attnlab_data
from . import synthetic
from .checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_trainer_state,
    remove_stale_temporaries,
    report_to_stderr,
    save_checkpoint,
)
from .config import AttnLabConfig
from .model import AttnLabForCausalLM
from .optim import build_optimizer
from .runconfig import LOCK_FILE, RunConfig, check_resume_compatible, lock_folder, write_text_atomic

EXIT_DIVERGED = 3


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message is the one line shown to the user."""


@dataclass
class Devices:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def main_decides(self, decide):
        """Run `decide()` on rank 0 only and give its result — or its ValueError — to every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = decide()
            except ValueError as raised:
                error = str(raised)
        if self.world_size > 1:
            shared = [result, error]
            dist.broadcast_object_list(shared, src=0)
            result, error = shared
        if error is not None:
            raise ValueError(error)
        return result


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`--device`: auto (CUDA when there is one), cpu, cuda (the local rank's GPU) or cuda:N."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested} was asked for but no CUDA device is available; use --device cpu")
        try:
            return torch.device("cuda", local_rank if requested == "cuda" else torch.device(requested).index)
        except RuntimeError:
            pass
    elif requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown --device {requested!r}; use auto, cpu, cuda or cuda:N")


def setup_devices(requested: str) -> Devices:
    """One process per device; under torchrun (WORLD_SIZE > 1) join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Devices(rank=rank, world_size=world_size, device=device)


def train(run: RunConfig, out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Train the model described by `run` into `out`; returns `out`. `out` is locked for the whole run; a
    folder with files that are not an attnlab run's is refused unless `overwrite`. Raises ValueError for bad
    input and TrainingDiverged when the guard stops the run."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar inside the training log
    out = Path(out)
    devices = setup_devices(run.train.device)
    try:
        return _train(run, out, resume, overwrite, devices)
    finally:
        if devices.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(run: RunConfig, out: Path, resume: bool, overwrite: bool, devices: Devices) -> Path:
    folder_lock: list = []  # rank 0's lock on `out`, held until this function returns
    try:
        checkpoint = devices.main_decides(lambda: _claim_output_folder(run, out, resume, overwrite, folder_lock))
        return _train_in(run, out, checkpoint, devices)
    finally:
        for lock in folder_lock:
            lock.close()


def _train_in(run: RunConfig, out: Path, checkpoint: Path | None, devices: Devices) -> Path:
    settings = run.train
    accumulation = _accumulation_steps(settings, devices.world_size)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)

    # Data: a synthetic task (examples made on the fly, no tokenizer), or a corpus and its tokenizer. The
    # tokenizer is built once (rank 0) and read back by every rank from OUT.
    task = synthetic.parse_task_spec(settings.data, settings.seq_len) if synthetic.is_task_spec(settings.data) else None
    if task is not None:
        stream = synthetic.SyntheticTrainStream(task, settings.seed, rank=devices.rank, world_size=devices.world_size)
        heldout = synthetic.heldout_examples(task, settings.seed, settings.eval_sequences)  # (inputs, labels)
        vocabulary, sources = {"vocab_size": task.vocab_size}, None
    else:
        # A resumed run reads the Hub commits it started with, whatever the names resolve to now.
        sources = _read_run_config(out / "run_config.yaml").get("sources") if checkpoint is not None else None
        sources = sources if isinstance(sources, dict) else {}
        corpus = attnlab_data.open_corpus(settings.data, revision=_recorded_revision(sources, "data"))
        if checkpoint is None:
            sources["tokenizer"] = devices.main_decides(lambda: _save_tokenizer(settings.tokenizer, corpus, out))
        sources["data"] = {"spec": settings.data, "revision": corpus.revision}
        tokenizer = _load_tokenizer(out)
        stream = attnlab_data.make_train_stream(
            corpus,
            tokenizer,
            settings.seq_len,
            settings.seed,
            rank=devices.rank,
            world_size=devices.world_size,
            shifted_windows=settings.shifted_windows,
        )
        heldout = attnlab_data.heldout_sequences(corpus, tokenizer, settings.seq_len, settings.eval_sequences)
        vocabulary = _tokenizer_vocabulary(tokenizer)

    # Model: from the checkpoint when resuming (exact weights and buffers), else from the config.
    if checkpoint is not None:
        model = AttnLabForCausalLM.from_pretrained(checkpoint, use_safetensors=True)
    else:
        model = AttnLabForCausalLM(_model_config(run, vocabulary))
        if model.model.shadow_token_ids is not None:  # fixedseqqk: t_s = the first L_max tokens of the training data
            length = model.config.shadow_seq_len
            if task is not None:
                ids, source = synthetic.first_tokens(task, settings.seed, length), f"synthetic:{task.spec}"
            else:
                ids, source = attnlab_data.first_tokens(corpus, tokenizer, length), f"corpus:{corpus.description}"
            model.model.set_fixed_sequence(ids, source=source)
    model.to(devices.device)
    if settings.activation_checkpointing:
        model.activation_checkpointing_enable()
    raw_model = model
    sharded = devices.world_size > 1 and _resolve_parallel(settings.parallel, raw_model) == "fsdp"
    if sharded and settings.optimizer == "muon":
        raise ValueError(
            "--optimizer muon needs every matrix whole and FSDP shards them; use --parallel ddp or --optimizer adamw"
        )
    model = _parallelize(model, sharded, devices)
    if settings.compile:
        model = torch.compile(model)

    optimizer = build_optimizer(raw_model, settings)
    total_steps = settings.num_steps()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings.warmup_steps, total_steps))
    step, tokens_seen, skipped = 0, 0, 0
    best = BestEvaluation()
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        _load_optimizer_state(raw_model, optimizer, state["optimizer"], sharded)
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"][devices.rank])
        _set_rng_states(state["rng"])
        step, tokens_seen, skipped = state["step"], state["tokens"], state["skipped"]
        best = BestEvaluation(**state.get("best", {}))  # checkpoints written before it have none
        if step > total_steps:
            raise ValueError(
                f"--resume: {checkpoint.name} is past the {total_steps} steps this run is now asked for; "
                "give a larger --max-steps (or --tokens) to train on, nothing was changed"
            )
        if devices.is_main:
            _truncate_metrics(out / "metrics.jsonl", step)
    if devices.is_main:
        run.write(out / "run_config.yaml", sources)

    logger = _Logger(out, run, devices, total_steps, step)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if devices.device.type == "cuda" else nullcontext()
    )  # fp32 on CPU, bf16 autocast on CUDA
    tokens_per_step = settings.global_batch_size * settings.seq_len
    fault = fault_hooks

    while step < total_steps:
        fault.maybe_kill_before_step(step + 1)
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=devices.device)
        for micro_step in range(accumulation):
            batch, labels = _next_batch(stream, settings.batch_size, devices.device)  # [batch, seq_len] each
            last = micro_step == accumulation - 1
            sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync, autocast:
                loss = model(input_ids=batch, labels=labels, return_logits=False).loss / accumulation
                if fault.poisons(step + 1):
                    loss = loss * float("nan")
                loss.backward()
            loss_sum += loss.detach()
        if devices.world_size > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), settings.grad_clip)
        lr = scheduler.get_last_lr()[0]
        if not (torch.isfinite(loss_sum) and torch.isfinite(grad_norm)):
            problem = _describe_divergence(raw_model, batch, step + 1, loss_sum, grad_norm, out)
            if skipped >= settings.max_nonfinite_skips:
                raise TrainingDiverged(problem)
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            logger.warn(f"{problem}; skipping this batch ({skipped}/{settings.max_nonfinite_skips})")
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        record = {
            "step": step,
            "loss": loss_sum.item(),
            "lr": lr,
            "tokens": tokens_seen,
            "tokens_per_s": tokens_per_step / (time.perf_counter() - started),
            "grad_norm": grad_norm.item(),
            "epoch": stream.epoch,
        }
        new_best, overfitting = False, None
        if step == total_steps or (settings.eval_every and step % settings.eval_every == 0):
            record.update(evaluate_heldout(raw_model, heldout, settings.batch_size, devices.device))
            new_best, overfitting = best.update(step, record["eval_loss"])
            if new_best:
                record["eval_best"] = True  # metrics.jsonl: the last record with it is the best step
        logger.log(record)
        if overfitting:
            logger.note(overfitting)
        if step % settings.save_every == 0 or step == total_steps or new_best:  # every best is a checkpoint
            _save(
                out,
                step,
                raw_model,
                optimizer,
                scheduler,
                stream,
                tokens_seen,
                skipped,
                best,
                settings,
                devices,
                fault,
                sharded,
            )

    final_model = _gathered_model(raw_model, sharded, devices)
    if devices.is_main:
        best_checkpoint = out / f"checkpoint-{best.step}"
        if settings.save_best and best.step not in (None, step) and best_checkpoint.is_dir():
            final_model = AttnLabForCausalLM.from_pretrained(best_checkpoint, use_safetensors=True)
            logger.note(f"--save-best: the final model is step {best.step}'s (held-out loss {best.eval_loss:.4f})")
        _save_final(final_model, out)
    logger.close()
    devices.barrier()
    return out


OVERFIT_MARGIN = 0.02  # nats above the best held-out loss that count as overfitting (more than evaluation noise)


@dataclass
class BestEvaluation:
    """The lowest held-out loss so far and its step (kept in every checkpoint, so a resumed run goes on with it)."""

    step: int | None = None
    eval_loss: float = math.inf
    overfitting_noted: bool = False

    def update(self, step: int, eval_loss: float) -> tuple[bool, str | None]:
        """Record one evaluation: (is it a new best, the overfitting line the first time the loss rises more
        than `OVERFIT_MARGIN` above the best, else None)."""
        if eval_loss < self.eval_loss:
            self.step, self.eval_loss = step, eval_loss
            return True, None
        if self.overfitting_noted or eval_loss <= self.eval_loss + OVERFIT_MARGIN:
            return False, None
        self.overfitting_noted = True
        return False, (
            f"held-out loss {eval_loss:.4f} at step {step} is above its best, {self.eval_loss:.4f} at step "
            f"{self.step}: the model is overfitting; checkpoint-{self.step} is kept, and --save-best makes it the "
            "final model"
        )


def _next_batch(stream, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) on `device`: a synthetic stream gives both, a text stream's labels are its inputs."""
    batch = stream.next_batch(batch_size)
    input_ids, labels = batch if isinstance(batch, tuple) else (batch, batch)
    return input_ids.to(device), labels.to(device)


def evaluate_heldout(model, heldout, batch_size: int, device: torch.device) -> dict[str, float]:
    """`eval_loss` on held-out text sequences [n, seq_len]; for a synthetic task's (inputs, labels) the loss
    at the scored positions and `eval_accuracy` there (see `synthetic.evaluate_examples`)."""
    if isinstance(heldout, tuple):
        scores = synthetic.evaluate_examples(model, *heldout, batch_size, device)
        return {"eval_loss": scores["loss"], "eval_accuracy": scores["accuracy"]}
    return {"eval_loss": evaluate_loss(model, heldout, batch_size, device)}


def evaluate_loss(model, sequences: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss over held-out sequences [n, seq_len] (every rank computes the same value)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch, return_logits=False).loss
            total += loss.item() * len(batch)
            count += len(batch)
    model.train(was_training)
    return total / count


# --------------------------------------------------------------------------------------------------- setup


# What `attnlab train` writes in OUT. `--overwrite` removes these, and nothing else, before a new run.
RUN_OUTPUTS = (
    "run_config.yaml",
    "metrics.jsonl",
    "tensorboard",
    "checkpoint-*",
    ".checkpoint-*.tmp",
    ".final.tmp",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
ATTNLAB_FILES_IN_OUT = (LOCK_FILE, "study")  # the folder's lock, and `attnlab study`'s records of this run


def _claim_output_folder(run: RunConfig, out: Path, resume: bool, overwrite: bool, held: list) -> Path | None:
    """Lock `out` for this run (the lock goes into `held`, to be kept for the whole run) and prepare it;
    return the checkpoint to resume from (or None). Runs on rank 0 only (see `Devices.main_decides`).

    A folder with files of its own is refused unless it holds an attnlab run, or `overwrite` says to replace
    attnlab's files there (`RUN_OUTPUTS`; the others stay). Nothing is written before these checks pass."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    others = (
        sorted(path.name for path in out.iterdir() if path.name not in ATTNLAB_FILES_IN_OUT) if out.is_dir() else []
    )
    if others and not (out / "run_config.yaml").is_file() and not overwrite:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(
            f"{out} is not empty ({shown}) and holds no attnlab run; choose a new or empty --out, or pass "
            "--overwrite to train there (attnlab's own files are replaced, the others kept)"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    held.append(lock_folder(out))
    if overwrite:
        for pattern in RUN_OUTPUTS:
            for path in out.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return _prepare_output_folder(run, out, resume)


def _prepare_output_folder(run: RunConfig, out: Path, resume: bool) -> Path | None:
    """Check that the locked folder `out` can take this run and claim it; return the checkpoint to resume
    from (or None).

    A folder whose run stopped before saving anything (bad input found after the folder was claimed, a
    kill before the first checkpoint) holds nothing to keep or resume: the run starts there afresh, with
    or without --resume."""
    saved_config = out / "run_config.yaml"
    checkpoint = latest_checkpoint(out)
    saved_model = (out / "model.safetensors").exists()
    if resume:
        if not saved_config.is_file():
            raise ValueError(f"--resume: {out} holds no run (no run_config.yaml); start it without --resume")
        check_resume_compatible(_read_run_config(saved_config), run)
        checkpoint = latest_intact_checkpoint(out, report_to_stderr)
        if checkpoint is None and complete_checkpoints(out):
            raise ValueError(f"--resume: every checkpoint in {out} is damaged; start the run again with --overwrite")
        if checkpoint is not None:
            remove_stale_temporaries(out)
            return checkpoint
        if saved_model:
            raise ValueError(f"--resume: {out} holds a finished run without checkpoints; nothing to resume")
    elif checkpoint is not None or saved_model:
        raise ValueError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    if saved_config.exists():
        print(f"attnlab: {out} holds a run that saved nothing; starting it from the beginning", file=sys.stderr)
        remove_stale_temporaries(out)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    run.write(saved_config)
    return None


def _read_run_config(path: Path) -> dict[str, Any]:
    """The saved run_config.yaml of a run, or one line saying why it cannot be used."""
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(
            f"{path} is not valid YAML ({str(error).splitlines()[0]}); the run cannot be resumed"
        ) from None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(key), dict) for key in ("model", "train")):
        raise ValueError(f"{path} has no 'model:' and 'train:' mappings; the run cannot be resumed")
    return saved


def _accumulation_steps(settings, world_size: int) -> int:
    per_step = settings.batch_size * world_size
    if settings.global_batch_size % per_step != 0:
        raise ValueError(
            f"global_batch_size={settings.global_batch_size} is not a multiple of batch_size × devices = "
            f"{settings.batch_size} × {world_size}; adjust --batch-size or --global-batch-size"
        )
    return settings.global_batch_size // per_step


def _save_tokenizer(spec: str, corpus, out: Path) -> dict[str, str | None]:
    """Build the `--tokenizer` into OUT (a Hub one pinned to the commit its name resolves to now); returns
    its record for run_config.yaml's `sources`."""
    revision = attnlab_data.tokenizer_revision(spec)
    attnlab_data.build_tokenizer(spec, corpus, revision).save_pretrained(out)
    return {"spec": spec, "revision": revision}


def _recorded_revision(sources: dict, name: str) -> str | None:
    record = sources.get(name)
    revision = record.get("revision") if isinstance(record, dict) else None
    return revision if isinstance(revision, str) else None


def _load_tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


def _tokenizer_vocabulary(tokenizer) -> dict[str, int | None]:
    """The vocabulary sized to the tokenizer (rounded up to a multiple of 64: Pythia's 50277 tokens → 50304,
    as in the paper) and its special token ids."""
    return {
        "vocab_size": 64 * math.ceil(len(tokenizer) / 64),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _model_config(run: RunConfig, vocabulary: dict[str, int | None]) -> AttnLabConfig:
    """The preset's model options with the vocabulary of the data (`_tokenizer_vocabulary`, or a synthetic
    task's exact vocabulary size)."""
    return AttnLabConfig(**{**run.model, **vocabulary})  # seq_len fits: checked by resolve_run_config


def _resolve_parallel(parallel: str, model) -> str:
    """`auto` shards (FSDP2) models of a billion parameters or more and replicates (DDP) smaller ones."""
    if parallel != "auto":
        return parallel
    return "fsdp" if sum(p.numel() for p in model.parameters()) >= 1_000_000_000 else "ddp"


def _parallelize(model, sharded: bool, devices: Devices):
    if devices.world_size == 1:
        return model
    if sharded:  # FSDP2: each decoder layer is one shard group, then the root
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [devices.device.index] if devices.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _schedule(warmup_steps: int, total_steps: int):
    """Linear warm-up to the peak, then half a cosine cycle to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---------------------------------------------------------------------------------------------- guard


def _describe_divergence(model, batch, step: int, loss, grad_norm, out: Path) -> str:
    """One line naming the step, what was non-finite, and the layer with the largest pre-softmax activation."""
    what = f"loss is {loss.item():g}" if not torch.isfinite(loss) else f"gradient norm is {grad_norm.item():g}"
    worst_layer, worst_value = None, -1.0
    with torch.no_grad():
        output = model(input_ids=batch, output_mixer_scores=True)
    for index, scores in enumerate(output.mixer_scores):
        if scores is None:
            continue
        magnitude = scores.detach().float().abs()
        value = math.inf if torch.isinf(magnitude).any() else torch.nan_to_num(magnitude, nan=0.0).max().item()
        if value > worst_value:
            worst_layer, worst_value = index, value
    where = (
        f"; largest pre-softmax activation: layer {worst_layer + 1} ({model.config.mixer_types[worst_layer]}), "
        f"|s| = {worst_value:.3g}"
        if worst_layer is not None
        else ""
    )
    last = latest_checkpoint(out)
    kept = f"; last finite checkpoint: {last}" if last is not None else "; no checkpoint was written"
    return f"training diverged at step {step}: {what}{where}{kept}"


class FaultHooks:
    """Where the test suite injects faults (its own subclass, installed as `fault_hooks` by a test-only
    launcher, tests/faulty_attnlab.py); here every hook does nothing, whatever the environment says."""

    def maybe_kill_before_step(self, step: int) -> None:
        """Called before optimizer step `step`."""

    def kill_during_save(self, step: int) -> Callable[[], None] | None:
        """What to run once checkpoint `step`'s weights are written, before its trainer state."""
        return None

    def poisons(self, step: int) -> bool:
        """Whether the loss of step `step` is to be made non-finite."""
        return False


fault_hooks = FaultHooks()


# ----------------------------------------------------------------------------------------- checkpoints


def _save(
    out, step, model, optimizer, scheduler, stream, tokens_seen, skipped, best, settings, devices, fault, sharded
):
    data_states = [stream.state_dict()]
    if devices.world_size > 1:  # each rank's stream position; equal for finite corpora, distinct when streaming
        data_states = [None] * devices.world_size
        dist.all_gather_object(data_states, stream.state_dict())
    full_model = _gathered_model(model, sharded, devices)
    optimizer_state = _optimizer_state(model, optimizer, sharded)
    if devices.is_main:
        if not all(torch.isfinite(parameter).all() for parameter in full_model.parameters()):
            raise TrainingDiverged(f"training diverged at step {step}: non-finite weights; checkpoint not written")
        state = {
            "step": step,
            "tokens": tokens_seen,
            "skipped": skipped,
            "best": dataclasses.asdict(best),
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "data": data_states,
            "rng": _rng_states(),
        }
        after_weights = fault.kill_during_save(step)
        save_checkpoint(
            out, step, full_model, state, settings.keep_checkpoints, after_weights=after_weights, protect=best.step
        )
    devices.barrier()


def _gathered_model(model, sharded: bool, devices: Devices):
    """A plain (unsharded) model to save: the model itself, or under FSDP a CPU copy assembled on rank 0."""
    if not sharded:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not devices.is_main:
        return None
    plain = AttnLabForCausalLM(model.config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # only a tied head
    return plain


def _optimizer_state(model, optimizer, sharded: bool) -> dict[str, Any]:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(model, optimizer, state: dict[str, Any], sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def _save_final(model, out: Path) -> None:
    """The final model beside the tokenizer and run config in OUT; each file is renamed into place."""
    staging = out / ".final.tmp"
    model.save_pretrained(staging)
    for path in staging.iterdir():
        os.replace(path, out / path.name)
    staging.rmdir()


def _rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be recomputed). A torn last
    line (what a kill or a full disk leaves) is dropped with a note; a damaged line elsewhere is an error."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            records.append((record["step"], line))
        except (ValueError, KeyError, TypeError):
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a metrics record; repair or remove that line") from None
            report_to_stderr(f"{path}: dropped its torn last line (a write that was cut off)")
    write_text_atomic(path, "".join(line + "\n" for record_step, line in records if record_step <= step))


# --------------------------------------------------------------------------------------------- logging


class _Logger:
    """metrics.jsonl (one object per optimizer step), TensorBoard, optional W&B, and the progress display."""

    def __init__(self, out: Path, run: RunConfig, devices: Devices, total_steps: int, start_step: int) -> None:
        self.enabled = devices.is_main
        self.total_steps = total_steps
        self.metrics = None
        self.tensorboard = self.wandb = self.progress = None
        if not self.enabled:
            return
        self.metrics = open(out / "metrics.jsonl", "a")
        if run.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("attnlab: TensorBoard is not installed; logging to metrics.jsonl only", file=sys.stderr)
        if run.train.wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project="attnlab", config=run.to_dict(), dir=str(out))
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.progress = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.print_every = max(1, total_steps // 20)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if key != "step" and self.tensorboard is not None:
                tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
                self.tensorboard.add_scalar(tag, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        summary = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
        if "eval_loss" in record:
            summary += f"  held-out {record['eval_loss']:.4f}"
        if "eval_accuracy" in record:
            summary += f"  accuracy {record['eval_accuracy']:.1%}"
        if self.progress is not None:
            self.progress.set_postfix_str(summary, refresh=False)
            self.progress.update(1)
            if "eval_loss" in record:
                self.progress.write(f"step {record['step']}: {summary}")
        elif record["step"] % self.print_every == 0 or "eval_loss" in record or record["step"] == self.total_steps:
            print(f"step {record['step']}/{self.total_steps}: {summary}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        self.note(f"warning: {message}")

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(f"attnlab: {message}", file=sys.stderr)
        else:
            print(f"attnlab: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.progress is not None:
            self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()
