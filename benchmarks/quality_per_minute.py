"""Held-out bits per byte at equal wall time: `attnlab train --preset cpu-tiny` against a plain transformers loop.

    .venv/bin/python benchmarks/quality_per_minute.py --out DIR [--corpus PATH | builtin] [--threads 2]
        [--attnlab-args "--max-steps 1000"] [--heldout-fraction 0.1] [--story-start "Once upon a time"]

1. Documents, in the corpus's order: a .txt file's blank-line-separated paragraphs, a .jsonl file's "text"
   fields, or attnlab's built-in corpus. The held-out documents are one contiguous tail of about
   `--heldout-fraction` of the bytes. It starts at the first document from that point on that begins with
   `--story-start` (default "Once upon a time" for the TinyStories slice, where stories are several
   paragraphs and their boundaries are not marked, none otherwise), so no story straddles the split.
2. One byte-level BPE of 4096 tokens, trained on the training documents (OUT/tokenizer), serves both models.
3. attnlab: `attnlab train --preset cpu-tiny --data OUT/train.jsonl --tokenizer OUT/tokenizer` plus
   `--attnlab-args`, in a subprocess, as a user runs it. Its wall time T, the whole command, is the budget.
4. The plain loop, in this process, for T seconds from the start of its setup: `transformers.Qwen2ForCausalLM`
   of cpu-tiny's shape, AdamW (betas 0.9/0.95, weight decay 0.1), the preset's peak LR and warm-up steps, then
   a cosine over the remaining wall time; batches of the preset's size of random windows of the preset's length
   from the packed `doc eos doc eos …` stream of the same training documents attnlab trains on (its train
   split of OUT/train.jsonl).
5. Both final models are scored by one function: every held-out document is `eos doc`, cut into windows of
   the preset's length that overlap by one token (each token is predicted once, from within its window);
   bits per byte = total NLL in bits / UTF-8 bytes of the documents, independent of the tokenizer.

Writes OUT/quality_per_minute.json and prints a table. Defaults: the TinyStories slice of the project's shared
data when it is present beside the checkout, else the built-in corpus; 2 threads.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHARED_TINYSTORIES = Path(__file__).resolve().parents[1].parent / "shared/data/tinystories/tinystories_val.txt"
TINYSTORIES_STORY_START = "Once upon a time"
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1


def read_documents(corpus: str) -> list[str]:
    """The corpus's documents in order (module docstring, step 1)."""
    if corpus == "builtin":
        from attnlab.data.builtin import builtin_documents

        return list(builtin_documents())
    path = Path(corpus)
    if not path.is_file():
        raise SystemExit(f"quality_per_minute: error: no corpus file {path}; give a .txt or .jsonl file, or builtin")
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [text for line in lines if line.strip() and (text := json.loads(line).get("text", "")).strip()]
    return [paragraph.strip() for paragraph in path.read_text(encoding="utf-8").split("\n\n") if paragraph.strip()]


def split_tail(documents: list[str], fraction: float, story_start: str | None) -> tuple[list[str], list[str]]:
    """(train, held-out): the held-out documents are the contiguous tail from the first document at or after
    `fraction` of the bytes from the end that begins with `story_start` (any document when None)."""
    sizes = [len(text.encode("utf-8")) for text in documents]
    target, before = (1 - fraction) * sum(sizes), 0
    for index, size in enumerate(sizes):
        if before >= target and (story_start is None or documents[index].startswith(story_start)):
            return documents[:index], documents[index:]
        before += size
    raise SystemExit("quality_per_minute: error: no split point found; lower --heldout-fraction or --story-start")


