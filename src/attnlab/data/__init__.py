"""The data layer: corpora, tokenizers, packing into fixed-length sequences, and resumable train streams.

    corpus = open_corpus("builtin")                # or "hf:cerebras/SlimPajama-627B", "data/*.jsonl", ...
    tokenizer = build_tokenizer("bpe:4096", corpus)  # or "EleutherAI/pythia-160m", a local folder
    stream = make_train_stream(corpus, tokenizer, seq_len=128, seed=0, rank=rank, world_size=world_size)
    batch = stream.next_batch(8)                   # int64 [8, 128]; stream.state_dict() goes in checkpoints
    heldout = heldout_sequences(corpus, tokenizer, seq_len=128, max_sequences=100)

Modules: `corpus` (specs, sources, splits), `builtin` (the offline corpus), `files` (local files and their
checks), `tokenizer`, `packing` (eos-joined token streams, held-out sequences, statistics), `stream`
(train batches across ranks, exact resume). All bad input raises ValueError with one actionable line.
"""

from .corpus import SPLITS, Corpus, open_corpus
from .packing import first_tokens, heldout_sequences, split_tokens, unigram_entropy
from .stream import PackedTrainStream, StreamingTrainStream, TrainStream, make_train_stream
from .tokenizer import EOS_TOKEN, build_tokenizer, tokenizer_revision

__all__ = [
    "EOS_TOKEN",
    "SPLITS",
    "Corpus",
    "PackedTrainStream",
    "StreamingTrainStream",
    "TrainStream",
    "build_tokenizer",
    "first_tokens",
    "heldout_sequences",
    "make_train_stream",
    "open_corpus",
    "split_tokens",
    "tokenizer_revision",
    "unigram_entropy",
]
