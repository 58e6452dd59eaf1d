"""The data layer: corpora (builtin, local files, hf: streaming), tokenizers, packing, train streams across
ranks, exact resume, statistics, and every bad-input message. Real components only; nothing from the
network (hf: is exercised on a local directory, AutoTokenizer on a saved folder)."""

from __future__ import annotations

import gzip
import json
import math
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from attnlab.data import (
    EOS_TOKEN,
    SPLITS,
    build_tokenizer,
    first_tokens,
    heldout_sequences,
    make_train_stream,
    open_corpus,
    split_tokens,
    unigram_entropy,
)
from attnlab.data.builtin import _cache_path, builtin_documents, extract_builtin_documents, stdlib_source_files
from attnlab.data.corpus import _parse_hub_spec
from attnlab.data.tokenizer import encode_documents

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = ["the", "a", "of", "river", "stone", "light", "quiet", "north", "window", "seven", "garden", "letter"]


def sentence_documents(count: int, prefix: str = "doc") -> list[str]:
    """Distinct, deterministic little documents of varying length."""
    return [
        f"{prefix} {index}: "
        + " ".join(WORDS[(index * 7 + position * 3) % len(WORDS)] for position in range(5 + index % 23))
        for index in range(count)
    ]


def write_jsonl(path: Path, documents: list[str], **extra) -> Path:
    path.write_text("".join(json.dumps({"text": text, **extra}) + "\n" for text in documents))
    return path


def all_documents(corpus) -> list[str]:
    return [text for split in SPLITS for text in corpus.documents(split)]


def eos_joined(tokenizer, documents: list[str]) -> list[int]:
    stream = []
    for ids in encode_documents(tokenizer, documents):
        stream += ids + [tokenizer.eos_token_id]
    return stream


# ------------------------------------------------------------------------------------------ builtin corpus


@pytest.fixture(scope="module")
def builtin():
    corpus = open_corpus("builtin")
    return corpus, build_tokenizer("bpe:4096", corpus)


def test_builtin_corpus_is_deterministic(builtin):
    corpus, tokenizer = builtin
    assert list(builtin_documents()) == extract_builtin_documents()  # a fresh parse == the cached earlier one
    again = open_corpus("builtin")
    for split in SPLITS:
        assert list(again.documents(split)) == list(corpus.documents(split))
    assert "CPython" in corpus.description and not corpus.streaming
    assert again.description == corpus.description
    fresh_tokens = split_tokens(again, tokenizer, "train")  # tokenized again: `again` has its own cache
    assert fresh_tokens is not split_tokens(corpus, tokenizer, "train")
    assert (fresh_tokens == split_tokens(corpus, tokenizer, "train")).all()


def test_the_builtin_cache_is_private_and_a_tampered_one_is_not_used(builtin, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "cache"))
    genuine = builtin_documents()
    cache_file = _cache_path()
    assert cache_file.parent == tmp_path / "cache" and not cache_file.exists()
    cache_file.parent.mkdir()
    cache_file.write_text(json.dumps({"sha256": "0" * 64, "documents": ["planted text"]}))
    builtin_documents.cache_clear()
    try:
        assert builtin_documents() == genuine  # the planted list fails its hash: extracted again
        stored = json.loads(cache_file.read_text())
        assert stored["documents"] == list(genuine) and [p.name for p in cache_file.parent.iterdir()] == [
            cache_file.name
        ]
        cache_file.write_text(json.dumps(["a bare list of strings, as the old temp-folder cache held"]))
        builtin_documents.cache_clear()
        assert builtin_documents() == genuine
    finally:
        builtin_documents.cache_clear()


def test_builtin_splits_are_disjoint_and_large_enough(builtin):
    corpus, tokenizer = builtin
    splits = {split: list(corpus.documents(split)) for split in SPLITS}
    assert sorted(text for texts in splits.values() for text in texts) == sorted(
        builtin_documents()
    )  # a partition of the documents
    assert not set(splits["train"]) & set(splits["valid"]) and not set(splits["valid"]) & set(splits["test"])
    sizes = {split: sum(len(text.encode()) for text in texts) for split, texts in splits.items()}
    total = sum(sizes.values())
    assert 1_500_000 < total < 4_000_000
    assert sizes["train"] > 0.9 * total
    for split in ("valid", "test"):
        assert heldout_sequences(corpus, tokenizer, 128, 10_000, split).shape[0] >= 100


