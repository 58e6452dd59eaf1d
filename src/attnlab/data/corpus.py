"""Corpora: where documents come from, and which documents are train, valid and test.

`open_corpus(spec)` understands three kinds of `--data` spec:

* `builtin` (the default): CPython's documentation topics and the standard library's docstrings
  (see `builtin.py`), about 2 MB of English that every Python installation carries; no network.
* `hf:<name>[:<config>]`: a Hugging Face dataset, streamed with
  `datasets.load_dataset(name, config, split=..., streaming=True)`; text field "text". The paper's is
  `hf:cerebras/SlimPajama-627B`. `<name>` may also be a local directory of data files, which goes through
  exactly the same code path (that is how the streaming path is tested offline).
* local files: `.txt`, `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.parquet`, a directory of them, a glob, or a
  comma-separated list (see `files.py`), read through `datasets.load_dataset("text"|"json"|"parquet",
  data_files=..., streaming=True)`.

Splits. A Hub dataset's own validation and test splits are used when it has them. Otherwise held-out
documents are chosen by a stable hash of their text (BLAKE2b), so the choice never depends on file order,
machine or seed, and identical copies of a document always land in the same split:

* finite corpora (builtin, local files): documents sorted by hash; the first ones make up `valid` until
  it holds `heldout_bytes(total)` bytes of text (1% of the corpus, but at least 64 KiB, i.e. enough for
  well over 100 sequences of 128 tokens, and at most 5%), the next ones make up `test` likewise, the rest
  is `train`;
* streaming corpora: a document is `valid` if its hash falls in the first 1% of the hash range, `test` if
  in the next 1%, else `train` (decided one document at a time, so it works on an unbounded stream).

Documents are the source's texts verbatim, except that `.txt` paragraphs lose their surrounding newlines;
empty or whitespace-only documents are skipped everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .builtin import builtin_description, builtin_documents
from .files import DataFiles, check_data_files, resolve_data_files
from .hub import hub_revision, hub_unreachable_reason

SPLITS = ("train", "valid", "test")
TEXT_FIELD = "text"
HELDOUT_FRACTION = 0.01
HELDOUT_MIN_BYTES = 64 * 1024
HELDOUT_MAX_FRACTION = 0.05
# Names `datasets` gives a Hub dataset's held-out splits, in order of preference.
_HUB_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "val", "dev"), "test": ("test",)}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def document_key(text: str) -> bytes:
    """The stable hash that decides a document's split."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def heldout_bytes(total_bytes: int) -> float:
    """How many bytes of text each held-out split of a finite corpus gets (see the module docstring)."""
    return max(HELDOUT_FRACTION * total_bytes, min(HELDOUT_MIN_BYTES, HELDOUT_MAX_FRACTION * total_bytes))


def assign_heldout(documents: Iterable[str]) -> dict[bytes, str]:
    """Map the hash of every held-out document of a finite corpus to "valid" or "test" (others are train)."""
    sizes: dict[bytes, int] = {}
    for text in documents:
        key = document_key(text)
        sizes[key] = sizes.get(key, 0) + len(text.encode("utf-8"))
    target = heldout_bytes(sum(sizes.values()))
    assignment, filled = {}, {"valid": 0, "test": 0}
    for key in sorted(sizes):
        split = "valid" if filled["valid"] < target else "test" if filled["test"] < target else None
        if split is None:
            break
        assignment[key] = split
        filled[split] += sizes[key]
    return assignment


def stream_split_of(text: str) -> str:
    """The split of one document of a streaming corpus that has no held-out splits of its own."""
    position = int.from_bytes(document_key(text)[:8], "big") / 2**64
    return "valid" if position < HELDOUT_FRACTION else "test" if position < 2 * HELDOUT_FRACTION else "train"


@contextlib.contextmanager
def no_download_counts():
    """Reading local files, `datasets` still sends a request per `load_dataset` call to count downloads
    (~60 ms when DNS fails, up to 3 s behind a firewall that drops packets). Not for local data."""
    import datasets

    previous = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = previous


def _clean(text: Any) -> str | None:
    return text if isinstance(text, str) and text.strip() else None


