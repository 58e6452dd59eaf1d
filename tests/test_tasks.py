"""The offline task builders: which paragraphs count as prose, what a lastword and a cloze item are made of,
determinism, and their errors."""

from __future__ import annotations

import pytest

from attnlab.tasks import (
    CLOZE_ENDING_WORDS,
    MAX_PASSAGE_WORDS,
    cloze_items,
    heldout_documents,
    lastword_items,
    prose_passages,
    rolling_perplexity_results,
    text_file_items,
)


def sentence(topic: str, n: int) -> str:
    return " ".join(f"{topic}{i}" if i % 5 else "the" for i in range(n))


DOCUMENTS = [
    "Title\n*****\n\n" + sentence("alpha", 30) + " ends here.\n\n   code_line = 1\n   more = 2\n\nshort para.",
    sentence("beta", 40) + " (final words)\n\n>>> print(1)\n1\n\n" + sentence("gamma", 200) + " stop!",
    sentence("delta", 25) + "\nwrapped onto a second line, finishing 42.\n\n* a list item " + sentence("x", 30),
    sentence("eps", 50) + " over.",
]


def test_prose_passages_keep_prose_paragraphs_only():
    passages = prose_passages(DOCUMENTS)
    assert [document for document, _ in passages] == [0, 1, 1, 2, 3]
    assert passages[0][1] == sentence("alpha", 30) + " ends here."
    assert passages[2][1].split(" ") == (sentence("gamma", 200) + " stop!").split(" ")[:MAX_PASSAGE_WORDS]
    assert "\n" not in passages[3][1] and passages[3][1].endswith("second line, finishing 42.")


def test_lastword_items_end_on_an_alphabetic_word():
    items = lastword_items(DOCUMENTS)
    by_document = {item["document"]: item for item in items}
    assert by_document[0]["target"] == "here" and by_document[0]["context"].endswith("ends")
    assert by_document[3]["target"] == "over"
    # "finishing 42." ends in a number: the target is the last alphabetic word before it
    assert by_document[2]["target"] == "finishing"
    for item in items:
        assert item["text"] == item["context"] + " " + item["target"]
        assert item["target"].isalpha() and len(item["target"]) >= 2
        assert not item["context"].endswith(" ")


def test_cloze_items_pair_the_true_ending_with_endings_of_other_documents():
    items = cloze_items(DOCUMENTS, seed=7)
    passages = prose_passages(DOCUMENTS)
    assert len(items) == len(passages)
    ending_owner = {" ".join(p.split(" ")[-CLOZE_ENDING_WORDS:]): document for document, p in passages}
    for item, (document, passage) in zip(items, passages, strict=True):
        words = passage.split(" ")
        assert item["context"] == " ".join(words[:-CLOZE_ENDING_WORDS])
        assert item["endings"][item["label"]] == " ".join(words[-CLOZE_ENDING_WORDS:])
        assert len(item["endings"]) == 4
        distractors = [e for i, e in enumerate(item["endings"]) if i != item["label"]]
        assert all(ending_owner[e] != document for e in distractors)
    assert cloze_items(DOCUMENTS, seed=7) == items
    assert cloze_items(DOCUMENTS, seed=8) != items


def test_cloze_labels_are_spread_over_the_positions():
    documents = [sentence(f"topic{d}x", 30) + "." for d in range(200)]
    labels = [item["label"] for item in cloze_items(documents)]
    assert all(30 <= labels.count(position) <= 70 for position in range(4))


def test_cloze_needs_two_documents():
    with pytest.raises(ValueError, match="at least two documents"):
        cloze_items([sentence("only", 40)])


def test_builtin_tasks_are_deterministic_and_large_enough():
    documents = list(heldout_documents())
    assert lastword_items(documents) == lastword_items(list(heldout_documents.__wrapped__()))
    assert len(lastword_items(documents)) >= 200 and len(cloze_items(documents)) >= 200


def test_text_file_items_and_perplexity_counts(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one two  three\nfour é\n", encoding="utf-8")
    [item] = text_file_items(path)
    assert rolling_perplexity_results(item, [-7.0]) == {
        "word_perplexity": (-7.0, 5), "byte_perplexity": (-7.0, 23), "bits_per_byte": (-7.0, 23),
    }
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        text_file_items(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="cannot read perplexity data"):
        text_file_items(tmp_path / "missing.txt")