def test_builtin_text_is_prose_from_the_library_itself():
    files = stdlib_source_files()
    assert files and not any(
        part in ("test", "tests", "idlelib", "turtledemo", "site-packages")
        for name in files
        for part in Path(name).parts
    )
    documents = builtin_documents()
    assert any(text.startswith('The "assert" statement') for text in documents)  # a documentation topic
    assert not any(line.lstrip().startswith(">>>") for text in documents for line in text.splitlines())
    assert len(set(documents)) == len(documents)


# --------------------------------------------------------------------------------------------- local files


def test_every_local_format_reads_the_same_documents(tmp_path):
    documents = sentence_documents(12)
    write_jsonl(tmp_path / "plain.jsonl", documents, source="x")
    (tmp_path / "packed.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((tmp_path / "plain.jsonl").read_bytes())
    )
    (tmp_path / "packed.jsonl.gz").write_bytes(gzip.compress((tmp_path / "plain.jsonl").read_bytes()))
    pq.write_table(pa.table({"text": documents, "id": list(range(12))}), tmp_path / "table.parquet")
    (tmp_path / "paragraphs.txt").write_text("\n\n".join(documents) + "\n")
    for name in ("plain.jsonl", "packed.jsonl.zst", "packed.jsonl.gz", "table.parquet", "paragraphs.txt"):
        corpus = open_corpus(str(tmp_path / name))
        assert sorted(all_documents(corpus)) == sorted(documents), name
        assert list(corpus.documents("train")) == [text for text in documents if text in set(corpus.documents("train"))]
        assert not corpus.streaming and str(tmp_path / name) in corpus.description


def test_txt_documents_are_blank_line_separated_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph,\nstill the first.\n\n\n\nSecond paragraph.\n\n   \n\nThird.")
    assert sorted(all_documents(open_corpus(str(path)))) == sorted(
        ["First paragraph,\nstill the first.", "Second paragraph.", "Third."]
    )


def test_globs_directories_and_lists(tmp_path):
    first, second, third = sentence_documents(30, "one"), sentence_documents(30, "two"), sentence_documents(30, "three")
    write_jsonl(tmp_path / "a.jsonl", first, meta={"kind": 1})
    write_jsonl(tmp_path / "b.jsonl", second, other=[1, 2])  # different extra fields per file are fine
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "c.txt").write_text("\n\n".join(third))
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / ".hidden" / "skip.jsonl", ["never read"])
    assert sorted(all_documents(open_corpus(str(tmp_path / "*.jsonl")))) == sorted(first + second)
    assert sorted(all_documents(open_corpus(str(tmp_path)))) == sorted(first + second + third)
    listed = open_corpus(f"{tmp_path / 'b.jsonl'},{tmp_path / 'nested' / '*.txt'}")
    assert sorted(all_documents(listed)) == sorted(second + third)
    assert sorted(all_documents(open_corpus(str(tmp_path / "**" / "*.txt")))) == sorted(third)


def test_heldout_documents_are_chosen_by_content_not_position(tmp_path):
    documents = sentence_documents(200)
    forward = open_corpus(str(write_jsonl(tmp_path / "forward.jsonl", documents)))
    backward = open_corpus(str(write_jsonl(tmp_path / "backward.jsonl", documents[::-1])))
    for split in SPLITS:
        assert set(forward.documents(split)) == set(backward.documents(split))
        assert list(forward.documents(split))  # every split is non-empty
    assert len(list(forward.documents("train"))) >= 0.85 * len(documents)


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file(), reason="no shared data")
def test_tinyshakespeare_as_a_real_local_file():
    corpus = open_corpus(str(SHARED_DATA / "tinyshakespeare" / "input.txt"))
    train = list(corpus.documents("train"))
    assert len(train) > 5000 and train[0].startswith("First Citizen:")
    tokenizer = build_tokenizer("bpe:512", corpus)
    stream = make_train_stream(corpus, tokenizer, 128, seed=0)
    assert stream.next_batch(4).shape == (4, 128) and stream.tokens_per_epoch > 300_000
    assert heldout_sequences(corpus, tokenizer, 128, 1000).shape[0] >= 100
    assert tokenizer.decode(first_tokens(corpus, tokenizer, 12)).startswith("First Citizen")


