"""The `attnlab` command with a fault injected: the only way to reach `attnlab.train.fault_hooks`.

    python tests/faulty_attnlab.py FAULT ARGS...

FAULT is `kill-at-step:N` (SIGKILL before optimizer step N), `kill-during-save:N` (SIGKILL once checkpoint
N's weights are written, before its trainer state) or `nan-at-step:N` (the loss of step N is non-finite).
"""

from __future__ import annotations

import os
import signal
import sys

from attnlab import train
from attnlab.cli import main


class InjectedFault(train.FaultHooks):
    def __init__(self, spec: str) -> None:
        kind, _, step = spec.partition(":")
        if kind not in ("kill-at-step", "kill-during-save", "nan-at-step") or not step.isdigit():
            raise SystemExit(f"fault {spec!r} is not kill-at-step:N, kill-during-save:N or nan-at-step:N")
        self.kind, self.step = kind, int(step)

    def maybe_kill_before_step(self, step: int) -> None:
        if self.kind == "kill-at-step" and step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def kill_during_save(self, step: int):
        if self.kind == "kill-during-save" and step == self.step:
            return lambda: os.kill(os.getpid(), signal.SIGKILL)
        return None

    def poisons(self, step: int) -> bool:
        """True once, for the first micro-batch of step N."""
        if self.kind == "nan-at-step" and step == self.step:
            self.kind = None
            return True
        return False


if __name__ == "__main__":
    train.fault_hooks = InjectedFault(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
