"""Prompt and metric helpers that the task YAMLs in this folder name with `!function helpers.<name>`.

Each reproduces, in behaviour, the helper that lm-evaluation-harness 0.4.13 ships for the same task
(`super_glue/copa/utils.py`, `hellaswag/utils.py`, `wikitext/preprocess_wikitext.py`), so that a model
sees the same prompts and the results carry the same numbers. `tests/test_paper_tasks.py` checks them
against the harness's own on every local document it samples.
"""

from __future__ import annotations

import re

import datasets

# --- COPA (SuperGLUE): "<premise without its final stop> because|therefore" + " <choice, first letter lowered>"

_COPA_CONNECTIVES = {"cause": "because", "effect": "therefore"}


def _lower_first_letter(text: str) -> str:
    return text[:1].lower() + text[1:]


def copa_doc_to_text(doc: dict) -> str:
    """The premise loses its last character (the full stop) and gains the connective of the question."""
    return doc["premise"].strip()[:-1] + " " + _COPA_CONNECTIVES[doc["question"]]


def copa_doc_to_choice(doc: dict) -> list[str]:
    """Both alternatives as continuations of the premise; they carry their own leading space (and the
    harness adds its target delimiter " " in front, so the scored text starts with two spaces)."""
    return [" " + _lower_first_letter(doc["choice1"]), " " + _lower_first_letter(doc["choice2"])]


def copa_doc_to_target(doc: dict) -> str:
    """The correct alternative, as the text of its choice."""
    return copa_doc_to_choice(doc)[doc["label"]]


# --- HellaSwag: "<activity>: <ctx_a> <Ctx_b>" with the WikiHow markup ([header], [title], [step], ...) removed


def hellaswag_clean(text: str) -> str:
    """Strip surrounding space, turn " [title]" into a sentence break, drop every other [...] tag, then
    halve runs of spaces once (a single replace pass, so three spaces become two, as in the harness)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_fields(doc: dict) -> dict:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": hellaswag_clean(doc["activity_label"] + ": " + context),
        "choices": [hellaswag_clean(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Add `query`, `choices` and `gold` to every HellaSwag document (the columns the YAML renders)."""
    return dataset.map(_hellaswag_fields)


# --- WikiText: undo WikiText's tokenization (" @-@ ", " , ", "= = Heading = =", ...) before scoring

# Applied in order; each is (pattern is a regular expression, pattern, replacement).
_WIKITEXT_DETOKENIZE_STEPS: tuple[tuple[bool, str, str], ...] = (
    (False, "s '", "s'"),  # plural possessive
    # Matches only the literal text "/' <digit>/" (the harness's rule, kept so that scores agree).
    (True, r"/' [0-9]/", "/'[0-9]/"),
    (False, " @-@ ", "-"),  # number and compound separators
    (False, " @,@ ", ","),
    (False, " @.@ ", "."),
    (False, " : ", ": "),  # punctuation loses the space before it
    (False, " ; ", "; "),
    (False, " . ", ". "),
    (False, " ! ", "! "),
    (False, " ? ", "? "),
    (False, " , ", ", "),
    (True, r"\(\s*([^\)]*?)\s*\)", r"(\1)"),  # brackets and quotes lose the spaces inside them
    (True, r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (True, r"{\s*([^}]*?)\s*}", r"{\1}"),
    (True, r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    (True, r"'\s*([^']*?)\s*'", r"'\1'"),
    (False, "= = = =", "===="),  # section heading markers
    (False, "= = =", "==="),
    (False, "= =", "=="),
    (False, " \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (False, " \n", "\n"),  # no space at either end of a line
    (False, "\n ", "\n"),
    (False, " N ", " 1 "),
    (False, " 's", "'s"),
)


def wikitext_detokenizer(doc: dict) -> str:
    """The article text the model scores: `doc["page"]` with WikiText's tokenization undone."""
    text = doc["page"]
    for is_regex, pattern, replacement in _WIKITEXT_DETOKENIZE_STEPS:
        text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
    return text


def wikitext_process_results(doc: dict, results: list) -> dict:
    """Rolling log-likelihood of the article, paired with the word and byte counts that the word/byte
    perplexity and bits-per-byte aggregations divide by. Both counts are of the page *before*
    detokenization (words: pieces of a split at whitespace runs), as in the harness."""
    (loglikelihood,) = results
    word_count = len(re.split(r"\s+", doc["page"]))
    byte_count = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, word_count),
        "byte_perplexity": (loglikelihood, byte_count),
        "bits_per_byte": (loglikelihood, byte_count),
    }
