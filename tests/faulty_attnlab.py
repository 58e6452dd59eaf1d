"""The `attnlab` command with a fault injected: the only way to reach `attnlab.train.fault_hooks`.

    python tests/faulty_attnlab.py FAULT ARGS...

FAULT is `kill-at-step:N` (SIGKILL before optimizer step N), `kill-during-save:N` (SIGKILL once checkpoint
N's weights are written, before its trainer state), `nan-at-step:N` (the loss of step N is non-finite) or
`wait-at-step:N:FILE` (before step N, wait until FILE exists: a run held mid-way while a test looks at it)
or `enospc-during-save:N` (writing checkpoint N fails as on a full disk, once its weights are written).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

from attnlab import train
from attnlab.cli import main


class InjectedFault(train.FaultHooks):
    def __init__(self, spec: str) -> None:
        kind, _, rest = spec.partition(":")
        step, _, release = rest.partition(":")
        kinds = ("kill-at-step", "kill-during-save", "nan-at-step", "wait-at-step", "enospc-during-save")
        if kind not in kinds or not step.isdigit() or (kind == "wait-at-step") != bool(release):
            raise SystemExit(f"fault {spec!r} is not one of {', '.join(kinds)} with a step (and a file to wait for)")
        self.kind, self.step, self.release = kind, int(step), Path(release)

    def maybe_kill_before_step(self, step: int) -> None:
        if self.kind == "kill-at-step" and step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "wait-at-step" and step == self.step:
            while not self.release.exists():
                time.sleep(0.05)

    def kill_during_save(self, step: int):
        if self.kind == "kill-during-save" and step == self.step:
            return lambda: os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "enospc-during-save" and step == self.step:
            return _disk_full
        return None

    def poisons(self, step: int) -> bool:
        """True once, for the first micro-batch of step N."""
        if self.kind == "nan-at-step" and step == self.step:
            self.kind = None
            return True
        return False


def _disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


if __name__ == "__main__":
    train.fault_hooks = InjectedFault(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
