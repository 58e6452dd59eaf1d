"""From documents to token streams: tokenize, append eos to every document, concatenate.

The token stream of a split is `doc_1 eos doc_2 eos ...` in the split's document order, with no bos and
no padding. Fixed-length sequences are consecutive `seq_len`-token slices of it (the remainder is dropped),
so a sequence may start in the middle of a document and span several documents.

A finite corpus's split is tokenized once per (tokenizer, split) and kept on the `Corpus` object.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .corpus import Corpus, check_split
from .tokenizer import STREAMING_SAMPLE_BYTES, encode_documents, eos_id, tokenizer_fingerprint

_ENCODE_BATCH_BYTES = 4 << 20  # documents are encoded in batches of about this much text (parallel in Rust)


def token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.int32) if len(tokenizer) < 2**31 else np.dtype(np.int64)


def pack_documents(tokenizer, documents: list[str]) -> np.ndarray:
    """`doc eos doc eos ...` for a list of documents, as one flat array."""
    end = eos_id(tokenizer)
    flat: list[int] = []
    for ids in encode_documents(tokenizer, documents):
        flat.extend(ids)
        flat.append(end)
    return np.asarray(flat, dtype=token_dtype(tokenizer))


def token_chunks(tokenizer, documents: Iterable[str]) -> Iterator[np.ndarray]:
    """The token stream of `documents`, in consecutive chunks of a few MB of text each."""
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= _ENCODE_BATCH_BYTES:
            yield pack_documents(tokenizer, batch)
            batch, size = [], 0
    if batch:
        yield pack_documents(tokenizer, batch)


def split_tokens(corpus: Corpus, tokenizer, split: str) -> np.ndarray:
    """The whole token stream of a finite corpus's split (cached on the corpus for this tokenizer)."""
    check_split(split)
    if corpus.streaming:
        raise ValueError(f"{corpus.spec} is a streaming corpus: it has no finite token array")
    key = (tokenizer_fingerprint(tokenizer), split)
    if key not in corpus._token_cache:
        chunks = list(token_chunks(tokenizer, corpus.documents(split)))
        if not chunks:
            raise ValueError(
                f"the {split} split of {corpus.spec} has no documents; the corpus is too small to split "
                f"(valid and test take at least one document each)"
            )
        corpus._token_cache[key] = np.concatenate(chunks)
    return corpus._token_cache[key]


def leading_tokens(corpus: Corpus, tokenizer, split: str, count: int) -> np.ndarray:
    """The first `count` tokens of a split's stream (fewer if the split is shorter), reading no further
    than needed unless the split is already cached."""
    check_split(split)
    if not corpus.streaming:
        cached = corpus._token_cache.get((tokenizer_fingerprint(tokenizer), split))
        if cached is not None:
            return cached[:count]
    chunks, have = [], 0
    for chunk in token_chunks(tokenizer, corpus.documents(split)):
        chunks.append(chunk)
        have += len(chunk)
        if have >= count:
            break
    if not chunks:
        raise ValueError(f"the {split} split of {corpus.spec} has no documents")
    return np.concatenate(chunks)[:count]


def first_tokens(corpus: Corpus, tokenizer, n: int) -> list[int]:
    """The first `n` tokens of the train split's unshuffled eos-joined stream (fixedseqqk's fixed sequence)."""
    if n < 1:
        raise ValueError(f"first_tokens needs n >= 1, got {n}")
    tokens = leading_tokens(corpus, tokenizer, "train", n)
    if len(tokens) < n:
        raise ValueError(f"the train split of {corpus.spec} has only {len(tokens)} tokens; {n} are needed")
    return tokens.tolist()


def heldout_sequences(
    corpus: Corpus, tokenizer, seq_len: int, max_sequences: int, split: str = "valid"
) -> torch.LongTensor:
    """The first min(max_sequences, available) packed sequences of `split`: int64 [n, seq_len], deterministic."""
    if seq_len < 1 or max_sequences < 1:
        raise ValueError(f"heldout_sequences needs seq_len >= 1 and max_sequences >= 1, got {seq_len}, {max_sequences}")
    tokens = leading_tokens(corpus, tokenizer, split, seq_len * max_sequences)
    count = len(tokens) // seq_len
    if count == 0:
        raise ValueError(
            f"the {split} split of {corpus.spec} has only {len(tokens)} tokens, fewer than one sequence of "
            f"seq_len={seq_len}; use more data or a shorter --seq-len"
        )
    return torch.from_numpy(tokens[: count * seq_len].astype(np.int64)).view(count, seq_len)


def unigram_entropy(corpus: Corpus, tokenizer, split: str = "train") -> float:
    """Entropy in nats per token of the split's token unigram distribution (eos included).

    A model that predicts every token from its marginal frequency alone reaches this loss; a language
    model's held-out loss should be well below it. Streaming corpora: estimated on the split's first
    ~20 MB of documents.
    """
    check_split(split)
    if corpus.streaming:
        documents, read = [], 0
        for text in corpus.documents(split):
            documents.append(text)
            read += len(text.encode("utf-8"))
            if read >= STREAMING_SAMPLE_BYTES:
                break
        tokens = np.concatenate(list(token_chunks(tokenizer, documents)) or [np.zeros(0, dtype=np.int64)])
    else:
        tokens = split_tokens(corpus, tokenizer, split)
    if len(tokens) == 0:
        raise ValueError(f"the {split} split of {corpus.spec} has no tokens")
    counts = np.bincount(tokens.astype(np.int64))
    probabilities = counts[counts > 0] / len(tokens)
    return float(-(probabilities * np.log(probabilities)).sum())
