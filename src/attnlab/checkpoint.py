"""Atomic, HF-style training checkpoints: `OUT/checkpoint-<step>/`.

A checkpoint folder holds the model (`save_pretrained`: config.json + model.safetensors),
`trainer_state.pt` (optimizer, scheduler, RNG states, data position, counters) and `manifest.json` (each
file's size and SHA-256). It is written under a temporary name unique to the writing process, synced, and
renamed when complete (then the folder is synced), so a kill at any instant leaves the previous checkpoint
intact; only folders named `checkpoint-<step>` that contain `trainer_state.pt` count as complete. A
failed write (a full disk) removes its partial folder and says which checkpoint is intact.

Resume takes the newest checkpoint that verifies against its manifest, naming each damaged one it skips
(checkpoints written before manifests existed are taken as they are). Figures and tables name checkpoints
and run folders with `checkpoint_labels`.

Loading never runs code from a file: the weights are safetensors, and `trainer_state.pt` is read with
`torch.load(weights_only=True)`, whose unpickler builds only tensors and plain values (numbers, strings,
lists, tuples, dicts) — everything attnlab writes there. A file holding anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .runconfig import fsync_directory

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in `out`, oldest first."""
    if not out.is_dir():
        return []
    found = []
    for path in out.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    checkpoints = complete_checkpoints(out)
    return checkpoints[-1][1] if checkpoints else None


def checkpoint_labels(checkpoints: Sequence[str | Path]) -> list[str]:
    """A short unique name per checkpoint: its folder name (`run/checkpoint-750` for a step folder); when
    two share a name, the parent folder is prepended if that tells them apart, else they get `#1`, `#2`, ..."""
    paths = [Path(checkpoint).resolve() for checkpoint in checkpoints]

    def short(path: Path, with_parent: bool) -> str:
        if with_parent or path.name.startswith("checkpoint-"):
            return f"{path.parent.name}/{path.name}"
        return path.name

    labels = [short(path, False) for path in paths]
    for label in set(labels):
        group = [index for index, other in enumerate(labels) if other == label]
        with_parent = [short(paths[index], True) for index in group]
        if len(group) > 1 and len(set(with_parent)) == len(group):  # the parent folder tells them apart
            for index, longer in zip(group, with_parent):
                labels[index] = longer
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label}#{seen[label]}")
    return unique


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint's files against its manifest (the first difference), or None."""
    manifest_file = checkpoint / MANIFEST
    if not manifest_file.is_file():
        return None  # written before manifests: nothing to check against
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} written"
        if _sha256(path) != expected["sha256"]:
            return f"{name} differs from what was written"
    return None


def latest_intact_checkpoint(out: Path, report: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint whose files match its manifest; `report` gets one line per skipped one."""
    for _, checkpoint in reversed(complete_checkpoints(out)):
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint
        report(f"{checkpoint.name} is damaged ({problem}); skipping it")
    return None


def save_checkpoint(
    out: Path,
    step: int,
    model,
    trainer_state: dict[str, Any],
    keep: int,
    after_weights: Callable[[], None] | None = None,
    protect: int | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically, then delete all but the newest `keep` complete checkpoints and
    `checkpoint-<protect>` (the best one so far).

    `after_weights` runs once the weights are on disk in the temporary folder (used for fault injection).
    An OS error while writing (a full disk) removes the partial folder and raises OSError with one line.
    """
    final = out / f"checkpoint-{step}"
    temporary = out / f".checkpoint-{step}.{os.getpid()}.tmp"
    try:
        model.save_pretrained(temporary)
        if after_weights is not None:
            after_weights()
        torch.save(trainer_state, temporary / TRAINER_STATE)
        _write_manifest(temporary)
        _fsync_folder(temporary)
    except (OSError, RuntimeError, SafetensorError) as error:  # torch and safetensors wrap a failed write
        shutil.rmtree(temporary, ignore_errors=True)
        intact = latest_checkpoint(out)
        kept = f"{intact.name} is intact" if intact is not None else "no earlier checkpoint exists"
        raise OSError(
            f"{_reason(error)} while writing {final.name} in {out}; {kept} (free space, then rerun with --resume)"
        ) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    fsync_directory(out)  # the rename is durable before older checkpoints go
    for old_step, old in complete_checkpoints(out)[:-keep]:
        if old_step != protect:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, unpickled with only tensors and plain values allowed."""
    path = checkpoint / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path} holds Python objects other than tensors and plain values; attnlab does not unpickle them "
            "(that could run code). It was not written by attnlab: resume from a checkpoint you trust"
        ) from None
    except (EOFError, RuntimeError) as error:  # a truncated or otherwise damaged file
        raise ValueError(f"{path} cannot be read ({str(error).splitlines()[0]}); the file is damaged") from None


def remove_stale_temporaries(out: Path) -> None:
    """Delete half-written checkpoint folders left by a killed run."""
    for path in out.glob(".checkpoint-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def _write_manifest(folder: Path) -> None:
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.iterdir())
        if path.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_directory(folder)


def report_to_stderr(line: str) -> None:
    print(f"attnlab: {line}", file=sys.stderr)
