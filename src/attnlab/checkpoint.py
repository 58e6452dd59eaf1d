"""Atomic, HF-style training checkpoints: `OUT/checkpoint-<step>/`.

A checkpoint folder holds the model (`save_pretrained`: config.json + model.safetensors) and
`trainer_state.pt` (optimizer, scheduler, RNG states, data position, counters). It is written under a
temporary name and renamed when complete, so a kill at any instant leaves the previous checkpoint intact;
only folders named `checkpoint-<step>` that contain `trainer_state.pt` count as complete.

Loading never runs code from a file: the weights are safetensors, and `trainer_state.pt` is read with
`torch.load(weights_only=True)`, whose unpickler builds only tensors and plain values (numbers, strings,
lists, tuples, dicts) — everything attnlab writes there. A file holding anything else is refused.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"


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


def save_checkpoint(
    out: Path,
    step: int,
    model,
    trainer_state: dict[str, Any],
    keep: int,
    after_weights: Callable[[], None] | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically, then delete all but the newest `keep` complete checkpoints.

    `after_weights` runs once the weights are on disk in the temporary folder (used for fault injection).
    """
    final = out / f"checkpoint-{step}"
    temporary = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    if after_weights is not None:
        after_weights()
    torch.save(trainer_state, temporary / TRAINER_STATE)
    _fsync_folder(temporary)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    for _, old in complete_checkpoints(out)[:-keep]:
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


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
