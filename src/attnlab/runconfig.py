"""Run configuration for `attnlab train`: a preset's YAML, an optional user YAML, then command-line flags.

A run is described by two sections — `model` (AttnLabConfig fields) and `train` (`TrainConfig` fields);
unknown keys in either are rejected with the list of valid ones. The resolved configuration is written to
`OUT/run_config.yaml`, and a resumed run must resolve to the same one (up to `RESUMABLE_CHANGES`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from . import presets, synthetic
from .config import AttnLabConfig
from .environment import versions
from .optim import OPTIMIZERS


@dataclass
class TrainConfig:
    """Training settings; the defaults are the paper's (docs/method.md §4), the presets adjust sizes and budgets."""

    data: str = "builtin"  # builtin | hf:<name>[:<config>] | local .txt/.jsonl/.jsonl.zst/.parquet files or globs
    # ... or a synthetic task, mqar[:vocab=,pairs=,queries=,filler=] | induction[:vocab=,prefix=] (no tokenizer)
    tokenizer: str = "bpe:4096"  # an AutoTokenizer name or path, or bpe:<vocab> trained on the training text
    seq_len: int = 2048  # tokens per sequence
    batch_size: int = 8  # sequences per micro-batch on each device
    global_batch_size: int = 256  # sequences per optimizer step over all devices (gradient accumulation fills it)
    tokens: int | None = 15_000_000_000  # token budget; steps = ceil(tokens / (global_batch_size · seq_len))
    max_steps: int | None = None  # if set, overrides the token budget
    shifted_windows: bool = False  # finite corpora: each epoch cuts the token stream at a new random offset
    lr: float = 4e-4  # peak learning rate, reached after warm-up, then cosine (half a cycle) to zero
    warmup_steps: int = 2000
    optimizer: str = "adamw"  # adamw | muon (Muon for the decoder's hidden matrices, AdamW for the rest: attnlab.optim)
    weight_decay: float = 0.1  # on matrices and embeddings; not on biases and norm gains
    beta1: float = 0.9
    beta2: float = 0.9999
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 0
    save_every: int = 1000  # optimizer steps between checkpoints
    keep_checkpoints: int = 2  # newest complete checkpoints kept (and always the one of the best held-out loss)
    save_best: bool = False  # the final model is the checkpoint of the best held-out loss, not the last step's
    eval_every: int = 500  # optimizer steps between held-out evaluations (0: only at the end)
    eval_sequences: int = 64  # held-out sequences per evaluation
    max_nonfinite_skips: int = 0  # batches with a non-finite loss/gradient to skip before stopping (0: stop at once)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each layer in backward: less memory, ~1/3 more compute
    parallel: str = "auto"  # auto | ddp | fsdp (only under torchrun)
    tensorboard: bool = True  # also log to OUT/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs `wandb` installed)

    def num_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.tokens / (self.global_batch_size * self.seq_len))


# Settings a resumed run may change: budget, cadence and execution, not the experiment itself.
RESUMABLE_CHANGES = {
    "tokens",
    "max_steps",
    "save_every",
    "keep_checkpoints",
    "save_best",
    "eval_every",
    "device",
    "compile",
    "activation_checkpointing",
    "tensorboard",
    "wandb",
    "max_nonfinite_skips",
    "parallel",
    "batch_size",
}
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@dataclass
class RunConfig:
    model: dict[str, Any]
    train: TrainConfig
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "model": dict(self.model), "train": dataclasses.asdict(self.train)}

    def write(self, path: Path, sources: dict | None = None) -> None:
        """The resolved configuration, the software versions of the process that writes it, and the
        `sources` read ({"data"|"tokenizer": {"spec", "revision": Hub commit or null}}). `--resume` compares
        only the `model` and `train` sections, and reads the data at the recorded commit."""
        record = {**self.to_dict(), "versions": versions(), **({"sources": sources} if sources else {})}
        write_text_atomic(path, yaml.safe_dump(record, sort_keys=False))


