#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml with pip-tools' resolver (the newest versions that
# pyproject.toml allows, torch pinned to the CPU set-up's 2.13.0). Run from anywhere; Python 3.11 needed.
# After it: run the README's test command on a fresh clone, and commit the lock with the change that needed it.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3.11 -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet pip-tools==7.7.0
"$tools/venv/bin/pip-compile" --quiet --extra test --strip-extras --allow-unsafe --no-header \
  --no-emit-find-links --no-emit-index-url --upgrade --upgrade-package 'torch==2.13.0' \
  --output-file "$tools/compiled.txt" pyproject.toml
{
  cat <<'HEADER'
# attnlab's lock: every package of the CPU set-up (`pip install -e '.[test]'` on Python 3.11), pinned.
# The README's commands install through it (`pip install -c requirements.lock ...`), and CI tests exactly
# this set; pyproject.toml keeps ranges for those who install attnlab as a library.
# Regenerate it (after changing a dependency) with:   bash scripts/update-lock.sh
# which runs:   pip-compile --extra test --strip-extras --allow-unsafe --upgrade --upgrade-package 'torch==2.13.0' pyproject.toml
# torch is pinned without its local build label (+cpu): pip takes the CPU build where one is offered, and
# GPU users install their own torch over it (README). No hashes: torch's CPU and CUDA builds of 2.13.0 are
# different files, and pip's hash-checking mode refuses the editable install of attnlab itself.
HEADER
  sed -E 's/^(torch==[^+ ]+)\+[A-Za-z0-9.]+/\1/' "$tools/compiled.txt"
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -c '^[A-Za-z0-9]' requirements.lock) packages)"