def bits_per_byte(model, tokenizer, documents: list[str], seq_len: int, batch_size: int = 32) -> dict:
    """Held-out bits per byte and nats per token of a causal LM (module docstring, step 5)."""
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    windows = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        tokens = [eos, *ids]
        windows += [tokens[start : start + seq_len] for start in range(0, len(tokens) - 1, seq_len - 1)]
    nll, predicted = 0.0, 0
    model.eval()
    with torch.no_grad():
        for first in range(0, len(windows), batch_size):
            group = windows[first : first + batch_size]
            width = max(len(window) for window in group)
            input_ids = torch.full((len(group), width), eos)
            labels = torch.full((len(group), width), -100)
            for row, window in enumerate(group):
                input_ids[row, : len(window)] = torch.tensor(window)
                labels[row, 1 : len(window)] = torch.tensor(window[1:])
            logits = model(input_ids=input_ids).logits[:, :-1].float()  # right padding: real tokens see none
            targets = labels[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            predicted += int((targets != -100).sum())
    total_bytes = sum(len(text.encode("utf-8")) for text in documents)
    return {"bits_per_byte": nll / math.log(2) / total_bytes, "nats_per_token": nll / predicted, "tokens": predicted}


def run_attnlab(out: Path, extra: list[str]) -> tuple[float, dict]:
    """`attnlab train` on OUT/train.jsonl with OUT/tokenizer; its wall time and last metrics record."""
    run = out / "attnlab"
    command = [sys.executable, "-m", "attnlab", "train", "--preset", "cpu-tiny", "--data", str(out / "train.jsonl")]
    command += ["--tokenizer", str(out / "tokenizer"), "--out", str(run), "--no-tensorboard", *extra]
    print("quality_per_minute:", shlex.join(command), file=sys.stderr, flush=True)
    began = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - began
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return seconds, last


def plain_loop(out: Path, budget_s: float, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The plain transformers loop for `budget_s` seconds (module docstring, step 4)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from attnlab.data import open_corpus
    from attnlab.data.packing import pack_documents
    from attnlab.runconfig import resolve_run_config

    began = time.perf_counter()
    preset = resolve_run_config("cpu-tiny")
    shape, settings = preset.model, preset.train
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    documents = list(open_corpus(str(out / "train.jsonl")).documents("train"))
    stream = torch.from_numpy(pack_documents(tokenizer, documents).astype("int64"))
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=shape["max_position_embeddings"],
        rope_theta=shape["rope_theta"],
        tie_word_embeddings=shape["tie_word_embeddings"],
        use_cache=False,
    )
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(seed)
    steps, seq_len, batch = 0, settings.seq_len, settings.batch_size
    model.train()
    while (elapsed := time.perf_counter() - began) < budget_s:
        warmup = min(1.0, (steps + 1) / settings.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * warmup * 0.5 * (1 + math.cos(math.pi * elapsed / budget_s))
        starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=generator)
        input_ids = torch.stack([stream[start : start + seq_len] for start in starts.tolist()])
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    return model, {"steps": steps, "tokens_seen": steps * batch * seq_len, "seconds": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_corpus = str(SHARED_TINYSTORIES) if SHARED_TINYSTORIES.is_file() else "builtin"
    parser.add_argument(
        "--corpus", default=default_corpus, help=f"a .txt or .jsonl file, or builtin ({default_corpus})"
    )
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the data, runs and results")
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--story-start", default=None, help="a held-out tail starts at a document with this prefix")
    parser.add_argument("--attnlab-args", default="", help='more `attnlab train` options, e.g. "--max-steps 1000"')
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"quality_per_minute: error: {args.out} exists; give a new folder")
    story_start = args.story_start
    if story_start is None and Path(args.corpus).resolve() == SHARED_TINYSTORIES.resolve():
        story_start = TINYSTORIES_STORY_START
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import attnlab  # noqa: F401  (registers the Auto classes)
    from attnlab.data import build_tokenizer, open_corpus
    from attnlab.runconfig import resolve_run_config

    train_documents, heldout = split_tail(read_documents(args.corpus), args.heldout_fraction, story_start)
    args.out.mkdir(parents=True)
    with (args.out / "train.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": text}) + "\n" for text in train_documents)
    build_tokenizer("bpe:4096", open_corpus(str(args.out / "train.jsonl"))).save_pretrained(args.out / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(args.out / "tokenizer")
    seq_len = resolve_run_config("cpu-tiny").train.seq_len

    seconds, last = run_attnlab(args.out, shlex.split(args.attnlab_args))
    attnlab_model = AutoModelForCausalLM.from_pretrained(args.out / "attnlab")
    rows = {
        "attnlab cpu-tiny": {
            **bits_per_byte(attnlab_model, tokenizer, heldout, seq_len),
            "steps": last["step"],
            "tokens_seen": last["tokens"],
            "seconds": seconds,
        }
    }
    plain, trained = plain_loop(args.out, seconds)
    rows["transformers Qwen2 + plain loop"] = {**bits_per_byte(plain, tokenizer, heldout, seq_len), **trained}
    results = {
        "corpus": args.corpus,
        "train_documents": len(train_documents),
        "heldout_documents": len(heldout),
        "heldout_bytes": sum(len(text.encode("utf-8")) for text in heldout),
        "story_start": story_start,
        "threads": args.threads,
        "attnlab_args": args.attnlab_args,
        "rows": rows,
    }
    (args.out / "quality_per_minute.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"corpus {args.corpus}: {len(train_documents)} train / {len(heldout)} held-out documents")
    print("| | held-out bits/byte | nats/token | steps | tokens seen | seconds |\n|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['bits_per_byte']:.3f} | {row['nats_per_token']:.3f} | {row['steps']} | "
            f"{row['tokens_seen']:,} | {row['seconds']:.0f} |"
        )
    ratio = rows["attnlab cpu-tiny"]["bits_per_byte"] / rows["transformers Qwen2 + plain loop"]["bits_per_byte"]
    print(f"attnlab / plain loop bits per byte: {ratio:.3f}")


if __name__ == "__main__":
    main()