class Corpus:
    """A source of documents, split into train, valid and test.

    `documents(split)` yields the split's documents in a fixed order (the source's order). Finite corpora
    are tokenized whole; streaming ones (`hf:`) are unbounded and packed on the fly.
    """

    spec: str
    description: str
    streaming: bool = False
    revision: str | None = None  # the Hub commit read (Hub datasets only)

    def __init__(self, spec: str, description: str):
        self.spec = spec
        self.description = description
        self._token_cache: dict[tuple[str, str], Any] = {}  # (tokenizer fingerprint, split) -> token array

    def documents(self, split: str) -> Iterator[str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}: {self.description})"


class _FiniteCorpus(Corpus):
    """A corpus small enough to be read whole: held-out splits by the hash-ordered fill rule."""

    _heldout: dict[bytes, str] | None = None  # held-out document hashes, computed on first use

    def _all_documents(self) -> Iterator[str]:
        raise NotImplementedError

    def _assignment(self) -> dict[bytes, str]:
        if self._heldout is None:
            self._heldout = assign_heldout(self._all_documents())
        return self._heldout

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        assignment = self._assignment()
        for text in self._all_documents():
            if assignment.get(document_key(text), "train") == split:
                yield text


class BuiltinCorpus(_FiniteCorpus):
    def __init__(self, spec: str = "builtin"):
        builtin_documents()  # extract now, so that errors and the cost come at open time
        super().__init__(spec, builtin_description())

    def _all_documents(self) -> Iterator[str]:
        return iter(builtin_documents())


class LocalFilesCorpus(_FiniteCorpus):
    """Local files, checked at open time and read through `datasets`' streaming builders."""

    def __init__(self, spec: str):
        self.files: DataFiles = check_data_files(resolve_data_files(spec))
        paths = self.files.paths
        where = (
            f"local file {paths[0]}" if len(paths) == 1 else f"{len(paths)} local files ({paths[0]} ... {paths[-1]})"
        )
        if any(builder == "text" for builder, _ in self.files.groups):
            where += "; .txt: one document per blank-line-separated paragraph"
        super().__init__(spec, where)

    def _datasets(self) -> Iterator[tuple[str, list[Path], Any]]:
        import datasets

        for builder, paths in self.files.groups:
            data_files = [str(path) for path in paths]
            if builder == "text":
                options = {"sample_by": "paragraph"}
            elif builder == "json":
                # One declared schema for all files: records may carry different extra fields; only "text" is kept.
                features = {TEXT_FIELD: datasets.Value("string")}
                features.update({name: datasets.Json() for name in sorted(self.files.extra_json_fields)})
                options = {"features": datasets.Features(features)}
            else:
                options = {"columns": [TEXT_FIELD]}
            try:
                with no_download_counts():
                    dataset = datasets.load_dataset(
                        builder, data_files=data_files, split="train", streaming=True, **options
                    )
            except Exception as error:  # noqa: BLE001  (whatever the reader says, the file is the problem)
                raise ValueError(f"cannot read {_describe(paths)}: {_first_line(error)}") from None
            yield builder, paths, dataset.select_columns([TEXT_FIELD])

    def _all_documents(self) -> Iterator[str]:
        for builder, paths, dataset in self._datasets():
            try:
                for example in dataset:
                    text = example[TEXT_FIELD]
                    if isinstance(text, str) and builder == "text":
                        text = text.strip("\n")
                    if _clean(text):
                        yield text
            except Exception as error:  # noqa: BLE001  (the files were checked: what fails now is the data)
                raise ValueError(f"cannot read {_describe(paths)}: {_first_line(error)}") from None