def resolve_run_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Merge preset ← config file ← overrides (later wins); validate every key and value."""
    sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    sources = []
    if preset is not None:
        sources.append((f"preset {preset}", presets.load_preset(preset)))
    if config_file is not None:
        sources.append((str(config_file), _read_yaml(Path(config_file))))
    sources.append(("command line", {"model": model_overrides or {}, "train": train_overrides or {}}))
    for origin, document in sources:
        unknown_sections = set(document) - {"model", "train"}
        if unknown_sections:
            raise ValueError(f"{origin}: unknown section(s) {sorted(unknown_sections)}; use 'model:' and 'train:'")
        for section in ("model", "train"):
            values = document.get(section) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{origin}: '{section}:' must be a mapping of options, got {values!r}")
            sections[section].update(values)
    train = _build_train_config(sections["train"])
    model = sections["model"]
    config = AttnLabConfig(**model)  # rejects unknown or invalid model options now, with AttnLabConfig's message
    if train.seq_len > config.max_position_embeddings:  # before any data is read or made
        raise ValueError(
            f"--seq-len {train.seq_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}; lower --seq-len or raise max_position_embeddings"
        )
    return RunConfig(model=model, train=train, preset=preset)


def _build_train_config(values: dict[str, Any]) -> TrainConfig:
    unknown = sorted(set(values) - set(TRAIN_FIELDS))
    if unknown:
        raise ValueError(f"unknown train option(s): {', '.join(unknown)}; valid options: {', '.join(TRAIN_FIELDS)}")
    for name, value in values.items():
        _check_type(name, value, TRAIN_FIELDS[name].type)
    train = TrainConfig(**values)
    positive = ["seq_len", "batch_size", "global_batch_size", "save_every", "keep_checkpoints", "eval_sequences"]
    for name in positive:
        if not isinstance(getattr(train, name), int) or getattr(train, name) < 1:
            raise ValueError(f"train option {name} must be a positive integer, got {getattr(train, name)!r}")
    if train.max_steps is None and (train.tokens is None or train.tokens < 1):
        raise ValueError("give a positive token budget (--tokens) or a step count (--max-steps)")
    if train.max_steps is not None and train.max_steps < 1:
        raise ValueError(f"--max-steps must be positive, got {train.max_steps}")
    if train.lr <= 0 or train.grad_clip <= 0 or train.eps <= 0:
        raise ValueError("--lr, grad_clip and eps must be positive")
    for name in ("warmup_steps", "eval_every", "max_nonfinite_skips", "weight_decay"):
        if getattr(train, name) < 0:
            raise ValueError(f"train option {name} must not be negative, got {getattr(train, name)!r}")
    if not (0 <= train.beta1 < 1 and 0 <= train.beta2 < 1):
        raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {train.beta1} and {train.beta2}")
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {train.optimizer!r}")
    if train.parallel not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"parallel must be auto, ddp or fsdp, got {train.parallel!r}")
    if synthetic.is_task_spec(train.data):
        synthetic.parse_task_spec(train.data, train.seq_len)  # a bad task spec fails now, with its message
    return train


_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(name: str, value: Any, annotation: str) -> None:
    """A train option's value against its field's annotation (`int`, `float | None`, ...), in one line."""
    kinds = [kind.strip() for kind in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return
    allowed = tuple(python for kind in kinds for python in _KINDS.get(kind, ()))
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        wanted = " or ".join(kind if kind != "None" else "unset" for kind in kinds)
        raise ValueError(f"train option {name} must be {wanted}, got {value!r}")


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(value)


def check_resume_compatible(saved: dict[str, Any], current: RunConfig) -> None:
    """Raise if a resumed run would not continue the same experiment."""
    now = current.to_dict()
    differences = []
    for key in sorted(set(saved.get("model", {})) | set(now["model"])):
        if saved.get("model", {}).get(key) != now["model"].get(key):
            differences.append(
                f"model.{key}: {_shown(saved.get('model', {}).get(key))} in the checkpoint, "
                f"{_shown(now['model'].get(key))} now"
            )
    for key, value in now["train"].items():
        if key not in RESUMABLE_CHANGES and saved.get("train", {}).get(key) != value:
            differences.append(
                f"train.{key}: {_shown(saved.get('train', {}).get(key))} in the checkpoint, {_shown(value)} now"
            )
    if differences:
        raise ValueError(
            "cannot resume: the run in this folder was made with a different configuration ("
            + "; ".join(differences[:4])
            + "); resume with the same options, or start a new run with another --out"
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(document, dict):
        raise ValueError(f"config file {path} must be a mapping with 'model:' and/or 'train:' sections")
    return document


def cannot_create_in(folder: Path) -> str | None:
    """Why nothing can be created in `folder` (the OSError's text), or None if something can. Tried by making
    and removing a temporary file: os.access says yes to root even where nothing can be created (/proc)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".attnlab-write-check-"):
            return None
    except OSError as error:
        return error.strerror


LOCK_FILE = ".attnlab.lock"  # in a folder an attnlab process writes; holds the writer's PID


def lock_folder(folder: Path) -> IO[str]:
    """Take the exclusive advisory lock (`flock`) of `folder`, which must exist, for as long as the returned
    file stays open (the kernel drops it when the process dies). A second writer gets one line naming the
    holder's PID."""
    return _hold_lock(folder / LOCK_FILE, folder, "another folder")


def lock_output_file(path: Path) -> IO[str]:
    """The same for one output file (`.NAME.lock` beside it): two processes never write one results file."""
    return _hold_lock(path.with_name(f".{path.name}.lock"), path, "another path")


def _hold_lock(lock_path: Path, target: Path, elsewhere: str) -> IO[str]:
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ValueError(
            f"{target} is in use by another attnlab process (PID {holder}); wait for it to end, or choose {elsewhere}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file of this process in the same folder, synced, then rename (and sync the
    folder): readers never see half a file, and after a crash the file is the old one or the new one."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as a plain open() would have made it
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)  # a failed write leaves the previous file, and nothing else
        raise
    fsync_directory(path.parent)


def fsync_directory(folder: Path) -> None:
    """Make the entries of `folder` (renames, new files) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


__all__ = [
    "LOCK_FILE",
    "RunConfig",
    "TrainConfig",
    "check_resume_compatible",
    "lock_folder",
    "lock_output_file",
    "resolve_run_config",
    "write_text_atomic",
]
