"""Offline evaluation tasks built from held-out text, shipped as ordinary lm-evaluation-harness task YAMLs.

The YAML files next to this module (`lastword.yaml`, `cloze.yaml`, `heldout.yaml`, `textfile.yaml`) are
plain harness tasks; their documents come from a `custom_dataset` hook (`hooks.py`) that calls the
builders below on the held-out splits (`valid`, then `test`) of a corpus (the built-in one unless the harness metadata
names another, key `corpus`). Every builder is a pure, deterministic function of the documents and a seed.

* `lastword` (LAMBADA-style): a prose passage whose final word must be predicted, kept only when the
  word occurs earlier in the passage and is not what the previous word predicts (see `lastword_items`);
  the harness scores the log-likelihood of " <word>" after the passage (acc = the word is the greedy
  continuation; perplexity of the word).
* `cloze` (HellaSwag-style): a passage and four candidate continuations, the true one and three drawn
  from passages of other documents; acc and acc_norm.
* `heldout`: rolling log-likelihood of every held-out document; word and byte perplexity, bits per byte.
* `textfile`: the same, for one text file (metadata key `path`); `attnlab eval --ppl-contexts` uses it.
"""

from __future__ import annotations

import collections
import functools
import itertools
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

TASKS_DIR = Path(__file__).parent
BUILTIN_TASKS = ("lastword", "cloze", "heldout")
HELDOUT_SPLITS = ("valid", "test")  # never trained on (`valid` only gives the trainer its held-out loss)
SEED = 1234

# A passage is a paragraph of prose: at least this many words, and no line that looks like code.
MIN_PASSAGE_WORDS = 24
MAX_PASSAGE_WORDS = 120  # keep the left end, so that a passage fits a 256-token context
CLOZE_ENDING_WORDS = 10
CLOZE_CHOICES = 4
_TRAILING_PUNCTUATION = ".,;:!?)]}\"'”’»…"
_CLOSING = ")]}\"'”’»"
_OPENING = "([{\"'“‘«*`"
LASTWORD_MIN_CONTEXT_WORDS = 20
LASTWORD_MAX_CONTEXT_WORDS = 100
TRAIN_DOCUMENTS_FOR_GUESSES = 20000  # bounded, for streaming corpora
_CODE_LINE = re.compile(r"^\s{2,}|::=|>>>|[{}]|^\s*[-*+] |^\s*\d+\. |^[=*~^-]{3,}\s*$")


def prose_passages(documents: list[str], max_words: int | None = MAX_PASSAGE_WORDS) -> list[tuple[int, str]]:
    """(document index, passage) for every prose paragraph of the documents, in order.

    A paragraph is a block separated by blank lines; it is prose when none of its lines looks like code,
    a grammar rule, a list item or a heading underline, and it has at least `MIN_PASSAGE_WORDS` words.
    Its lines are joined with single spaces, and its first `max_words` words kept (None: all).
    """
    passages = []
    for index, document in enumerate(documents):
        for block in re.split(r"\n\s*\n", document):
            lines = block.strip("\n").split("\n")
            if any(_CODE_LINE.search(line) for line in lines):
                continue
            words = block.split()
            if len(words) >= MIN_PASSAGE_WORDS:
                passages.append((index, " ".join(words[:max_words])))
    return passages


def lastword_items(documents: list[str], local_guess: Mapping[str, str] | None = None) -> list[dict]:
    """LAMBADA-style items {"text", "context", "target", "document"}: the word that ends a sentence of a
    prose paragraph, to be predicted from the paragraph's text before it (at most `LASTWORD_MAX_CONTEXT_WORDS`
    words, at least `LASTWORD_MIN_CONTEXT_WORDS`).

    A target is alphabetic, at least three letters, its sentence-final punctuation dropped. LAMBADA keeps
    the passages whose last word needs the broad context; here an item is kept only when
    (1) its target already occurs in the context, so the passage carries it, and
    (2) it is not `local_guess[previous word]` (the word that most often follows the previous word in the
    training text, see `next_word_guesses`), so a model that sees only the previous token cannot get it.
    `text` = context + " " + target, as LAMBADA's `text` field.
    """
    local_guess = local_guess or {}
    items = []
    for document, passage in prose_passages(documents, max_words=None):
        words = passage.split(" ")
        for end in range(LASTWORD_MIN_CONTEXT_WORDS, len(words)):
            target = _strip(words[end])
            if not (words[end].rstrip(_CLOSING).endswith((".", "!", "?")) and _is_target_word(target)):
                continue
            context_words = words[max(0, end - LASTWORD_MAX_CONTEXT_WORDS) : end]
            if target not in {_strip(word) for word in context_words}:
                continue
            if local_guess.get(_strip(context_words[-1])) == target:
                continue
            context = " ".join(context_words)
            items.append({"text": f"{context} {target}", "context": context, "target": target, "document": document})
    return items


