"""The offline task builders: which paragraphs count as prose, what a lastword and a cloze item are made of,
determinism, and their errors."""

from __future__ import annotations

import pytest

from attnlab.tasks import (
    CLOZE_ENDING_WORDS,
    LASTWORD_MAX_CONTEXT_WORDS,
    MAX_PASSAGE_WORDS,
    cloze_items,
    heldout_documents,
    lastword_items,
    next_word_guesses,
    prose_passages,
    rolling_perplexity_results,
    task_items,
    text_file_items,
    train_next_word_guesses,
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


PARSER = (
    "The parser reads the token stream and builds a tree of nodes for the compiler, which then walks the "
    "tree to emit code. Every node keeps a pointer to its parent so that the compiler can report errors "
    "with the full path of the node."
)


def test_lastword_targets_end_a_sentence_and_need_the_passage():
    [item] = lastword_items([PARSER])  # "code." ends a sentence too, but "code" is not in its context
    assert item["target"] == "node" and item["context"].endswith("full path of the")
    assert item["text"] == item["context"] + " " + item["target"] and item["document"] == 0
    assert PARSER.startswith(item["context"])
    # A target that the previous word alone predicts (a bigram guess) is left out.
    assert lastword_items([PARSER], local_guess={"the": "node"}) == []
    assert len(lastword_items([PARSER], local_guess={"the": "compiler"})) == 1


def test_lastword_context_is_bounded_and_targets_are_words():
    long = " ".join(f"w{i}" for i in range(300)) + " " + PARSER
    [item] = lastword_items([long])
    assert len(item["context"].split(" ")) == LASTWORD_MAX_CONTEXT_WORDS
    short = "Too short: the node. " + " ".join(["x"] * 30) + " and the node?"  # "node?" ends a sentence
    assert [i["target"] for i in lastword_items([short])] == ["node"]
    assert lastword_items(["e.g. " * 30 + "see e.g."]) == []  # not alphabetic


def test_next_word_guesses_take_the_commonest_follower():
    guesses = next_word_guesses(["a b a c a b.", "(c) a"])
    assert guesses == {"a": "b", "b": "a", "c": "a"}
    assert next_word_guesses(["x y x z"])["x"] == "y"  # a tie goes to the pair seen first


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
    documents = list(heldout_documents.__wrapped__())
    guesses = train_next_word_guesses.__wrapped__()
    assert task_items("lastword") == lastword_items(documents, guesses)
    assert task_items("cloze") == cloze_items(documents)
    assert len(task_items("lastword")) >= 80 and len(task_items("cloze")) >= 200
    with pytest.raises(ValueError, match="unknown built-in task"):
        task_items("lastwords")


def test_text_file_items_and_perplexity_counts(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one two  three\nfour é\n", encoding="utf-8")
    [item] = text_file_items(path)
    assert rolling_perplexity_results(item, [-7.0]) == {
        "word_perplexity": (-7.0, 5),
        "byte_perplexity": (-7.0, 23),
        "bits_per_byte": (-7.0, 23),
    }
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        text_file_items(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="cannot read perplexity data"):
        text_file_items(tmp_path / "missing.txt")