# ----------------------------------------------------------------------------------------- hf: streaming


def make_hub_folder(folder: Path, shards: int, count: int = 240) -> list[str]:
    """A local folder of JSONL shards, read through hf: exactly as a Hub dataset would be."""
    documents = sentence_documents(count)
    for shard in range(shards):
        write_jsonl(folder / f"shard-{shard:02d}.jsonl", documents[shard::shards], id=shard)
    return [text for shard in range(shards) for text in documents[shard::shards]]


@pytest.fixture
def hub_folder(tmp_path) -> tuple[Path, list[str]]:
    return tmp_path, make_hub_folder(tmp_path, shards=4)


def test_hf_streaming_corpus_on_a_local_folder(hub_folder):
    folder, documents = hub_folder
    corpus = open_corpus(f"hf:{folder}")
    assert corpus.streaming and "carved from train" in corpus.description
    splits = {split: list(corpus.documents(split)) for split in SPLITS}
    assert sorted(text for texts in splits.values() for text in texts) == sorted(documents)
    assert splits["train"] == [text for text in documents if text in set(splits["train"])]  # source order
    tokenizer = build_tokenizer("bpe:300", corpus)
    stream = make_train_stream(corpus, tokenizer, 16, seed=0)
    assert stream.tokens_per_epoch is None and stream.next_batch(3).shape == (3, 16)
    assert first_tokens(corpus, tokenizer, 40) == eos_joined(tokenizer, splits["train"][:5])[:40]


def test_hf_uses_a_datasets_own_validation_and_test_splits(tmp_path):
    train, valid, test = sentence_documents(20, "train"), sentence_documents(5, "valid"), sentence_documents(5, "test")
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "validation.jsonl", valid)
    write_jsonl(tmp_path / "test.jsonl", test)
    corpus = open_corpus(f"hf:{tmp_path}")
    assert [list(corpus.documents(split)) for split in SPLITS] == [train, valid, test]
    assert "carved" not in corpus.description


@pytest.mark.parametrize(
    ("shards", "world_size"),
    [(4, 2), (4, 3), (17, 2)],  # whole shards per rank; every 3rd document; 17 uneven shards (>= 8 per rank)
)
def test_streaming_ranks_partition_the_documents(tmp_path, shards, world_size):
    make_hub_folder(tmp_path, shards)
    corpus = open_corpus(f"hf:{tmp_path}")
    tokenizer = build_tokenizer("bpe:300", corpus)
    per_rank = []
    for rank in range(world_size):
        stream = make_train_stream(corpus, tokenizer, 8, seed=5, rank=rank, world_size=world_size, shuffle_buffer=1)
        seen = []
        while (text := stream._next_document()) and stream.epoch == 0:  # one pass over this rank's share
            seen.append(text)
        per_rank.append(seen)
    everything = [text for seen in per_rank for text in seen]
    assert len(everything) == len(set(everything)) and set(everything) == set(corpus.documents("train"))
    assert all(per_rank)


def test_hf_spec_names_a_config_after_a_colon():
    assert _parse_hub_spec("cerebras/SlimPajama-627B") == ("cerebras/SlimPajama-627B", None)
    assert _parse_hub_spec("allenai/c4:en") == ("allenai/c4", "en")
    with pytest.raises(ValueError, match="hf: needs a dataset name"):
        open_corpus("hf:")


