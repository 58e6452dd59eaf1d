"""Training batches: packed fixed-length sequences, shuffled by seed, split across ranks, resumable.

Finite corpora (builtin, local files) — `PackedTrainStream`:
    The train split's token stream is cut into N = len // seq_len sequences (remainder dropped). Epoch e
    visits them in the permutation `numpy.random.default_rng([seed, e]).permutation(N)`. One global cursor
    counts sequences consumed by all ranks together: on rank r of W, `next_batch(b)` returns permuted
    sequences [cursor + r·b, cursor + (r+1)·b) and every rank advances the cursor by W·b, wrapping into the
    next epoch's permutation. So W ranks calling `next_batch(b)` in step see exactly the sequences one
    process calling `next_batch(W·b)` sees, in the same order: no overlap, no gap. The state is that one
    cursor (the same on every rank), so rank 0's `state_dict()` resumes every rank, at any world size.
    With `shifted_windows`, epoch e cuts the stream at its own offset o_e ∈ [0, seq_len) drawn from
    `default_rng([seed, e, 1])` (epoch 0: o = 0) into N = (len − seq_len + 1) // seq_len windows, so the
    sequences of later epochs are not the same token windows again (a small corpus is seen many times).

Streaming corpora (`hf:`) — `StreamingTrainStream`:
    `datasets` streams the train split with its shard order shuffled by (seed, pass) and splits it across
    ranks (`datasets.distributed.split_dataset_by_node`: whole shards per rank when they divide evenly or
    number at least 8 per rank, else every W-th document). Documents are then shuffled with a seeded
    buffer, tokenized, eos-joined and packed on the fly. We keep that buffer ourselves rather than use
    `IterableDataset.shuffle`'s, because `datasets` cannot checkpoint the contents of its shuffle buffer
    (its state_dict drops them); ours goes into `state_dict()` together with the source position
    (`IterableDataset.state_dict()`), the number of draws so far and the leftover tokens, so a resume is
    exact. Each rank has its own state: save them all. The token stream does not depend on how it is cut
    into batches. `epoch` counts this rank's completed passes over its share of the source.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from numbers import Integral

import numpy as np
import torch

from .corpus import Corpus
from .packing import pack_documents, split_tokens, token_dtype
from .tokenizer import tokenizer_fingerprint

DEFAULT_SHUFFLE_BUFFER = 1000  # documents; a streaming rank holds this many documents in memory and state
_BYTES_PER_TOKEN_GUESS = 4  # only decides how many documents are tokenized at a time, never the output


class TrainStream:
    """Micro-batches of packed training sequences for one rank (see the module docstring)."""

    seq_len: int
    tokens_per_epoch: int | None

    @property
    def epoch(self) -> int:
        """Completed passes over the training data."""
        raise NotImplementedError

    def next_batch(self, batch_size: int) -> torch.LongTensor:
        """This rank's next `batch_size` sequences: int64 [batch_size, seq_len]."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """A JSON-serialisable position from which `load_state_dict` continues exactly."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_same(state: dict, expected: dict) -> None:
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(
                f"cannot resume the data stream: the checkpoint has {key}={state.get(key)!r} but this run has "
                f"{value!r}; resume with the same data, tokenizer, seq_len and seed"
            )


