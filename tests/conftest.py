"""Shared fixtures: tiny configs so the whole suite stays fast on 2 CPU cores."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import pytest
import torch

from attnlab import AttnLabConfig

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@contextlib.contextmanager
def ctrl_c_reaches_children():
    """Processes started inside get SIGINT's default action (KeyboardInterrupt in Python) even when this
    one ignores SIGINT, as under a shell that runs the tests in the background: exec keeps an ignored
    signal ignored, but resets a handled one to its default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def tiny_config(**overrides) -> AttnLabConfig:
    options = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=48,
        rope_theta=10000.0,
    )
    options.update(overrides)
    return AttnLabConfig(**options)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small real-English JSONL corpus: CPython's documentation topics (on every Python install)."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    with path.open("w") as handle:
        for name in sorted(topics)[:60]:
            handle.write(json.dumps({"text": topics[name]}) + "\n")
    return path


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory):
    """attnlab's cache (the extracted built-in corpus) and `datasets`' cache (lm-eval's JSON tasks, ...) in
    folders of this test session, for this process and the processes it starts: never the user's ~/.cache.
    (Without `datasets`, e.g. on a GPU machine with its own packages running the kernel tests, the variable is
    enough.)"""
    try:
        import datasets.config
    except ImportError:
        datasets = None

    attnlab_cache, datasets_cache = tmp_path_factory.mktemp("attnlab-cache"), tmp_path_factory.mktemp("hf-datasets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATTNLAB_CACHE", str(attnlab_cache))
        patch.setenv("HF_DATASETS_CACHE", str(datasets_cache))
        if datasets is not None:
            patch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)  # read when datasets was imported
        yield


@pytest.fixture(autouse=True)
def _working_folder(tmp_path, monkeypatch):
    """Each test runs in its own folder: a default output such as eval's results.json lands there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine a contended pool makes
    the suite many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class PicklePayload:
    """Unpickling this creates `marker`: a stand-in for arbitrary code in a crafted file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
