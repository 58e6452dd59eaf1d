"""Training speed of attnlab against `transformers.Qwen2ForCausalLM`, side by side in one run.

Both models get the `cpu-tiny` preset (all-standard layers for the comparison), identical weights (the
attnlab state dict loads strictly into the Qwen2 twin), the same random token batches, the same torch
thread count and the same full optimizer step as the trainer takes it: forward with the next-token loss,
backward, `clip_grad_norm_(1.0)`, AdamW(lr 4e-4, betas (0.9, 0.9999), eps 1e-8, weight decay 0.1).
attnlab trains through its fused loss (`model(x, labels=x, return_logits=False)`), Qwen2 through its own
(`model(x, labels=x)`).

After `--warmup` untimed steps each, the models take turns, `--repeats` turns of `--steps` steps each
(the order rotates every round), every step timed on its own. Tokens/s comes from the median step time:
on a shared machine, load spikes hit single steps, not the median. The script prints tokens/s of both
models, their ratio, and the spread of the per-turn ratio; then, with the same loop, tokens/s of every
attnlab variant (`uniform:<mixer>`).

    python benchmarks/train_speed.py                      # B=16, L=256, 2 threads, all seven mixers
    python benchmarks/train_speed.py --batch-size 8 --seq-len 128 --out speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from attnlab import MIXER_NAMES, AttnLabConfig, AttnLabForCausalLM
from attnlab.export import to_qwen2
from attnlab.presets import model_options

PRESET = "cpu-tiny"
SEED = 0


def attnlab_model(layers: str) -> AttnLabForCausalLM:
    torch.manual_seed(SEED)
    return AttnLabForCausalLM(AttnLabConfig(**model_options(PRESET), layers=layers)).train()


def training_step(model: torch.nn.Module, fused_loss: bool) -> Callable[[torch.Tensor], float]:
    """One full optimizer step on a batch of token ids, as the trainer takes it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.9999), eps=1e-8, weight_decay=0.1)

    def step(input_ids: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        if fused_loss:
            loss = model(input_ids, labels=input_ids, return_logits=False).loss
        else:
            loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    return step


def take_turns(
    steps: dict[str, Callable[[torch.Tensor], float]], batches: torch.Tensor, args: argparse.Namespace, repeats: int
) -> dict[str, list[list[float]]]:
    """Per model, the step times of each of its `repeats` turns.

    Every model first takes `args.warmup` untimed steps; then the models take turns, `args.steps` timed
    steps each, the order rotating every round so that no model always follows the same one.
    """
    names = list(steps)
    for name in names:
        for i in range(args.warmup):
            steps[name](batches[i % len(batches)])
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            turn = []
            for i in range(args.steps):
                start = time.perf_counter()
                steps[name](batches[(repeat * args.steps + i) % len(batches)])
                turn.append(time.perf_counter() - start)
            times[name].append(turn)
    return times


def tokens_per_second(blocks: list[list[float]], tokens: int) -> float:
    return tokens / statistics.median([seconds for block in blocks for seconds in block])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per turn")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of every model before the first turn")
    parser.add_argument("--repeats", type=int, default=12, help="turns per model (attnlab and Qwen2 alternate)")
    parser.add_argument("--variant-repeats", type=int, default=3, help="turns per attnlab variant")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, the same for all")
    parser.add_argument("--mixers", nargs="*", default=list(MIXER_NAMES), help="variants to time (uniform:<mixer>)")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.mixers:
        if name not in MIXER_NAMES:
            parser.error(f"unknown mixer {name!r}; valid mixers: {', '.join(MIXER_NAMES)}")

    generator = torch.Generator().manual_seed(SEED)
    vocab_size = model_options(PRESET)["vocab_size"]
    batches = torch.randint(0, vocab_size, (4, args.batch_size, args.seq_len), generator=generator)
    tokens = args.batch_size * args.seq_len
    print(
        f"{PRESET}, B={args.batch_size}, L={args.seq_len} ({tokens} tokens/step), {args.threads} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )

    began = time.perf_counter()
    ours = attnlab_model("uniform:standard")
    qwen = to_qwen2(ours, use_cache=False, attn_implementation="sdpa")  # same weights, SDPA attention
    times = take_turns(
        {"attnlab": training_step(ours, fused_loss=True), "qwen2": training_step(qwen, fused_loss=False)},
        batches,
        args,
        args.repeats,
    )
    speed = {name: tokens_per_second(blocks, tokens) for name, blocks in times.items()}
    ratios = [statistics.median(q) / statistics.median(a) for a, q in zip(times["attnlab"], times["qwen2"])]
    result: dict = {
        "preset": PRESET,
        "config": ours.config.to_dict(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "attnlab_tokens_per_s": speed["attnlab"],
        "qwen2_tokens_per_s": speed["qwen2"],
        "ratio": speed["attnlab"] / speed["qwen2"],
        "ratio_over_repeats": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "step_seconds": times,
    }
    print(f"attnlab (standard) {speed['attnlab']:7.0f} tok/s   Qwen2ForCausalLM (sdpa) {speed['qwen2']:7.0f} tok/s")
    print(
        f"ratio attnlab / Qwen2: {result['ratio']:.3f}   over {args.repeats} repeats: median "
        f"{statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}"
    )
    del ours, qwen

    if args.mixers:
        variant_steps = {
            f"uniform:{name}": training_step(attnlab_model(f"uniform:{name}"), True) for name in args.mixers
        }
        variant_times = take_turns(variant_steps, batches, args, args.variant_repeats)
        result["variants"] = {name: tokens_per_second(blocks, tokens) for name, blocks in variant_times.items()}
        print("attnlab variants (fused loss):")
        for name, value in result["variants"].items():
            print(f"  {name:<22} {value:7.0f} tok/s")
    result["benchmark_seconds"] = time.perf_counter() - began
    print(f"({result['benchmark_seconds']:.0f} s)")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
