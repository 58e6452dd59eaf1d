"""The software a number was made with: the versions of the packages that decide it, and the lock they match.

`requirements.lock` at the repository root pins every package of the CPU set-up that the README's commands
install (and that CI tests). `versions()` is what every results file, `run_config.yaml`, bench record and
study report records; `attnlab env` prints it, with each package that differs from the lock.

A version matches its lock entry when the public versions are equal, so a local build label does not count
as a difference (`torch 2.13.0+cpu` or `2.13.0+cu128` matches `torch==2.13.0`).
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

RECORDED_PACKAGES = ("attnlab", "torch", "transformers", "lm-eval", "datasets", "tokenizers")
LOCK_FILE_NAME = "requirements.lock"
_PINNED_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*(?:;.*)?$")  # name==version [; marker]


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None if it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def normalized_name(distribution: str) -> str:
    """PEP 503's normal form: `lm_eval`, `LM-Eval` and `lm.eval` are one package."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def default_lock_path() -> Path | None:
    """The lock of the source tree attnlab is installed from (an editable or source-tree install), or None."""
    candidate = Path(__file__).resolve().parents[2] / LOCK_FILE_NAME
    return candidate if candidate.is_file() else None


def read_lock(path: str | Path) -> dict[str, str]:
    """The `name==version` pins of a pip requirements/constraints file, keyed by normalized name."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read the lock {path}: {error.strerror}") from None
    pins: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):  # comments, annotations and pip options
            continue
        match = _PINNED_LINE.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {line!r}; regenerate the lock")
        pins[normalized_name(match[1])] = match[2]
    if not pins:
        raise ValueError(f"{path} pins no package; regenerate the lock")
    return pins


@dataclass(frozen=True)
class LockDifference:
    name: str
    installed: str | None  # None: not installed
    locked: str

    def __str__(self) -> str:
        return f"{self.name} {self.installed or 'not installed'} (lock {self.locked})"


def _same_release(installed: str, locked: str) -> bool:
    try:
        return Version(installed).public == Version(locked).public
    except InvalidVersion:
        return installed == locked


def lock_differences(lock: dict[str, str], include_missing: bool = False) -> list[LockDifference]:
    """The locked packages whose installed version differs (and, if asked, those not installed at all)."""
    differences = []
    for name, locked in sorted(lock.items()):
        installed = installed_version(name)
        if installed is None and not include_missing:
            continue  # e.g. the test extras in an environment set up without them
        if installed is None or not _same_release(installed, locked):
            differences.append(LockDifference(name, installed, locked))
    return differences


def lock_status(lock_path: Path | None = None) -> str:
    """One phrase: whether the installed packages match the lock."""
    lock_path = lock_path or default_lock_path()
    if lock_path is None:
        return f"unknown (no {LOCK_FILE_NAME}: attnlab is not installed from its source tree)"
    differences = lock_differences(read_lock(lock_path))
    if not differences:
        return f"matches {LOCK_FILE_NAME}"
    return f"differs from {LOCK_FILE_NAME}: " + ", ".join(str(difference) for difference in differences)


def package_versions() -> dict[str, str | None]:
    """Python's version and those of `RECORDED_PACKAGES`."""
    return {"python": platform.python_version(), **{name: installed_version(name) for name in RECORDED_PACKAGES}}


def versions() -> dict[str, str | None]:
    """`package_versions()`, and whether the installed set matches the lock."""
    record = package_versions()
    try:
        record["lock"] = lock_status()
    except ValueError as error:
        record["lock"] = f"unreadable ({error})"
    return record


__all__ = [
    "LOCK_FILE_NAME",
    "RECORDED_PACKAGES",
    "LockDifference",
    "default_lock_path",
    "installed_version",
    "lock_differences",
    "lock_status",
    "package_versions",
    "read_lock",
    "versions",
]