class HubCorpus(Corpus):
    """A Hugging Face dataset (or a local directory `datasets` can read), streamed."""

    streaming = True

    def __init__(self, spec: str, revision: str | None = None):
        self.name, self.config = _parse_hub_spec(spec[len("hf:") :])
        self.revision, self._splits = _load_hub_dataset(self.name, self.config, spec, revision)
        if "train" not in self._splits:
            raise ValueError(f"{spec} has no train split (its splits: {', '.join(self._splits) or 'none'})")
        features = self._splits["train"].features
        if features is not None and TEXT_FIELD not in features:
            raise ValueError(f'{spec} has no "{TEXT_FIELD}" field (its fields: {", ".join(features)})')
        self._own_split = {
            split: next((name for name in _HUB_SPLIT_NAMES[split] if name in self._splits), None) for split in SPLITS
        }
        carved = [split for split in ("valid", "test") if self._own_split[split] is None]
        note = f"; {' and '.join(carved)} carved from train by document hash" if carved else ""
        super().__init__(spec, f"{spec} (streamed{note})")

    def source(self, split: str):
        """The unshuffled `datasets.IterableDataset` that holds `split`'s documents (possibly among others)."""
        check_split(split)
        return self._splits[self._own_split[split] or "train"]

    def belongs(self, text: str, split: str) -> bool:
        """Whether a document read from `source(split)` is in `split`: carved held-out documents leave train."""
        if split != "train":
            return self._own_split[split] is not None or stream_split_of(text) == split
        hashed = stream_split_of(text)
        return hashed == "train" or self._own_split[hashed] is not None

    def text_of(self, example: dict) -> str | None:
        """The example's document text, or None to skip it (missing, empty, whitespace-only)."""
        return _clean(example.get(TEXT_FIELD))

    def documents(self, split: str) -> Iterator[str]:
        for example in self.source(split):
            text = self.text_of(example)
            if text is not None and self.belongs(text, split):
                yield text


def _parse_hub_spec(rest: str) -> tuple[str, str | None]:
    if not rest:
        raise ValueError("hf: needs a dataset name, e.g. hf:cerebras/SlimPajama-627B or hf:/path/to/folder")
    if Path(rest).expanduser().exists() or ":" not in rest:
        return rest, None
    name, config = rest.rsplit(":", 1)
    return name, config or None


def _load_hub_dataset(name: str, config: str | None, spec: str, revision: str | None) -> tuple[str | None, dict]:
    """(the Hub commit read, or None for a local directory; the dataset's splits), pinned to `revision`, or
    else to the commit the name resolves to now (see `hub_revision`)."""
    import datasets

    local = Path(name).expanduser()
    if local.exists():
        name, revision = str(local), None
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"could not load {spec}: no such directory {name}")
    else:
        reason = hub_unreachable_reason()
        if reason is not None:
            raise ValueError(
                f"could not load {spec}: the Hugging Face Hub is unreachable ({reason}); use a local directory "
                f"(hf:/path/to/folder) or local files, or set HF_HUB_OFFLINE=1 to use a cached copy"
            )
        revision = revision or hub_revision(name, "dataset")
    try:
        with no_download_counts() if local.exists() else contextlib.nullcontext():
            return revision, dict(datasets.load_dataset(name, config, revision=revision, streaming=True))
    except datasets.exceptions.DatasetNotFoundError:
        raise ValueError(
            f"could not load {spec}: no such dataset on the Hugging Face Hub (if it is gated or private, "
            f"accept its terms and log in with `hf auth login`)"
        ) from None
    except ConnectionError:
        raise ValueError(
            f"could not load {spec}: the Hugging Face Hub is unreachable; set HF_HUB_OFFLINE=1 to use a cached copy"
        ) from None
    except Exception as error:  # noqa: BLE001  (config errors, bad files, ...: reported in one line)
        raise ValueError(f"could not load {spec}: {_first_line(error)}") from None


def _describe(paths: list[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"one of {len(paths)} files ({paths[0]} ... {paths[-1]})"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def open_corpus(spec: str, revision: str | None = None) -> Corpus:
    """The corpus a `--data` spec names: "builtin", "hf:<name>[:<config>]", or local files (see module doc).
    A Hub dataset is read at commit `revision` (default: the one its name resolves to now, kept as
    `corpus.revision` for the run's record and its resumes).

    Local files are checked completely here (a bad line is reported with its file and line number); a
    Hub dataset's splits and fields are resolved here. Raises ValueError with one actionable line.
    """
    name = spec.strip()
    if name in ("", "builtin"):
        return BuiltinCorpus(spec)
    if name.startswith("hf:"):
        return HubCorpus(name, revision)
    return LocalFilesCorpus(name)