def test_streaming_batches_are_shuffled_by_seed_and_disjoint_across_ranks(hub_folder):
    folder, _ = hub_folder
    corpus = open_corpus(f"hf:{folder}")
    tokenizer = build_tokenizer("bpe:300", corpus)

    def documents_in(stream, steps):
        text = tokenizer.decode(torch.cat([stream.next_batch(4).flatten() for _ in range(steps)]).tolist())
        return text.split(EOS_TOKEN)[1:-1]  # whole documents only

    first = documents_in(make_train_stream(corpus, tokenizer, 32, seed=1, shuffle_buffer=16), 6)
    assert first == documents_in(make_train_stream(corpus, tokenizer, 32, seed=1, shuffle_buffer=16), 6)
    assert first != documents_in(make_train_stream(corpus, tokenizer, 32, seed=2, shuffle_buffer=16), 6)
    assert first != [text for text in corpus.documents("train")][1 : len(first) + 1]  # actually shuffled
    # within one pass over the data (the shard-to-rank assignment is reshuffled every pass)
    rank_zero = documents_in(
        make_train_stream(corpus, tokenizer, 32, seed=1, rank=0, world_size=2, shuffle_buffer=16), 6
    )
    rank_one = documents_in(
        make_train_stream(corpus, tokenizer, 32, seed=1, rank=1, world_size=2, shuffle_buffer=16), 6
    )
    assert rank_zero and rank_one and not set(rank_zero) & set(rank_one)


def test_streaming_resume_is_exact_across_a_pass_boundary(hub_folder):
    folder, _ = hub_folder
    corpus = open_corpus(f"hf:{folder}")
    tokenizer = build_tokenizer("bpe:300", corpus)
    for rank, world_size in ((0, 1), (1, 3)):
        stream = make_train_stream(corpus, tokenizer, 24, seed=3, rank=rank, world_size=world_size, shuffle_buffer=7)
        for _ in range(5):
            stream.next_batch(3)
        state = json.loads(json.dumps(stream.state_dict()))  # JSON-serialisable
        expected = [stream.next_batch(3) for _ in range(150)]
        assert stream.epoch >= 1  # the continuation crossed at least one end of the data
        resumed = make_train_stream(corpus, tokenizer, 24, seed=3, rank=rank, world_size=world_size, shuffle_buffer=7)
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.next_batch(3) for _ in range(150)]))
    with pytest.raises(ValueError, match="cannot resume the data stream: the checkpoint has seed=3"):
        make_train_stream(corpus, tokenizer, 24, seed=4, shuffle_buffer=7).load_state_dict(
            state | {"rank": 0, "world_size": 1}
        )


def test_streaming_token_stream_does_not_depend_on_batch_size(hub_folder):
    folder, _ = hub_folder
    corpus = open_corpus(f"hf:{folder}")
    tokenizer = build_tokenizer("bpe:300", corpus)
    small = make_train_stream(corpus, tokenizer, 16, seed=0)
    large = make_train_stream(corpus, tokenizer, 16, seed=0)
    assert torch.equal(torch.cat([small.next_batch(2) for _ in range(6)]), large.next_batch(12))


# ----------------------------------------------------------------------------------- packing and streams


@pytest.fixture
def small_corpus(tmp_path):
    corpus = open_corpus(str(write_jsonl(tmp_path / "small.jsonl", sentence_documents(150))))
    return corpus, build_tokenizer("bpe:300", corpus)


