"""Tokenizers: a pretrained one by name or path, or a byte-level BPE trained on the corpus.

* `<name or path>`: anything `transformers.AutoTokenizer.from_pretrained` loads. The paper's is Pythia's
  (`EleutherAI/pythia-160m`, 50K English BPE). A tokenizer without an eos token is rejected (documents
  are separated by eos when packed); a missing pad token is set to eos; truncation and padding saved in
  the tokenizer file are switched off (documents are packed, never cut or padded).
* `bpe:<vocab_size>`: a byte-level BPE (GPT-2 pre-tokenization, 256 byte symbols, no unknown token)
  trained with the `tokenizers` library on the corpus's train split, or on its first ~20 MB of train
  documents for a streaming corpus. `<|endoftext|>` is eos, bos and pad. Training is deterministic.

Both come back as `transformers.PreTrainedTokenizerFast`, which `save_pretrained` and
`AutoTokenizer.from_pretrained` round-trip.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from .corpus import Corpus
from .hub import hub_offline_mode, hub_revision, hub_unreachable_reason

EOS_TOKEN = "<|endoftext|>"
STREAMING_SAMPLE_BYTES = 20_000_000  # how much of a streaming corpus's train split bpe: and statistics read
_BYTE_SYMBOLS = 256


def build_tokenizer(spec: str, corpus: Corpus, revision: str | None = None):
    """The tokenizer a `--tokenizer` spec names (a Hub one at commit `revision`, see `tokenizer_revision`);
    ValueError with one line if it cannot be had."""
    if spec.startswith("bpe:"):
        size = spec[len("bpe:") :]
        if not size.isdigit() or int(size) < _BYTE_SYMBOLS + 1:
            raise ValueError(
                f"tokenizer {spec!r}: bpe:<vocab_size> needs an integer vocab_size of at least {_BYTE_SYMBOLS + 1} "
                f"(256 byte symbols + {EOS_TOKEN})"
            )
        return train_bpe_tokenizer(corpus, int(size))
    return load_pretrained_tokenizer(spec, revision)


def train_documents_sample(corpus: Corpus) -> Iterator[str]:
    """The train documents that bpe: and streaming statistics read: all of a finite corpus's train split,
    or the first STREAMING_SAMPLE_BYTES of a streaming one's (in source order)."""
    documents = corpus.documents("train")
    if not corpus.streaming:
        yield from documents
        return
    read = 0
    for text in documents:
        yield text
        read += len(text.encode("utf-8"))
        if read >= STREAMING_SAMPLE_BYTES:
            return


def train_bpe_tokenizer(corpus: Corpus, vocab_size: int):
    """Train a byte-level BPE of at most `vocab_size` tokens (fewer if the text has too few distinct pairs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a symbol: no unknown tokens
        show_progress=False,
    )
    documents = train_documents_sample(corpus)
    first = next(documents, None)
    if first is None:
        raise ValueError(f"cannot train a bpe tokenizer: the train split of {corpus.spec} has no documents")
    tokenizer.train_from_iterator(itertools.chain([first], documents), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def tokenizer_revision(spec: str) -> str | None:
    """The Hub commit a `--tokenizer` spec names now (None for bpe:, a local folder, or an unknown one)."""
    if spec.startswith("bpe:") or Path(spec).expanduser().exists():
        return None
    return hub_revision(spec, "model")


def load_pretrained_tokenizer(spec: str, revision: str | None = None):
    """AutoTokenizer by Hub name (at commit `revision` if given) or local path, failing fast and plainly when
    the Hub is out of reach."""
    from transformers import AutoTokenizer

    local = Path(spec).expanduser()
    source = str(local) if local.exists() else spec
    options = {} if revision is None or local.exists() else {"revision": revision}
    if not local.exists() and not hub_offline_mode() and hub_unreachable_reason() is not None:
        options["local_files_only"] = True  # the Hub is out of reach, but a cached copy is still fine
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
    except Exception as error:  # noqa: BLE001  (not found, gated, malformed: reported in one line)
        if "local_files_only" in options:
            raise ValueError(
                f"could not load tokenizer {spec!r}: the Hugging Face Hub is unreachable ({hub_unreachable_reason()}) "
                f"and no cached copy exists; give a local tokenizer folder or bpe:<vocab_size>"
            ) from None
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        raise ValueError(f"could not load tokenizer {spec!r}: {reason}") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {spec!r} has no eos token, which separates packed documents; "
            f"set one (tokenizer.eos_token = ...) and save it, or use bpe:<vocab_size>"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # documents are packed, never cut or padded, whatever the saved file says
        backend.no_truncation()
        backend.no_padding()
    return tokenizer


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token, which separates packed documents")
    return int(tokenizer.eos_token_id)


def encode_documents(tokenizer, documents: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens (the packer adds eos itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # The Rust tokenizer directly: parallel, and no max-length warnings for long documents.
        return [encoding.ids for encoding in backend.encode_batch(documents, add_special_tokens=False)]
    # A tokenizer saved with truncation or padding switched on: documents must be neither cut nor padded.
    return tokenizer(documents, add_special_tokens=False, truncation=False, padding=False)["input_ids"]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids (vocabulary, merges, normalizer, pre-tokenizer, added
    tokens, eos), for caching token arrays and checking resumes. Truncation and padding settings, which
    transformers changes on the fly, are left out."""
    digest = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        description = json.loads(backend.to_str())
        description.pop("truncation", None)
        description.pop("padding", None)
        digest.update(json.dumps(description, sort_keys=True).encode("utf-8"))
    else:
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    digest.update(str(tokenizer.eos_token_id).encode())
    return digest.hexdigest()