def next_word_guesses(documents: Iterable[str]) -> dict[str, str]:
    """For every word, the word that most often follows it in `documents` (words split on white space,
    surrounding punctuation stripped; ties go to the pair seen first): what a bigram model would guess."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for document in documents:
        words = [_strip(word) for word in document.split()]
        for previous, word in zip(words, words[1:]):
            counts[previous][word] += 1
    return {previous: followers.most_common(1)[0][0] for previous, followers in counts.items()}


def _strip(word: str) -> str:
    return word.strip(_TRAILING_PUNCTUATION + _OPENING)


def _is_target_word(word: str) -> bool:
    return len(word) >= 3 and word.isascii() and word.isalpha()


def cloze_items(documents: list[str], seed: int = SEED) -> list[dict]:
    """HellaSwag-style items {"context", "endings", "label", "document"} from the documents' passages.

    Each passage is split into a context and its last `CLOZE_ENDING_WORDS` words (the true ending). The
    three distractors are the true endings of passages from *other* documents, drawn with
    `random.Random(seed)`; the true ending's position is drawn from the same generator. Needs passages
    from at least two documents.
    """
    split = []  # (document, context words, ending words)
    for document, passage in prose_passages(documents):
        words = passage.split(" ")
        split.append((document, words[:-CLOZE_ENDING_WORDS], words[-CLOZE_ENDING_WORDS:]))
    if len({document for document, _, _ in split}) < 2:
        raise ValueError("the cloze task needs prose passages from at least two documents")
    rng = random.Random(seed)
    items = []
    for document, context, ending in split:
        others = [j for j, (other, _, _) in enumerate(split) if other != document]
        distractors = [" ".join(split[j][2]) for j in rng.sample(others, min(CLOZE_CHOICES - 1, len(others)))]
        label = rng.randrange(len(distractors) + 1)
        endings = distractors[:label] + [" ".join(ending)] + distractors[label:]
        items.append({"context": " ".join(context), "endings": endings, "label": label, "document": document})
    return items


def heldout_items(documents: list[str]) -> list[dict]:
    """One rolling-perplexity item {"text"} per held-out document."""
    return [{"text": document} for document in documents]


def text_file_items(path: str | Path) -> list[dict]:
    """The whole file as one rolling-perplexity document (UTF-8)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read perplexity data {path}: {error}") from None
    if not text.strip():
        raise ValueError(f"perplexity data {path} is empty")
    return [{"text": text}]


@functools.lru_cache(maxsize=4)
def heldout_documents(corpus: str = "builtin", max_documents: int = 2000) -> tuple[str, ...]:
    """The first `max_documents` held-out documents of a corpus (`attnlab.data.open_corpus` spec)."""
    from ..data import open_corpus

    source = open_corpus(corpus)
    splits = (source.documents(split) for split in HELDOUT_SPLITS)
    documents = list(itertools.islice(itertools.chain.from_iterable(splits), max_documents))
    if not documents:
        raise ValueError(f"corpus {corpus!r} has no held-out documents to build tasks from")
    return tuple(documents)


@functools.lru_cache(maxsize=4)
def train_next_word_guesses(corpus: str = "builtin") -> dict[str, str]:
    """`next_word_guesses` over (the first `TRAIN_DOCUMENTS_FOR_GUESSES` documents of) the corpus's train split."""
    from ..data import open_corpus

    return next_word_guesses(itertools.islice(open_corpus(corpus).documents("train"), TRAIN_DOCUMENTS_FOR_GUESSES))


def task_items(task: str, corpus: str = "builtin") -> list[dict]:
    """The documents of a built-in task (`BUILTIN_TASKS`) for a corpus, as the harness sees them."""
    documents = list(heldout_documents(corpus))
    if task == "lastword":
        return lastword_items(documents, train_next_word_guesses(corpus))
    if task == "cloze":
        return cloze_items(documents)
    if task == "heldout":
        return heldout_items(documents)
    raise ValueError(f"unknown built-in task {task!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")


def rolling_perplexity_results(doc: dict, results: list) -> dict:
    """The harness's `process_results` for rolling log-likelihood tasks: word/byte counts of the text."""
    (loglikelihood,) = results
    text = doc["text"]
    words = len(text.split())
    num_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, num_bytes),
        "bits_per_byte": (loglikelihood, num_bytes),
    }