def test_packing_joins_documents_with_eos_and_never_pads(small_corpus):
    corpus, tokenizer = small_corpus
    train = list(corpus.documents("train"))
    stream_tokens = eos_joined(tokenizer, train)
    assert split_tokens(corpus, tokenizer, "train").tolist() == stream_tokens
    assert first_tokens(corpus, tokenizer, 100) == stream_tokens[:100]
    assert stream_tokens.count(tokenizer.eos_token_id) == len(train) and stream_tokens[-1] == tokenizer.eos_token_id
    valid_tokens = eos_joined(tokenizer, list(corpus.documents("valid")))
    heldout = heldout_sequences(corpus, tokenizer, 20, 1000)
    assert heldout.dtype == torch.int64 and heldout.shape == (len(valid_tokens) // 20, 20)
    assert heldout.flatten().tolist() == valid_tokens[: heldout.numel()]
    assert heldout_sequences(corpus, tokenizer, 20, 2).tolist() == heldout[:2].tolist()
    stream = make_train_stream(corpus, tokenizer, 20, seed=0)
    count = len(stream_tokens) // 20
    assert stream.tokens_per_epoch == count * 20
    epoch = stream.next_batch(count)  # exactly one epoch: every sequence once, none padded
    assert stream.epoch == 1 and epoch.dtype == torch.int64
    expected = sorted(map(tuple, torch.tensor(stream_tokens[: count * 20]).view(count, 20).tolist()))
    assert sorted(map(tuple, epoch.tolist())) == expected


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_together_see_what_one_process_sees(small_corpus, world_size):
    corpus, tokenizer = small_corpus
    single = make_train_stream(corpus, tokenizer, 64, seed=7)
    ranks = [make_train_stream(corpus, tokenizer, 64, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    steps = 2 * single.tokens_per_epoch // (64 * 5 * world_size) + 2  # well past an epoch boundary
    for _ in range(steps):
        together = torch.cat([stream.next_batch(5) for stream in ranks])
        assert torch.equal(together, single.next_batch(5 * world_size))
    assert single.epoch >= 2 and all(stream.epoch == single.epoch for stream in ranks)
    assert all(stream.state_dict() == single.state_dict() for stream in ranks)  # one global cursor


def test_packed_stream_resume_seed_and_epochs(small_corpus):
    corpus, tokenizer = small_corpus
    stream = make_train_stream(corpus, tokenizer, 32, seed=11)
    for _ in range(3):
        stream.next_batch(5)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [stream.next_batch(5) for _ in range(40)]
    resumed = make_train_stream(corpus, tokenizer, 32, seed=11, rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.next_batch(5) for _ in range(40)]))
    same = make_train_stream(corpus, tokenizer, 32, seed=11).next_batch(8)
    assert torch.equal(same, make_train_stream(corpus, tokenizer, 32, seed=11).next_batch(8))
    assert not torch.equal(same, make_train_stream(corpus, tokenizer, 32, seed=12).next_batch(8))
    assert not (stream.permutation(0) == stream.permutation(1)).all()  # each epoch has its own order
    with pytest.raises(ValueError, match="the checkpoint has seq_len=32 but this run has 16"):
        make_train_stream(corpus, tokenizer, 16, seed=11).load_state_dict(state)


def test_shifted_windows_cut_each_epoch_at_its_own_offset_and_resume_exactly(small_corpus):
    """With shifted_windows, epoch e's sequences are the N = (len − L + 1) // L consecutive windows that start at
    its offset o_e (0 for epoch 0), each once, in that epoch's permutation; later epochs differ from epoch 0's
    windows; two ranks see what one process sees; a resume continues exactly, and a plain stream's state is
    refused."""
    corpus, tokenizer = small_corpus
    tokens = torch.tensor(split_tokens(corpus, tokenizer, "train").tolist())
    seq_len = 20
    stream = make_train_stream(corpus, tokenizer, seq_len, seed=3, shifted_windows=True)
    count = (len(tokens) - seq_len + 1) // seq_len
    assert stream.num_sequences == count
    offsets = set()
    for epoch in range(4):
        offset = stream.window_offset(epoch)
        offsets.add(offset)
        windows = tokens[offset : offset + count * seq_len].view(count, seq_len)
        batch = stream.next_batch(count)  # exactly one epoch
        assert torch.equal(batch, windows[torch.from_numpy(stream.permutation(epoch))])
    assert stream.window_offset(0) == 0 and len(offsets) > 1
    ranks = [
        make_train_stream(corpus, tokenizer, seq_len, seed=3, rank=r, world_size=2, shifted_windows=True)
        for r in (0, 1)
    ]
    single = make_train_stream(corpus, tokenizer, seq_len, seed=3, shifted_windows=True)
    for _ in range(2 * count // 14 + 2):  # past two epoch boundaries
        assert torch.equal(torch.cat([rank.next_batch(7) for rank in ranks]), single.next_batch(14))
    state = json.loads(json.dumps(single.state_dict()))
    resumed = make_train_stream(corpus, tokenizer, seq_len, seed=3, shifted_windows=True)
    resumed.load_state_dict(state)
    assert all(torch.equal(single.next_batch(5), resumed.next_batch(5)) for _ in range(30))
    with pytest.raises(ValueError, match="cannot resume the data stream"):
        make_train_stream(corpus, tokenizer, seq_len, seed=3).load_state_dict(state)


def test_unigram_entropy_matches_a_direct_count(small_corpus):
    corpus, tokenizer = small_corpus
    tokens = eos_joined(tokenizer, list(corpus.documents("train")))
    counts = Counter(tokens)
    direct = -sum(c / len(tokens) * math.log(c / len(tokens)) for c in counts.values())
    assert unigram_entropy(corpus, tokenizer) == pytest.approx(direct, rel=1e-12)
    assert 0 < unigram_entropy(corpus, tokenizer, "valid") <= math.log(len(tokenizer))


def test_unigram_entropy_of_a_streaming_corpus(hub_folder):
    folder, _ = hub_folder
    corpus = open_corpus(f"hf:{folder}")
    tokenizer = build_tokenizer("bpe:300", corpus)
    tokens = eos_joined(tokenizer, list(corpus.documents("train")))
    probabilities = [c / len(tokens) for c in Counter(tokens).values()]
    assert unigram_entropy(corpus, tokenizer) == pytest.approx(-sum(p * math.log(p) for p in probabilities))


# ---------------------------------------------------------------------------------------------- tokenizers


def test_bpe_is_deterministic_and_round_trips_through_save_pretrained(small_corpus, tmp_path):
    corpus, tokenizer = small_corpus
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and len(tokenizer) <= 300
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOS_TOKEN
    assert build_tokenizer("bpe:300", corpus).backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    text = "doc 7: the river under a bright window, slowly — ünïcode too"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: no unknown tokens
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.eos_token_id == tokenizer.eos_token_id
    via_spec = build_tokenizer(str(tmp_path / "tok"), corpus)  # the AutoTokenizer path, as for a Hub name
    assert via_spec.encode(text) == tokenizer.encode(text) and via_spec.pad_token == EOS_TOKEN
    assert first_tokens(corpus, via_spec, 50) == first_tokens(corpus, tokenizer, 50)


def test_a_tokenizer_without_eos_is_rejected(small_corpus, tmp_path):
    corpus, tokenizer = small_corpus
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="has no eos token"):
        build_tokenizer(str(tmp_path / "bare"), corpus)


def test_truncation_saved_in_a_tokenizer_never_cuts_documents(small_corpus, tmp_path):
    corpus, tokenizer = small_corpus
    cut = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()), eos_token=EOS_TOKEN
    )
    cut.backend_tokenizer.enable_truncation(8)
    long_text = " ".join(WORDS * 5)
    assert len(encode_documents(cut, [long_text])[0]) == len(tokenizer.encode(long_text)) > 8
    cut.save_pretrained(tmp_path / "cut")
    loaded = build_tokenizer(str(tmp_path / "cut"), corpus)
    assert first_tokens(corpus, loaded, 200) == first_tokens(corpus, tokenizer, 200)


