"""`attnlab bench`: measured costs of the mixers (every registered one by default) beside their analytic ones
(docs/method.md §8, issue 6).

    results = run_bench(BenchSettings(preset="cpu-tiny", against_hf=True), "bench")

writes `bench/bench.json`, `bench/bench.md`, with the decode section `bench/decode.png` and, with the train
section at two or more lengths, `bench/train_throughput.png` (and `.svg`); `results["files"]` names the files
written. Four sections, each optional:

  train    tokens/s of a full optimizer step as the trainer takes it (fused loss, backward, clip, AdamW),
           one `uniform:<mixer>` model per mixer, and with `against_hf` transformers' `Qwen2ForCausalLM`
           (sdpa) holding the standard model's weights, at every length L of `train_seq_len` with a fixed
           number of tokens per step: B = train_tokens_per_step // L sequences (at least 1) unless
           `train_batch_size` is set. The standard model is always measured (the base of every ratio).
           At each L all models take turns in the same process; model FLOPs utilisation is taken against a
           square fp32 matmul timed in the same run. Beside each model's tokens/s ratio to standard stands
           the analytic one (standard's training FLOPs over the model's), the peak memory of one step (see
           TRAIN_MEMORY_METHOD), the minor page faults per timed step and the seconds of the untimed warm-up
           steps (the first call's allocations, and any compilation, stay out of the timed steps).
  prefill  seconds (and peak memory) of the cached forward over a context of L tokens — what `generate`
           runs first. rndembqk/fixedseqqk get their shadow Q/K tables before the clock starts (they are
           input-independent, computed once per model); their cost is reported separately.
  decode   seconds per generated token at context L: after the prefill, `decode_tokens` single-token
           cached steps (fixed teacher-forced tokens), timed together, divided by their number.
  cache    bytes per layer held by the `AttnLabCache` after the prefill, beside `Mixer.cost`'s formula.

Every measurement takes `warmup` untimed runs, then `repeats` timed ones; the median is reported with
the min and max. Seeds are fixed; torch version, thread count, device and the memory allocator's
environment (glibc `MALLOC_*` tunables, `LD_PRELOAD`) are recorded. Benchmarks are run by hand, never
timed in tests.

The CPU training ratio to transformers depends on the allocator. attnlab's fused loss, RMSNorm and RoPE
allocate few large temporaries; transformers' step allocates many (the [B·L, vocab] logits and their
gradients), and with glibc's defaults every large allocation is fresh memory from the kernel, page-faulted
in on first touch. Measured with `attnlab bench --preset cpu-tiny --mixers standard --against-hf --threads 2
--sections train --repeats 10 --train-seq-len 128 --train-batch-size 16` on 2 cores, two runs each: with
glibc's defaults attnlab was ×1.25 and ×1.27 faster than Qwen2 (262 ms against 327 ms per step in the first
run). With MALLOC_MMAP_THRESHOLD_=1e9 MALLOC_TRIM_THRESHOLD_=1e11 MALLOC_TOP_PAD_=1e9 it was ×1.06 and ×1.09
(230 ms against 251 ms). What is left is the same matmuls at nearly the same speed.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .cache import AttnLabCache, RecurrentStateLayer
from .config import AttnLabConfig
from .environment import versions
from .mixers import get_mixer, is_registered, mixer_names
from .mixers.base import SHADOW_SOURCES
from .model import AttnLabForCausalLM
from .presets import model_options
from .runconfig import write_text_atomic

SECTIONS = ("train", "prefill", "decode", "cache")
TRAIN_FIGURE = "train_throughput"  # OUT/train_throughput.png and .svg: tokens/s against L
DTYPE = torch.float32  # the bench runs in fp32: the formulas get dtype_bytes = 4
CPU_MEMORY_METHOD = (
    "peak bytes of the tensors allocated during the prefill and alive at the same time, tracked per op "
    "through a TorchDispatchMode (weights and pre-existing tensors excluded; kernel-internal workspaces "
    "are not visible)"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during the prefill, minus what was allocated before it"
TRAIN_MEMORY_METHOD = {
    "cpu": "peak resident memory (VmHWM) during one untimed step above the resident memory (VmRSS) just before "
    "it, after returning the allocator's free memory to the kernel (glibc malloc_trim) and resetting the peak "
    "(Linux /proc/self/clear_refs, 5)",
    "cuda": "torch.cuda.max_memory_allocated during one untimed step, minus what was allocated before it",
}
TRAIN_FLOPS_NOTE = (
    "training FLOPs = 3 × the forward's (forward + backward), the forward's mixers from `Mixer.cost(cached=False)`; "
    "a shadow stream is one more row through the layers before its last reader; the factor 3 cancels in the ratios"
)


@dataclass
class BenchSettings:
    """What `run_bench` measures; every default finishes in a few minutes on 2 CPU cores for cpu-tiny."""

    preset: str = "cpu-tiny"
    model_overrides: dict = field(default_factory=dict)  # AttnLabConfig fields over the preset's
    mixers: tuple[str, ...] = field(default_factory=mixer_names)  # every registered mixer
    contexts: tuple[int, ...] = (128, 256, 512, 1024)  # prefill/decode/cache context lengths (8× range)
    sections: tuple[str, ...] = SECTIONS
    against_hf: bool = False  # also train transformers' Qwen2ForCausalLM (sdpa) with the same weights
    bf16: bool = False  # train under bf16 autocast (fp32 weights), as `attnlab train` does on CUDA
    threads: int | None = None  # torch intra-op threads (None: leave torch's setting)
    repeats: int = 3  # timed runs (train: turns per model) per measurement
    warmup: int = 1  # untimed runs (train: steps) before the timed ones
    train_seq_len: tuple[int, ...] = (128, 1024)  # training lengths L
    train_tokens_per_step: int = 16384  # B·L at every length: B = this // L, at least 1
    train_batch_size: int | None = None  # sequences per training step; set, it wins over train_tokens_per_step
    train_steps: int = 2  # timed optimizer steps per turn
    decode_batch_size: int = 8  # sequences per prefill/decode: enough that attention over the context shows
    decode_tokens: int = 16  # cached single-token steps timed per run
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    matmul_size: int | None = None  # side of the square matmul for the peak (None: 2048 CPU, 8192 CUDA)

    def check(self) -> None:
        """`ValueError` with a fix for every setting a user can get wrong."""
        unknown = [name for name in self.mixers if not is_registered(name)]
        if unknown or not self.mixers:
            raise ValueError(f"unknown or missing mixers {unknown}; registered mixers: {', '.join(mixer_names())}")
        bad_sections = [name for name in self.sections if name not in SECTIONS]
        if bad_sections or not self.sections:
            raise ValueError(f"unknown or missing sections {bad_sections}; valid sections: {', '.join(SECTIONS)}")
        if not self.contexts or min(self.contexts) < 1:
            raise ValueError(f"--contexts must be positive integers, got {list(self.contexts)}")
        if not self.train_seq_len or min(self.train_seq_len) < 1:
            raise ValueError(
                f"--train-seq-len must be positive integers, e.g. 512,2048,8192; got {list(self.train_seq_len)}"
            )
        for name in ("repeats", "train_tokens_per_step", "train_steps", "decode_batch_size", "decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.train_batch_size is not None and self.train_batch_size < 1:
            raise ValueError(f"--train-batch-size must be at least 1 (or left out), got {self.train_batch_size}")
        if self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise ValueError("--warmup must be ≥ 0 and --threads ≥ 1")
        given = self.model_overrides.get("max_position_embeddings")
        longest, source = self.longest_sequence()
        if given is not None and given < longest:
            raise ValueError(
                f"--max-position-embeddings {given} is below the longest sequence measured ({longest}, {source}); "
                f"raise it to at least {longest}, or leave it out and the bench sets it"
            )

    def longest_sequence(self) -> tuple[int, str]:
        """The longest sequence the requested sections run, and which settings make it."""
        candidates = []
        if "train" in self.sections:
            candidates.append((max(self.train_seq_len), "from --train-seq-len"))
        if {"prefill", "decode", "cache"} & set(self.sections):
            candidates.append((max(self.contexts) + self.decode_tokens, "the longest --contexts plus --decode-tokens"))
        return max(candidates)

    def train_batch(self, seq_len: int) -> int:
        """Sequences per training step at length `seq_len`: `train_batch_size` when set, otherwise
        `train_tokens_per_step // seq_len`, at least 1."""
        return self.train_batch_size or max(1, self.train_tokens_per_step // seq_len)


def bench_config(settings: BenchSettings, layers: str) -> tuple[AttnLabConfig, bool]:
    """The model config of one variant, and whether max_position_embeddings (and with it shadow_seq_len,
    the L_max of rndembqk/fixedseqqk) had to be raised above the preset's to cover the longest run (a value
    given in `model_overrides` is never raised: `BenchSettings.check` refuses one that is too small)."""
    options = {**model_options(settings.preset), **settings.model_overrides, "layers": layers}
    longest, _ = settings.longest_sequence()
    extended = options.get("max_position_embeddings", 2048) < longest
    if extended:
        options.update(max_position_embeddings=longest, shadow_seq_len=longest)
    return AttnLabConfig(**options), extended


def build_model(config: AttnLabConfig, device: torch.device, seed: int) -> AttnLabForCausalLM:
    torch.manual_seed(seed)
    return AttnLabForCausalLM(config).to(device=device, dtype=DTYPE)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --- peak matmul throughput -------------------------------------------------------------------------


def measure_matmul_peak(
    device: torch.device, size: int | None = None, repeats: int = 3, dtype: torch.dtype = torch.float32
) -> dict:
    """FLOP/s of a square `size`×`size` matmul in `dtype` (best of `repeats` after one warm-up): the MFU yardstick."""
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    right = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    times = []
    for index in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(left, right)
        synchronize(device)
        if index:  # the first is the warm-up
            times.append(time.perf_counter() - start)
    return {"flops_per_s": 2 * size**3 / min(times), "size": size, "dtype": str(dtype).removeprefix("torch.")}


# --- training throughput ----------------------------------------------------------------------------------


def training_step(model: torch.nn.Module, fused_loss: bool, bf16: bool = False) -> Callable[[torch.Tensor], float]:
    """One full optimizer step on a batch of token ids, as the trainer takes it: loss (under bf16 autocast with
    `bf16`), backward, `clip_grad_norm_(1.0)`, AdamW(lr 4e-4, betas (0.9, 0.9999), eps 1e-8, weight decay 0.1).
    attnlab trains through its fused loss (`return_logits=False`); a transformers model through its own."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.9999), eps=1e-8, weight_decay=0.1)
    model.train()
    device_type = next(model.parameters()).device.type

    def step(input_ids: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            if fused_loss:
                loss = model(input_ids, labels=input_ids, return_logits=False).loss
            else:
                loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()  # also waits for the device

    return step


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far: first touches of memory fresh from the kernel (None where
    the platform does not count them)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def take_turns(
    steps: dict[str, Callable[[torch.Tensor], float]],
    batches: torch.Tensor,
    warmup: int,
    steps_per_turn: int,
    repeats: int,
) -> tuple[dict[str, list[list[float]]], dict[str, list[int]], dict[str, float]]:
    """Per model, the step times (seconds) of each of its `repeats` turns, the minor page faults of each
    timed step (empty where the platform does not count them) and the seconds of its warm-up steps.

    Every model first takes `warmup` untimed steps (they absorb the first call's allocations and any
    compilation); then the models take turns, `steps_per_turn` timed steps each, the order rotating every
    round so that no model always follows the same one. On a shared machine load spikes hit single steps,
    so throughput comes from the median step.
    """
    names = list(steps)
    warmup_seconds = {}
    for name in names:
        start = time.perf_counter()
        for index in range(warmup):
            steps[name](batches[index % len(batches)])
        warmup_seconds[name] = time.perf_counter() - start
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            turn = []
            for index in range(steps_per_turn):
                faults_before, start = minor_page_faults(), time.perf_counter()
                steps[name](batches[(repeat * steps_per_turn + index) % len(batches)])
                turn.append(time.perf_counter() - start)
                if faults_before is not None:
                    faults[name].append(minor_page_faults() - faults_before)
            times[name].append(turn)
    return times, faults, warmup_seconds


def _resident_bytes(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (peak resident) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024  # kB
    raise OSError(f"/proc/self/status has no {field}")


def reset_resident_peak() -> int | None:
    """Return the C allocator's free memory to the kernel (glibc `malloc_trim`, where there is one), then
    reset the process's peak resident memory to the current one (Linux ≥ 4.0: "5" into
    /proc/self/clear_refs). The resident bytes after the reset, or None where the peak cannot be reset."""
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        return None
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
    try:
        clear_refs.write_text("5")
    except OSError:  # not writable here (a restricted container)
        return None
    return _resident_bytes("VmRSS")


def step_peak_memory(step: Callable[[torch.Tensor], float], batch: torch.Tensor, device: torch.device) -> int | None:
    """Peak bytes one untimed `step(batch)` adds to what is held before it (TRAIN_MEMORY_METHOD), or None
    where the platform cannot tell."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(batch)
        return torch.cuda.max_memory_allocated(device) - before
    before = reset_resident_peak()
    if before is None:
        return None
    step(batch)
    return _resident_bytes("VmHWM") - before


def _active_layers(config: AttnLabConfig) -> list[bool]:
    return [not config.skip_nonstandard or name == "standard" for name in config.mixer_types]


def shadow_rows(config: AttnLabConfig) -> list[int]:
    """Per layer, the batch-1 shadow streams one training forward runs through it: each rndembqk/fixedseqqk
    source's stream passes every active layer before the last layer that reads it (`AttnLabModel._shadow_stream`
    and `_with_shadow_row`); that last layer's W_q, W_k and map are in its mixer's cost."""
    active = _active_layers(config)
    rows = [0] * len(active)
    for source in SHADOW_SOURCES:
        readers = [i for i, name in enumerate(config.mixer_types) if active[i] and get_mixer(name).qk_source == source]
        for i in range(max(readers, default=0)):
            if active[i]:
                rows[i] += 1
    return rows


def mixer_forward_flops(config: AttnLabConfig, batch: int, seq_len: int) -> int:
    """FLOPs of every active layer's mixer in one training forward (`Mixer.cost`, cached=False), the shadow
    streams' rows (`shadow_rows`) included."""
    return sum(
        get_mixer(name).cost(config, batch + extra, seq_len, 4, cached=False).prefill_flops
        for name, extra, active in zip(config.mixer_types, shadow_rows(config), _active_layers(config))
        if active
    )


def model_forward_flops(config: AttnLabConfig, batch: int, seq_len: int) -> int:
    """Matmul FLOPs of one training forward: every active layer's mixer (`mixer_forward_flops`) and SwiGLU
    (6·d·intermediate per token), for the batch and the shadow streams' rows (`shadow_rows`), and the LM
    head (2·d·vocab per token of the batch). Embedding lookups and norms are not counted."""
    layer_rows = sum(batch + extra for extra, active in zip(shadow_rows(config), _active_layers(config)) if active)
    feed_forward = 6 * layer_rows * seq_len * config.hidden_size * config.intermediate_size
    head = 2 * batch * seq_len * config.hidden_size * config.vocab_size
    return mixer_forward_flops(config, batch, seq_len) + feed_forward + head


def bench_train(settings: BenchSettings, device: torch.device, peak_flops: float) -> dict:
    """The train section: `lengths[str(L)]` holds each length's measurements (`bench_train_length`)."""
    names = list(settings.mixers) if "standard" in settings.mixers else ["standard", *settings.mixers]
    return {
        "tokens_per_step": None if settings.train_batch_size else settings.train_tokens_per_step,
        "batch_size": settings.train_batch_size,
        "steps_per_turn": settings.train_steps,
        "repeats": settings.repeats,
        "warmup_steps": settings.warmup,
        "memory_method": TRAIN_MEMORY_METHOD["cuda" if device.type == "cuda" else "cpu"],
        "flops_note": TRAIN_FLOPS_NOTE,
        "lengths": {
            str(seq_len): bench_train_length(settings, names, seq_len, device, peak_flops)
            for seq_len in settings.train_seq_len
        },
    }


def training_steps(
    settings: BenchSettings, names: Sequence[str], device: torch.device
) -> tuple[dict[str, Callable[[torch.Tensor], float]], dict[str, AttnLabConfig]]:
    """A fresh `uniform:<name>` model's training step per name (and with `against_hf` "hf_qwen2": transformers'
    Qwen2 with the standard model's weights), and the config of each."""
    from .export import to_qwen2

    steps, configs = {}, {}
    for name in names:
        configs[name], _ = bench_config(settings, f"uniform:{name}")
        model = build_model(configs[name], device, settings.seed)
        steps[name] = training_step(model, fused_loss=True, bf16=settings.bf16)
        if name == "standard" and settings.against_hf:
            qwen = to_qwen2(model, use_cache=False, attn_implementation="sdpa").to(device=device, dtype=DTYPE)
            steps["hf_qwen2"] = training_step(qwen, fused_loss=False, bf16=settings.bf16)
            configs["hf_qwen2"] = configs["standard"]
    return steps, configs


def bench_train_length(
    settings: BenchSettings, names: Sequence[str], seq_len: int, device: torch.device, peak_flops: float
) -> dict:
    """Fresh models of `names` (and with `against_hf` transformers' Qwen2) take turns at length `seq_len`;
    then each takes one more, untimed step for its peak memory. Per model: tokens/s and their ratio to
    standard's, the analytic ratio, MFU, peak memory, page faults and warm-up seconds."""
    batch = settings.train_batch(seq_len)
    tokens = batch * seq_len
    steps, configs = training_steps(settings, names, device)
    generator = torch.Generator().manual_seed(settings.seed)
    batches = torch.randint(0, configs["standard"].vocab_size, (4, batch, seq_len), generator=generator).to(device)
    times, faults, warmup_seconds = take_turns(steps, batches, settings.warmup, settings.train_steps, settings.repeats)
    peak_memory = {name: step_peak_memory(step, batches[0], device) for name, step in steps.items()}
    del steps  # the models and their optimizer states go before the next length's are built
    gc.collect()

    def summary(name: str) -> dict:
        all_steps = [seconds for turn in times[name] for seconds in turn]
        median_step = statistics.median(all_steps)
        flops_per_step = 3 * model_forward_flops(configs[name], batch, seq_len)  # forward + backward ≈ 3 forwards
        return {
            "tokens_per_s": tokens / median_step,
            "tokens_per_s_min": tokens / max(all_steps),
            "tokens_per_s_max": tokens / min(all_steps),
            "median_step_s": median_step,
            "model_flops_per_step": flops_per_step,
            "mixer_flops_per_step": 3 * mixer_forward_flops(configs[name], batch, seq_len),
            "mfu": flops_per_step / median_step / peak_flops,
            "peak_memory_bytes": peak_memory[name],
            "page_faults_per_step": statistics.median(faults[name]) if faults[name] else None,
            "warmup_seconds": warmup_seconds[name] if settings.warmup else None,
        }

    summaries = {name: summary(name) for name in times}
    base = summaries["standard"]
    for row in summaries.values():
        row["ratio_to_standard"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["analytic_ratio_to_standard"] = base["model_flops_per_step"] / row["model_flops_per_step"]
        row["mixer_flops_ratio_to_standard"] = base["mixer_flops_per_step"] / row["mixer_flops_per_step"]
    result: dict = {
        "seq_len": seq_len,
        "batch_size": batch,
        "tokens_per_step": tokens,
        "mixers": {name: summaries[name] for name in names},
    }
    if settings.against_hf:
        result["hf_qwen2"] = summaries["hf_qwen2"]
        result["attnlab_tokens_per_s"] = base["tokens_per_s"]
        result["hf_qwen2_tokens_per_s"] = result["hf_qwen2"]["tokens_per_s"]
        result["ratio"] = result["attnlab_tokens_per_s"] / result["hf_qwen2_tokens_per_s"]
        ratios = [
            statistics.median(theirs) / statistics.median(ours)
            for ours, theirs in zip(times["standard"], times["hf_qwen2"])
        ]
        result["ratio_over_repeats"] = spread(ratios)
    return result


# --- prefill, decode, cache ----------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors that ops create inside the mode and that are alive at the same time.

    An output sharing storage with an input (a view, an in-place op) is not a new allocation; a storage
    is released when the tensor that created it is freed (views outliving it are not followed).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        inputs = {
            leaf.untyped_storage().data_ptr()
            for leaf in _pytree.tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor)
        }
        for leaf in _pytree.tree_leaves(output):
            if isinstance(leaf, torch.Tensor):
                storage = leaf.untyped_storage()
                key = storage.data_ptr()
                if key in inputs or key in self._sizes or storage.nbytes() == 0:
                    continue
                self._sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(leaf, self._release, key)
        return output

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def layer_cache_bytes(layer) -> int:
    """Bytes of the distinct tensors one `AttnLabCache` layer holds (keys/values, shadow tables, states)."""
    if isinstance(layer, RecurrentStateLayer):
        tensors = list(layer.named_states().values())
    else:
        tensors = [value for value in vars(layer).values() if isinstance(value, torch.Tensor)]
    distinct = {tensor.data_ptr(): tensor.numel() * tensor.element_size() for tensor in tensors if tensor.numel()}
    return sum(distinct.values())


def new_cache(model: AttnLabForCausalLM, seq_len: int) -> AttnLabCache:
    """A fresh cache with the rndembqk/fixedseqqk shadow tables already filled (once per model and cache)."""
    cache = AttnLabCache(model.config)
    model.model._fill_shadow_tables(cache, model.model.active_layers(), seq_len, reference=False)
    return cache


@torch.no_grad()
def prefill_and_decode(
    model: AttnLabForCausalLM, token_ids: torch.Tensor, context: int, decode_tokens: int, device: torch.device
) -> dict:
    """One run: shadow tables, the cached prefill of `context` tokens, then `decode_tokens` cached steps."""
    synchronize(device)
    start = time.perf_counter()
    cache = new_cache(model, context + decode_tokens)
    synchronize(device)
    tables = time.perf_counter() - start
    start = time.perf_counter()
    model(token_ids[:, :context], cache=cache, use_cache=True, logits_to_keep=1)
    synchronize(device)
    prefill = time.perf_counter() - start
    cache_bytes = [layer_cache_bytes(layer) for layer in cache.layers]
    start = time.perf_counter()
    for index in range(context, context + decode_tokens):
        model(token_ids[:, index : index + 1], cache=cache, use_cache=True)
    synchronize(device)
    return {
        "tables": tables,
        "prefill": prefill,
        "decode": (time.perf_counter() - start) / decode_tokens,
        "cache_bytes": cache_bytes,
    }


@torch.no_grad()
def prefill_peak_memory(model: AttnLabForCausalLM, token_ids: torch.Tensor, device: torch.device) -> int:
    """Peak bytes of the cached prefill (see CPU_MEMORY_METHOD / CUDA_MEMORY_METHOD); an untimed run."""
    cache = new_cache(model, token_ids.shape[1])
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(token_ids, cache=cache, use_cache=True, logits_to_keep=1)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as tracker:
        model(token_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return tracker.peak


def bench_inference(settings: BenchSettings, device: torch.device) -> dict:
    """prefill/decode/cache sections: `decode[mixer][context]` = seconds per generated token, etc."""
    batch, new = settings.decode_batch_size, settings.decode_tokens
    prefill, decode, decode_spread, cache = {}, {}, {}, {}
    for name in settings.mixers:
        config, _ = bench_config(settings, f"uniform:{name}")
        model = build_model(config, device, settings.seed).eval()
        prefill[name], decode[name], decode_spread[name], cache[name] = {}, {}, {}, {}
        for context in settings.contexts:
            generator = torch.Generator().manual_seed(settings.seed + context)
            token_ids = torch.randint(0, config.vocab_size, (batch, context + new), generator=generator).to(device)
            for _ in range(settings.warmup):
                prefill_and_decode(model, token_ids, context, new, device)
            runs = [prefill_and_decode(model, token_ids, context, new, device) for _ in range(settings.repeats)]
            cost = get_mixer(name).cost(config, batch, context, dtype_bytes=4)
            key = str(context)
            prefill_times = spread([run["prefill"] for run in runs])
            prefill[name][key] = {
                "seconds": prefill_times["median"],
                "min": prefill_times["min"],
                "max": prefill_times["max"],
                "peak_memory_bytes": prefill_peak_memory(model, token_ids[:, :context], device),
                "analytic_flops_per_layer": cost.prefill_flops,
                "shadow_tables_seconds": statistics.median(run["tables"] for run in runs),
                "shadow_tables_analytic_flops_per_layer": cost.precompute_flops,
            }
            decode_times = spread([run["decode"] for run in runs])
            decode[name][key] = decode_times["median"]
            decode_spread[name][key] = {
                "min": decode_times["min"],
                "max": decode_times["max"],
                "analytic_flops_per_token_per_layer": cost.decode_flops_per_token,
            }
            measured = runs[0]["cache_bytes"]
            cache[name][key] = {
                "measured_bytes_per_layer": measured[0],
                "formula_bytes_per_layer": cost.cache_bytes,
                "all_layers_equal": len(set(measured)) == 1,
                "match": len(set(measured)) == 1 and measured[0] == cost.cache_bytes,
            }
        del model
    return {"prefill": prefill, "decode": decode, "decode_spread": decode_spread, "cache": cache}


# --- the whole run, its table and its figure ------------------------------------------------------------


def run_bench(settings: BenchSettings, out_dir: str | Path) -> dict:
    """Measure the requested sections; write OUT/bench.json, OUT/bench.md, when the decode section was
    measured OUT/decode.png and, when the train section was measured at two or more lengths,
    OUT/train_throughput.png and .svg (linked from bench.md). Returns the results (as in bench.json) plus
    "files": the names of the files written in OUT."""
    from .plots import train_throughput
    from .train import pick_device

    settings.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(settings.device)
    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    began = time.perf_counter()
    try:
        config, extended = bench_config(settings, "uniform:standard")
        peak = measure_matmul_peak(device, settings.matmul_size, dtype=torch.bfloat16 if settings.bf16 else DTYPE)
        results: dict = {
            "environment": {
                **versions(),
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
                "threads": torch.get_num_threads(),
                "dtype": "float32" + (" weights, bfloat16 autocast in training" if settings.bf16 else ""),
                "seed": settings.seed,
                "matmul_peak": peak,
                "allocator_environment": {
                    name: value
                    for name, value in os.environ.items()
                    if name.startswith("MALLOC_") or name == "LD_PRELOAD"
                },
            },
            "settings": {
                **asdict(settings),
                "mixers": list(settings.mixers),
                "contexts": list(settings.contexts),
                "train_seq_len": list(settings.train_seq_len),
            },
            "config": config.to_dict(),
            "extended_max_position_embeddings": config.max_position_embeddings if extended else None,
            "prefill_memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
        }
        if "train" in settings.sections:
            results["train"] = bench_train(settings, device, peak["flops_per_s"])
        if {"prefill", "decode", "cache"} & set(settings.sections):
            inference = bench_inference(settings, device)
            for section in ("prefill", "decode", "cache"):
                if section in settings.sections:
                    results[section] = inference[section]
            if "decode" in settings.sections:
                results["decode_spread"] = inference["decode_spread"]
    finally:
        torch.set_num_threads(previous_threads)
    results["seconds"] = time.perf_counter() - began
    title = f"{settings.preset}, {results['environment']['device']}"
    write_text_atomic(out_dir / "bench.json", json.dumps(results, indent=2, default=str) + "\n")
    files = ["bench.json", "bench.md"]
    if "decode" in results:
        decode_figure(results["decode"], out_dir / "decode.png", title=title)
        files.append("decode.png")
    if len(results.get("train", {}).get("lengths", {})) >= 2:
        train = results["train"]
        fixed = train["tokens_per_step"]
        per_step = f"B = {train['batch_size']}" if fixed is None else f"B·L = {fixed}"
        written = train_throughput(train_tokens_per_s(train), out_dir, TRAIN_FIGURE, title=f"{title}, {per_step}")
        files += [path.name for path in written]
    write_text_atomic(out_dir / "bench.md", bench_markdown(results))  # last: the figures it links exist
    return {**results, "files": files}


def train_tokens_per_s(train: dict) -> dict[str, dict[int, float]]:
    """`{model: {L: tokens/s}}` of the train section, the Qwen2 comparison as "hf_qwen2 (sdpa)"."""
    series: dict[str, dict[int, float]] = {}
    for length, row in train["lengths"].items():
        models = {**row["mixers"], **({"hf_qwen2 (sdpa)": row["hf_qwen2"]} if "hf_qwen2" in row else {})}
        for name, values in models.items():
            series.setdefault(name, {})[int(length)] = values["tokens_per_s"]
    return series


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def bench_markdown(results: dict) -> str:
    """The Markdown report: environment, then one table per measured section."""
    env, settings = results["environment"], results["settings"]
    parts = [
        f"# attnlab bench: {settings['preset']}\n",
        (
            f"torch {env['torch']}, transformers {env['transformers']}, device {env['device']}, {env['threads']} "
            f"threads, {env['dtype']}, seed {env['seed']}; {env['matmul_peak']['dtype']} matmul peak "
            f"{env['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s ({env['matmul_peak']['size']}² matmul); "
            f"{results['seconds']:.0f} s in all. Medians of {settings['repeats']} runs after {settings['warmup']} "
            "warm-up, [min–max].\n"
        ),
    ]
    if allocator := env.get("allocator_environment"):
        settings_text = ", ".join(f"{name}={value}" for name, value in sorted(allocator.items()))
        parts.append(
            f"Memory allocator environment: {settings_text} (see `attnlab.bench` on how it moves the ratio).\n"
        )
    if results.get("extended_max_position_embeddings"):
        parts.append(
            f"The preset's max_position_embeddings was raised to {results['extended_max_position_embeddings']} "
            "(and shadow_seq_len, the rndembqk/fixedseqqk L_max, with it) to cover the longest training length or "
            "context plus the decoded tokens.\n"
        )
    if "train" in results:
        parts.append(train_markdown(results["train"]))
    contexts = [str(context) for context in settings["contexts"]]
    if "prefill" in results:
        prefill = results["prefill"]
        parts.append(
            f"## Prefill (batch {settings['decode_batch_size']}): ms, [min–max]\n\n"
            + _table(
                ["mixer", *contexts],
                [
                    [
                        name,
                        *(
                            f"{1e3 * row[c]['seconds']:.1f} [{1e3 * row[c]['min']:.1f}–{1e3 * row[c]['max']:.1f}]"
                            for c in contexts
                        ),
                    ]
                    for name, row in prefill.items()
                ],
            )
            + "\nPeak prefill memory ("
            + results["prefill_memory_method"]
            + "):\n\n"
            + _table(
                ["mixer", *contexts],
                [[name, *(_bytes(row[c]["peak_memory_bytes"]) for c in contexts)] for name, row in prefill.items()],
            )
            + "\nAnalytic mixer MFLOPs per layer (`Mixer.cost`, projections included):\n\n"
            + _table(
                ["mixer", *contexts],
                [
                    [name, *(f"{row[c]['analytic_flops_per_layer'] / 1e6:.1f}" for c in contexts)]
                    for name, row in prefill.items()
                ],
            )
        )
    if "decode" in results:
        decode, decode_spread = results["decode"], results["decode_spread"]
        parts.append(
            f"## Decode: ms per generated token at context L ({settings['decode_tokens']} cached steps per run)\n\n"
            + _table(
                ["mixer", *contexts, f"{contexts[-1]} / {contexts[0]}"],
                [
                    [
                        name,
                        *(
                            f"{1e3 * row[c]:.2f} [{1e3 * decode_spread[name][c]['min']:.2f}–"
                            f"{1e3 * decode_spread[name][c]['max']:.2f}]"
                            for c in contexts
                        ),
                        f"{row[contexts[-1]] / row[contexts[0]]:.2f}×",
                    ]
                    for name, row in decode.items()
                ],
            )
        )
    if "cache" in results:
        parts.append(
            "## Cache bytes per layer after the prefill: measured (formula)\n\n"
            + _table(
                ["mixer", *contexts],
                [
                    [
                        name,
                        *(
                            f"{row[c]['measured_bytes_per_layer']} ({row[c]['formula_bytes_per_layer']})"
                            + ("" if row[c]["match"] else " ✗")
                            for c in contexts
                        ),
                    ]
                    for name, row in results["cache"].items()
                ],
            )
        )
    return "\n".join(parts)


def _optional(value: float | None, text: str) -> str:
    return "–" if value is None else text.format(value)


def train_markdown(train: dict) -> str:
    """The train section of bench.md: one row per length and model, the notes, the figure's link."""
    rows = []
    for length, row in train["lengths"].items():
        models = {**row["mixers"], **({"hf_qwen2 (sdpa)": row["hf_qwen2"]} if "hf_qwen2" in row else {})}
        for name, values in models.items():
            rows.append(
                [
                    length,
                    str(row["batch_size"]),
                    name,
                    f"{values['tokens_per_s']:.0f}",
                    f"{values['tokens_per_s_min']:.0f}–{values['tokens_per_s_max']:.0f}",
                    f"{values['ratio_to_standard']:.2f}×",
                    f"{values['analytic_ratio_to_standard']:.2f}×",
                    f"{values['mixer_flops_ratio_to_standard']:.2f}×",
                    f"{100 * values['mfu']:.1f}%",
                    "–" if values["peak_memory_bytes"] is None else _bytes(values["peak_memory_bytes"]),
                    _optional(values["page_faults_per_step"], "{:.0f}"),
                    _optional(values["warmup_seconds"], "{:.2f}"),
                ]
            )
    if train["tokens_per_step"] is None:
        batch_rule = f"B = {train['batch_size']} sequences per step (--train-batch-size)"
    else:
        batch_rule = f"B = {train['tokens_per_step']} // L sequences per step (--train-tokens-per-step), at least 1"
    header = ["L", "B", "model", "tokens/s", "range", "× standard", "analytic ×", "mixers' FLOPs ×", "MFU"]
    header += ["peak step memory", "page faults / step", "warm-up s"]
    parts = [
        f"## Training (full AdamW step; {batch_rule})\n\n"
        + _table(header, rows)
        + "\n× standard: the model's tokens/s over the standard model's at the same L, in this run. Analytic ×: "
        "the standard model's training FLOPs per step over the model's (mixers, SwiGLU and LM head: what the "
        "tokens/s ratio would be if time followed FLOPs); mixers' FLOPs ×: the same for the mixers alone ("
        + train["flops_note"]
        + "). Peak step memory: "
        + train["memory_method"]
        + ". Page faults: minor faults of the process per timed step (median), each a first touch of memory "
        f"fresh from the kernel. Warm-up s: the {train['warmup_steps']} untimed step(s) before the timed ones "
        "(first-call allocations and any compilation), kept out of tokens/s.\n"
    ]
    if len(train["lengths"]) >= 2:
        parts.append(f"![training tokens/s against L]({TRAIN_FIGURE}.png)\n")
    for length, row in train["lengths"].items():
        if "ratio" in row:
            ratio = row["ratio_over_repeats"]
            parts.append(
                f"L={length}: attnlab standard / transformers Qwen2: **{row['ratio']:.2f}×** (per-turn ratio "
                f"median {ratio['median']:.2f}, {ratio['min']:.2f}–{ratio['max']:.2f}).\n"
            )
    return "\n".join(parts)


def decode_figure(decode: dict, path: Path, title: str = "") -> Path:
    """Seconds per generated token against context length, one line per mixer, log-log."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    axes = fig.add_subplot()
    for name, row in decode.items():
        contexts = sorted(int(context) for context in row)
        axes.plot(contexts, [row[str(context)] for context in contexts], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("seconds per generated token")
    axes.set_title(f"Cached decoding{': ' + title if title else ''}", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    fig.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp")
    fig.savefig(temporary, format="png", dpi=150)
    temporary.replace(path)
    return path


__all__ = [
    "SECTIONS",
    "BenchSettings",
    "measure_matmul_peak",
    "model_forward_flops",
    "run_bench",
    "take_turns",
    "training_step",
]
