"""The lock and the versions record: the lock covers pyproject.toml, `attnlab env` tells what differs from it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from attnlab import __version__
from attnlab.cli import main
from attnlab.environment import (
    RECORDED_PACKAGES,
    default_lock_path,
    installed_version,
    lock_differences,
    lock_status,
    normalized_name,
    read_lock,
    versions,
)

REPOSITORY = Path(__file__).resolve().parents[1]
LOCK = REPOSITORY / "requirements.lock"


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    extras = [requirement for group in project["optional-dependencies"].values() for requirement in group]
    return [Requirement(text) for text in project["dependencies"] + extras]


def test_the_lock_pins_every_dependency_within_the_range_pyproject_allows():
    """A dependency added or bumped in pyproject.toml without regenerating the lock fails here."""
    pins = read_lock(LOCK)
    for requirement in _project_requirements():
        name = normalized_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock; run scripts/update-lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert pins["torch"] == "2.13.0"  # the CPU set-up's torch, without a local build label
    assert default_lock_path() == LOCK  # this checkout is the source tree attnlab runs from


def test_read_lock_takes_pins_and_skips_annotations_and_options(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# header\n--find-links somewhere\nLM_Eval==0.4.13\n    # via attnlab\n"
        "torch==2.13.0  # pinned\ntyping-extensions==4.15.0 ; python_version < '3.12'\n"
    )
    assert read_lock(lock) == {"lm-eval": "0.4.13", "torch": "2.13.0", "typing-extensions": "4.15.0"}


@pytest.mark.parametrize(
    ("text", "message"),
    [("torch>=2.5\n", r"lock\.txt:1: expected 'name==version'"), ("# nothing\n", "pins no package")],
)
def test_a_lock_that_is_not_a_list_of_pins_is_refused(tmp_path, text, message):
    lock = tmp_path / "lock.txt"
    lock.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_lock(lock)


def test_differences_compare_public_versions_and_skip_what_is_not_installed():
    installed_torch = Version(installed_version("torch"))
    lock = {
        "torch": installed_torch.public,  # 2.13.0+cpu installed matches 2.13.0 locked
        "transformers": "5.0.0",
        "surely-not-an-installed-package": "1.0",
    }
    differences = lock_differences(lock)
    assert [(d.name, d.installed, d.locked) for d in differences] == [
        ("transformers", transformers.__version__, "5.0.0")
    ]
    assert str(differences[0]) == f"transformers {transformers.__version__} (lock 5.0.0)"
    with_missing = lock_differences(lock, include_missing=True)
    assert [d.name for d in with_missing] == ["surely-not-an-installed-package", "transformers"]


def test_versions_record_the_packages_that_decide_the_numbers(tmp_path):
    record = versions()
    assert list(record) == ["python", *RECORDED_PACKAGES, "lock"]
    assert record["attnlab"] == __version__ and record["transformers"] == transformers.__version__
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    lock = tmp_path / "requirements.lock"
    lock.write_text("transformers==5.0.0\n")
    assert lock_status(lock) == f"differs from requirements.lock: transformers {transformers.__version__} (lock 5.0.0)"
    lock.write_text(f"transformers=={transformers.__version__}\n")
    assert lock_status(lock) == "matches requirements.lock"


def test_env_command_names_the_packages_that_differ_and_check_fails_on_them(tmp_path, capsys):
    lock = tmp_path / "lock.txt"
    lock.write_text(f"transformers==5.0.0\ntorch=={Version(installed_version('torch')).public}\n")
    assert main(["env", "--lock", str(lock)]) == 0
    assert main(["env", "--lock", str(lock), "--check"]) == 1
    output = capsys.readouterr().out.splitlines()
    assert f"transformers  {transformers.__version__}  (lock 5.0.0)" in output
    assert (
        output[-1]
        == f"lock: {lock}: 1 installed package(s) differ: transformers {transformers.__version__} (lock 5.0.0)"
    )
    lock.write_text(f"transformers=={transformers.__version__}\n")
    assert main(["env", "--lock", str(lock), "--check"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"lock: {lock}: all 1 pinned packages that are installed match"


def test_env_command_refuses_a_missing_lock_in_one_line(tmp_path, capsys):
    assert main(["env", "--lock", str(tmp_path / "absent.lock")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"attnlab: error: cannot read the lock {tmp_path / 'absent.lock'}: No such file or directory"
    ]


def test_version_flag():
    result = subprocess.run([sys.executable, "-m", "attnlab", "--version"], capture_output=True, text=True)
    assert (result.returncode, result.stdout.strip()) == (0, f"attnlab {__version__}")