@pytest.mark.parametrize("spec", ["bpe:100", "bpe:lots", "bpe:"])
def test_bad_bpe_specs(small_corpus, spec):
    with pytest.raises(ValueError, match="at least 257"):
        build_tokenizer(spec, small_corpus[0])


def test_unknown_tokenizer_fails_fast_with_one_line(small_corpus):
    start = time.monotonic()
    with pytest.raises(ValueError, match="could not load tokenizer 'attnlab-no-such-user/no-such-tokenizer'") as error:
        build_tokenizer("attnlab-no-such-user/no-such-tokenizer", small_corpus[0])
    assert "\n" not in str(error.value) and time.monotonic() - start < 30


# --------------------------------------------------------------------------------------------- bad input


def bad_inputs(tmp_path: Path) -> list[tuple[str, str]]:
    """(spec, text the one-line error must contain) for every kind of bad local input."""
    (tmp_path / "malformed.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "no_text.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"body": "no text"}\n')
    (tmp_path / "number.jsonl").write_text('{"text": 5}\n')
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    (tmp_path / "blank.jsonl").write_text('{"text": "fine"}\n\n{"text": "fine"}\n')
    (tmp_path / "broken.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b'{"text": "fine"}\n{"text": "fine"}\n{"text": \n')
    )
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "garbage.jsonl.zst").write_bytes(b"this is not zstd")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "no_text.parquet")
    (tmp_path / "notes.csv").write_text("text\nhello\n")
    (tmp_path / "empty_folder").mkdir()
    write_jsonl(tmp_path / "tiny.jsonl", [""])
    return [
        (str(tmp_path / "missing.jsonl"), "missing.jsonl: no such file or directory"),
        (str(tmp_path / "*.nothing"), "*.nothing: the pattern matched no files"),
        (str(tmp_path / "*.csv"), "matched 1 paths but no .jsonl.zst"),
        (str(tmp_path / "notes.csv"), "notes.csv: unsupported data file extension"),
        (str(tmp_path / "empty_folder"), "empty_folder: the directory holds no data files"),
        (str(tmp_path / "malformed.jsonl"), "malformed.jsonl line 2: malformed JSON"),
        (str(tmp_path / "no_text.jsonl"), 'no_text.jsonl line 3: the record has no "text" field'),
        (str(tmp_path / "number.jsonl"), 'number.jsonl line 1: the record has "text" of type int'),
        (str(tmp_path / "list.jsonl"), "list.jsonl line 1: a JSON list, not an object"),
        (str(tmp_path / "blank.jsonl"), "blank.jsonl line 2: blank line"),
        (str(tmp_path / "broken.jsonl.zst"), "broken.jsonl.zst line 3: malformed JSON"),
        (str(tmp_path / "empty.txt"), "no documents in " + str(tmp_path / "empty.txt")),
        (str(tmp_path / "blank.txt"), "no documents in " + str(tmp_path / "blank.txt")),
        (str(tmp_path / "tiny.jsonl"), "no documents in " + str(tmp_path / "tiny.jsonl")),
        (str(tmp_path / "latin1.txt"), "cannot read " + str(tmp_path / "latin1.txt") + ": not UTF-8 text (byte 3)"),
        (str(tmp_path / "garbage.jsonl.zst"), "cannot read " + str(tmp_path / "garbage.jsonl.zst")),
        (
            str(tmp_path / "garbage.parquet"),
            "cannot read " + str(tmp_path / "garbage.parquet") + ": not a readable Parquet",
        ),
        (str(tmp_path / "no_text.parquet"), 'no_text.parquet: no "text" string column (columns: body)'),
        (f"{tmp_path / 'malformed.jsonl'},{tmp_path / 'missing.txt'}", "missing.txt: no such file"),
        (f"hf:{tmp_path / 'no_such_folder'}", "no such directory"),
    ]


