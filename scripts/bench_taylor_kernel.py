"""Time one forward + backward of causal mixing alone (no projections): SDPA vs the Taylor kernels.

    .venv/bin/python scripts/bench_taylor_kernel.py [--lengths 512 2048 8192] [--threads 2] [--repeats 3] [--rounds 1]

Shapes are cpu-tiny's attention at a fixed token budget: batch·length = 16384, 4 heads, d_h = 32, float32.
Cases (`--cases`, default all that fit):

    sdpa                  torch.nn.functional.scaled_dot_product_attention(is_causal=True), standard's fast path
    blocks-128/256/512    blocked_taylor_attention(prefix="blocks", block_size=…): explicit blocks, O(L²)
    features-64/128/256   blocked_taylor_attention(prefix="features", block_size=…): running sums of φ, O(L·d³)
    auto                  blocked_taylor_attention with its defaults (what the mixer would run)
    chunked               attnlab.mixers.approximate.chunked_taylor_attention (autograd, chunk 2·d_h²); up to 2048
    reference             reference_taylor_attention (explicit float32 L×L); up to 2048

Each case runs in a fresh subprocess, since ru_maxrss is a process-wide high-water mark: "peak MiB" is that mark
after the steps minus the resident size just before the first step (inputs allocated). The time is the best of
`--repeats` steps after one warm-up step (and of `--rounds` such runs, taken in turn with the other cases); "vs sdpa"
is SDPA's time / the case's time in this same run (> 1 = faster).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

TOKENS = 16384
HEADS = 4
HEAD_DIM = 32
CASES = (
    "sdpa",
    "blocks-128",
    "blocks-256",
    "blocks-512",
    "features-64",
    "features-128",
    "features-256",
    "auto",
    "chunked",
    "reference",
)
MAX_LENGTH = {"chunked": 2048, "reference": 2048}  # beyond these the autograd L×L / d²-state forms take minutes


def current_rss_mib() -> float:
    """Resident set size now (Linux /proc), MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def mixing_function(case: str):
    """(query, key, value) → output [batch, heads, seq, d] for one case."""
    import torch.nn.functional as F

    from attnlab.kernels.taylor import blocked_taylor_attention
    from attnlab.mixers.approximate import chunked_taylor_attention, reference_taylor_attention
    from attnlab.mixers.base import allowed_positions

    scaling = HEAD_DIM**-0.5
    if case == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if case == "auto":
        return lambda q, k, v: blocked_taylor_attention(q, k, v, None, scaling)
    if case.startswith(("blocks-", "features-")):
        prefix, block = case.split("-")
        return lambda q, k, v: blocked_taylor_attention(q, k, v, None, scaling, int(block), prefix)
    if case == "chunked":
        return lambda q, k, v: chunked_taylor_attention(q, k, v, None, scaling, 2 * HEAD_DIM**2)
    if case == "reference":
        return lambda q, k, v: reference_taylor_attention(
            q, k, v, allowed_positions(q.shape[2], None, q.device), scaling
        )[0]
    raise ValueError(f"unknown case {case!r}")


def run_case(case: str, length: int, threads: int, repeats: int) -> dict:
    """One case in this process: warm-up + `repeats` timed forward+backward steps."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch = TOKENS // length
    query, key, value = (torch.randn(batch, HEADS, length, HEAD_DIM, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, HEADS, length, HEAD_DIM)
    attend = mixing_function(case)
    rss_before = current_rss_mib()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        attend(query, key, value).backward(grad)
        times.append(time.perf_counter() - start)
        query.grad = key.grad = value.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"case": case, "length": length, "seconds": min(times[1:]), "peak_mib": peak - rss_before}


def run_child(case: str, length: int, threads: int, repeats: int) -> dict | None:
    """`run_case` in a fresh Python process; None (and its last error line) if it failed."""
    command = [sys.executable, __file__, "--child", case, str(length), "--threads", str(threads)]
    result = subprocess.run(command + ["--repeats", str(repeats)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"{length:>6} {case:<14} error: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case and round")
    parser.add_argument("--rounds", type=int, default=1, help="run every case this many times; keep its best")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child[0], int(args.child[1]), args.threads, args.repeats)))
        return
    rows = []
    print(f"B·L = {TOKENS}, heads {HEADS}, d_h {HEAD_DIM}, fp32, {args.threads} threads, best of {args.repeats} steps")
    print(f"{'L':>6} {'case':<14} {'s/step':>8} {'tok/s':>8} {'vs sdpa':>8} {'peak MiB':>9}")
    for length in args.lengths:
        cases = [case for case in args.cases if length <= MAX_LENGTH.get(case, length)]
        best: dict[str, dict] = {}
        for _ in range(args.rounds):  # every case once per round: load drifts hit all cases alike
            for case in cases:
                row = run_child(case, length, args.threads, args.repeats)
                if row is not None and (case not in best or row["seconds"] < best[case]["seconds"]):
                    best[case] = row | {"peak_mib": max(row["peak_mib"], best.get(case, row)["peak_mib"])}
        sdpa_seconds = best["sdpa"]["seconds"] if "sdpa" in best else None
        for case in cases:
            if case not in best:
                print(f"{length:>6} {case:<14} failed", flush=True)
                continue
            row = best[case]
            row["tokens_per_s"] = TOKENS / row["seconds"]
            row["vs_sdpa"] = sdpa_seconds / row["seconds"] if sdpa_seconds else None
            rows.append(row)
            ratio = f"{row['vs_sdpa']:.2f}" if row["vs_sdpa"] else "-"
            print(
                f"{length:>6} {case:<14} {row['seconds']:>8.3f} {row['tokens_per_s']:>8.0f} {ratio:>8} "
                f"{row['peak_mib']:>9.0f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
