"""Hub sources, through a Hub on 127.0.0.1 (`fake_hub.py`) and the libraries' real download code: a run
records the commits of its `hf:` data and `--tokenizer NAME`, reads exactly those commits, and a resume
keeps reading them after the Hub's `main` has moved; offline, the commit comes from the local Hub cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from attnlab.data import build_tokenizer, open_corpus

from .fake_hub import FakeHub
from .test_train import run_attnlab, tiny_train_args


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()


def _split_files(texts: list[str]) -> dict[str, bytes]:
    return {"data/train.jsonl": _jsonl(texts[:30]), "data/validation.jsonl": _jsonl(texts[30:])}


def _tokenizer_files(folder: Path, vocab_size: int, corpus_file: Path) -> dict[str, bytes]:
    build_tokenizer(f"bpe:{vocab_size}", open_corpus(str(corpus_file))).save_pretrained(folder)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture
def hub(tmp_path):
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)]  # 79 documents
    corpus_file = tmp_path / "topics.jsonl"
    corpus_file.write_bytes(_jsonl(texts))
    hub = FakeHub(tmp_path / "hf-home")
    hub.data_commits = [  # two commits of different documents
        hub.push("dataset", "org/tiny", _split_files(half)) for half in (texts[:39], texts[39:78])
    ]
    hub.tokenizer_commits = [
        hub.push("model", "org/tok", _tokenizer_files(tmp_path / f"bpe{size}", size, corpus_file))
        for size in (300, 320)
    ]
    hub.corpus_file = corpus_file
    yield hub
    hub.close()


def _sources(out: Path) -> dict:
    return yaml.safe_load((out / "run_config.yaml").read_text())["sources"]


def _data_downloads(hub: FakeHub) -> set[str]:
    """The commits of the data files downloaded so far."""
    return {request.split("/resolve/")[1].split("/")[0] for request in hub.requests if "/data/" in request}


def test_a_run_records_the_hub_commits_it_read_and_resumes_at_them(hub, tmp_path):
    first_data, second_data = hub.data_commits
    first_tokenizer, second_tokenizer = hub.tokenizer_commits
    hub.repos[("dataset", "org/tiny")]["main"] = first_data
    out = tmp_path / "run"
    args = tiny_train_args("hf:org/tiny", out, "--tokenizer", "org/tok", "--save-every", "2", "--eval-every", "2")

    result = run_attnlab([*args, "--max-steps", "2"], env=hub.environment())
    assert result.returncode == 0, result.stderr
    assert _sources(out) == {
        "tokenizer": {"spec": "org/tok", "revision": second_tokenizer},
        "data": {"spec": "hf:org/tiny", "revision": first_data},
    }
    assert (
        json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
        == json.loads(hub.repos[("model", "org/tok")]["commits"][second_tokenizer]["tokenizer.json"])["model"]["vocab"]
    )
    assert _data_downloads(hub) == {first_data}

    # A push moves main on both repositories; the resumed run still reads (and records) what it started with.
    hub.repos[("dataset", "org/tiny")]["main"] = second_data
    hub.repos[("model", "org/tok")]["main"] = first_tokenizer
    hub.requests.clear()
    result = run_attnlab([*args, "--max-steps", "4", "--resume"], env=hub.environment())
    assert result.returncode == 0, result.stderr
    assert _sources(out)["data"]["revision"] == first_data
    assert _sources(out)["tokenizer"]["revision"] == second_tokenizer
    assert _data_downloads(hub) == {first_data}

    # A new run reads main as it is now.
    fresh = tmp_path / "fresh"
    result = run_attnlab([*args, "--out", str(fresh), "--max-steps", "1"], env=hub.environment())
    assert result.returncode == 0, result.stderr
    assert _sources(fresh)["data"]["revision"] == second_data
    assert _sources(fresh)["tokenizer"]["revision"] == first_tokenizer


def test_offline_the_tokenizer_commit_comes_from_the_hub_cache(hub, tmp_path):
    _, second_tokenizer = hub.tokenizer_commits
    run_online = tiny_train_args(hub.corpus_file, tmp_path / "online", "--tokenizer", "org/tok", "--max-steps", "1")
    result = run_attnlab(run_online, env=hub.environment())  # fills the Hub cache in HF_HOME
    assert result.returncode == 0, result.stderr
    hub.close()

    out = tmp_path / "offline"
    offline = tiny_train_args(hub.corpus_file, out, "--tokenizer", "org/tok", "--max-steps", "1")
    result = run_attnlab(offline, env=hub.environment(HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert _sources(out) == {
        "tokenizer": {"spec": "org/tok", "revision": second_tokenizer},
        "data": {"spec": str(hub.corpus_file), "revision": None},
    }
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "online" / "tokenizer.json").read_bytes()