class PackedTrainStream(TrainStream):
    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        source: str = "",
        shifted_windows: bool = False,
    ):
        self.shifted_windows = shifted_windows and len(tokens) >= 2 * seq_len - 1  # else one window: no shift
        self.num_sequences = (len(tokens) - (seq_len - 1 if self.shifted_windows else 0)) // seq_len
        if self.num_sequences == 0:
            raise ValueError(
                f"the train split of {source or 'the corpus'} has only {len(tokens)} tokens, fewer than one "
                f"sequence of seq_len={seq_len}; use more data or a shorter --seq-len"
            )
        self.tokens = tokens
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.tokens_per_epoch = self.num_sequences * seq_len
        self.cursor = 0  # sequences consumed by all ranks together
        self._permutations: dict[int, np.ndarray] = {}
        self._fingerprint: str | None = None

    @property
    def epoch(self) -> int:
        return self.cursor // self.num_sequences

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the sequences."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # keep the current and the next epoch only
                del self._permutations[min(self._permutations)]
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
        return self._permutations[epoch]

    def window_offset(self, epoch: int) -> int:
        """Where epoch `epoch` starts cutting the token stream into windows (0 unless `shifted_windows`)."""
        if not self.shifted_windows or epoch == 0:
            return 0
        return int(np.random.default_rng([self.seed, epoch, 1]).integers(self.seq_len))

    def next_batch(self, batch_size: int) -> torch.LongTensor:
        _check_batch_size(batch_size)
        positions = self.cursor + self.rank * batch_size + np.arange(batch_size)
        epochs, offsets = np.divmod(positions, self.num_sequences)
        starts = np.empty(batch_size, dtype=np.int64)  # token positions of the windows
        for epoch in np.unique(epochs):  # a batch may straddle an epoch boundary (or several, if N is tiny)
            here = epochs == epoch
            starts[here] = self.window_offset(int(epoch)) + self.permutation(int(epoch))[offsets[here]] * self.seq_len
        self.cursor += self.world_size * batch_size
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len)]  # [batch, seq_len]
        return torch.from_numpy(windows.astype(np.int64))

    def _tokens_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = hashlib.blake2b(
                np.ascontiguousarray(self.tokens[: self.num_sequences * self.seq_len]).tobytes(), digest_size=8
            ).hexdigest()
        return self._fingerprint

    def _identity(self) -> dict:
        return {
            "kind": "packed",
            "seq_len": self.seq_len,
            "seed": self.seed,
            "num_sequences": self.num_sequences,
            "tokens": self._tokens_fingerprint(),
            "shifted_windows": self.shifted_windows,
        }

    def state_dict(self) -> dict:
        return {**self._identity(), "cursor": self.cursor, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        _check_same({"shifted_windows": False, **state}, self._identity())  # states from before the option: False
        self.cursor = int(state["cursor"])


@contextlib.contextmanager
def _quiet_shuffle_buffer_warning():
    """On resume `datasets` warns that shuffle-buffer contents are lost; ours holds at most one document
    (buffer_size=1), which is never in it between two examples, so nothing is lost and the warning is noise."""
    logger = logging.getLogger("datasets.iterable_dataset")

    def keep(record: logging.LogRecord) -> bool:
        return "shuffle buffer" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _draw(seed: int, rank: int, draw: int, size: int) -> int:
    """A uniform index in [0, size) from a counter-based hash: reproducible from three integers."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % size


class StreamingTrainStream(TrainStream):
    tokens_per_epoch = None

    def __init__(
        self,
        corpus: Corpus,
        tokenizer,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ):
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.corpus, self.tokenizer = corpus, tokenizer
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self._tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self._start(epoch=0, source_state=None)
        self._buffer: list[str] = []
        self._draws = 0
        self._tokens = np.zeros(0, dtype=token_dtype(tokenizer))

    def _start(self, epoch: int, source_state: dict | None) -> None:
        from datasets.distributed import split_dataset_by_node

        # buffer_size=1: datasets shuffles (and interleaves) the shard order only; documents are shuffled
        # by our own, checkpointable buffer.
        source = self.corpus.source("train").shuffle(seed=self.seed, buffer_size=1)
        # Whole shards per rank when they divide evenly or are many (SlimPajama's 59166 files over 8 ranks:
        # with "examples" every rank would download and parse all the data to keep an eighth of it). With
        # few, unevenly dividing shards, every W-th document instead, so that ranks get equal shares.
        shards = source.num_shards
        strategy = "shards" if shards % self.world_size == 0 or shards >= 8 * self.world_size else "examples"
        self._source = split_dataset_by_node(source, rank=self.rank, world_size=self.world_size, strategy=strategy)
        self._epoch = epoch
        self._source.set_epoch(epoch)
        if source_state is not None:
            self._source.load_state_dict(source_state)
        self._iterator = None
        self._documents_this_pass = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def _read_document(self) -> str:
        """The next train document of this rank's shard of the source, starting a new pass at its end."""
        while True:
            starting = self._iterator is None
            if starting:
                self._source.set_epoch(self._epoch)
                self._iterator = iter(self._source)
            try:
                if starting:
                    with _quiet_shuffle_buffer_warning():
                        example = next(self._iterator)
                else:
                    example = next(self._iterator)
            except StopIteration:
                if self._documents_this_pass == 0:
                    raise ValueError(
                        f"rank {self.rank} of {self.world_size} got no train documents from {self.corpus.spec}"
                        + (" (fewer documents than ranks?)" if self.world_size > 1 else "")
                    ) from None
                self._epoch += 1
                self._iterator = None
                self._documents_this_pass = 0
                continue
            text = self.corpus.text_of(example)
            if text is not None and self.corpus.belongs(text, "train"):
                self._documents_this_pass += 1
                return text

    def _next_document(self) -> str:
        """A document drawn uniformly from the shuffle buffer, which is refilled from the source first."""
        while len(self._buffer) < self.shuffle_buffer:
            self._buffer.append(self._read_document())
        index = _draw(self.seed, self.rank, self._draws, len(self._buffer))
        self._draws += 1
        self._buffer[index], self._buffer[-1] = self._buffer[-1], self._buffer[index]
        return self._buffer.pop()

    def next_batch(self, batch_size: int) -> torch.LongTensor:
        _check_batch_size(batch_size)
        needed = batch_size * self.seq_len
        while len(self._tokens) < needed:
            documents, size = [], 0
            while size < (needed - len(self._tokens)) * _BYTES_PER_TOKEN_GUESS:
                documents.append(self._next_document())
                size += len(documents[-1])
            self._tokens = np.concatenate([self._tokens, pack_documents(self.tokenizer, documents)])
        batch, self._tokens = self._tokens[:needed], self._tokens[needed:].copy()
        return torch.from_numpy(batch.astype(np.int64)).view(batch_size, self.seq_len)

    def _identity(self) -> dict:
        return {
            "kind": "streaming",
            "data": self.corpus.spec,
            "tokenizer": self._tokenizer_fingerprint,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict:
        return {
            **self._identity(),
            "epoch": self._epoch,
            "documents_this_pass": self._documents_this_pass,
            "source": self._source.state_dict() if self._iterator is not None else None,
            "draws": self._draws,
            "buffer": list(self._buffer),
            "tokens": self._tokens.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_same(state, self._identity())
        self._start(epoch=int(state["epoch"]), source_state=state["source"])
        self._documents_this_pass = int(state["documents_this_pass"])
        self._draws = int(state["draws"])
        self._buffer = list(state["buffer"])
        self._tokens = np.asarray(state["tokens"], dtype=token_dtype(self.tokenizer))


def make_train_stream(
    corpus: Corpus,
    tokenizer,
    seq_len: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    shifted_windows: bool = False,
) -> TrainStream:
    """This rank's stream of training batches (see the module docstring for the exact semantics).

    `shuffle_buffer` (documents) applies to streaming corpora only, `shifted_windows` to finite ones.
    """
    if not isinstance(seq_len, Integral) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(world_size, Integral) and isinstance(rank, Integral) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    seq_len, seed, rank, world_size = int(seq_len), int(seed), int(rank), int(world_size)
    if corpus.streaming:
        return StreamingTrainStream(corpus, tokenizer, seq_len, seed, rank, world_size, shuffle_buffer)
    tokens = split_tokens(corpus, tokenizer, "train")
    return PackedTrainStream(tokens, seq_len, seed, rank, world_size, corpus.spec, shifted_windows)
