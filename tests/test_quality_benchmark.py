"""benchmarks/quality_per_minute.py: the held-out split keeps documents whole and contiguous, and bits per byte
is the total NLL over the documents' UTF-8 bytes (the script itself is run by hand; see its docstring)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from attnlab.data import build_tokenizer, open_corpus

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_per_minute.py"
spec = importlib.util.spec_from_file_location("quality_per_minute", SCRIPT)
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def stories(count: int) -> list[str]:
    """Stories of 1–3 paragraphs of different lengths; each story's first paragraph opens with the marker."""
    paragraphs = []
    for story in range(count):
        paragraphs.append(f"Once upon a time there was story {story}." + " more" * (story % 7))
        paragraphs += [f"Paragraph {part} of story {story}. ünï" * (1 + part) for part in range(story % 3)]
    return paragraphs


@pytest.mark.parametrize("story_start", ["Once upon a time", None])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3])
def test_the_heldout_tail_is_contiguous_and_starts_a_story(story_start, fraction):
    documents = stories(60)
    train, heldout = quality.split_tail(documents, fraction, story_start)
    assert train + heldout == documents  # whole documents, in order, one cut
    if story_start:
        assert heldout[0].startswith(story_start)  # the paragraphs of one story are on one side
    sizes = [len(text.encode("utf-8")) for text in documents]
    total, cut = sum(sizes), len(train)
    assert sum(sizes[:cut]) >= (1 - fraction) * total  # at most the asked fraction is held out ...
    earlier = [i for i in range(cut) if sum(sizes[:i]) >= (1 - fraction) * total]
    if story_start:
        earlier = [i for i in earlier if documents[i].startswith(story_start)]
    assert not earlier  # ... and the cut is the first allowed one


def test_no_split_point_is_one_line():
    with pytest.raises(SystemExit, match="no split point"):
        quality.split_tail(["Once upon a time a.", "b"], 0.4, "Once upon a time")


def test_bits_per_byte_is_the_documents_nll_over_their_bytes(tmp_path):
    """Documents shorter than one window: each is scored as `eos doc` in full context; longer ones are cut into
    windows that overlap by one token, so every token is predicted exactly once (the count checks it)."""
    documents = ["A short one.", "Another, a little longer, with ünïcödé.", "x" * 300]
    corpus_file = tmp_path / "docs.jsonl"
    corpus_file.write_text("".join(f'{{"text": "{text}"}}\n' for text in documents))
    tokenizer = build_tokenizer("bpe:300", open_corpus(str(corpus_file)))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    ).eval()
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    nll, count = 0.0, 0
    for text in documents:
        ids = torch.tensor([[eos, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    long_tokens = len(tokenizer(documents[2], add_special_tokens=False)["input_ids"])
    seq_len = long_tokens + 1  # every document in one window
    result = quality.bits_per_byte(model, tokenizer, documents, seq_len, batch_size=2)
    total_bytes = sum(len(text.encode("utf-8")) for text in documents)
    assert result["tokens"] == count
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / total_bytes, rel=1e-5)
    windowed = quality.bits_per_byte(model, tokenizer, documents, 8, batch_size=3)  # the long one in many windows
    assert windowed["tokens"] == count and windowed["bits_per_byte"] > 0