def test_bad_input_is_one_actionable_line(tmp_path):
    for spec, expected in bad_inputs(tmp_path):
        with pytest.raises(ValueError) as error:
            open_corpus(spec)
        message = str(error.value)
        assert expected in message and "\n" not in message, (spec, message)


def test_too_little_data_for_one_sequence_says_how_much_there_is(tmp_path):
    corpus = open_corpus(str(write_jsonl(tmp_path / "short.jsonl", sentence_documents(3))))
    tokenizer = build_tokenizer("bpe:260", corpus)
    count = len(split_tokens(corpus, tokenizer, "train"))
    with pytest.raises(ValueError, match=f"has only {count} tokens, fewer than one sequence of seq_len=100000"):
        make_train_stream(corpus, tokenizer, 100_000, seed=0)
    with pytest.raises(ValueError, match="fewer than one sequence of seq_len=100000"):
        heldout_sequences(corpus, tokenizer, 100_000, 4)
    with pytest.raises(ValueError, match=f"has only {count} tokens; 100000 are needed"):
        first_tokens(corpus, tokenizer, 100_000)


def test_unknown_hf_dataset_fails_fast_with_one_line():
    start = time.monotonic()
    with pytest.raises(ValueError, match="could not load hf:attnlab-no-such-user/no-such-dataset") as error:
        open_corpus("hf:attnlab-no-such-user/no-such-dataset")
    assert "\n" not in str(error.value) and time.monotonic() - start < 30


def test_bad_stream_arguments(small_corpus):
    corpus, tokenizer = small_corpus
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        make_train_stream(corpus, tokenizer, 16, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        make_train_stream(corpus, tokenizer, 16, seed=-1)
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        list(corpus.documents("validation"))
