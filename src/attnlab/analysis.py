"""Why variants behave as they do: attention indicators (docs/method.md §6), pre-softmax activations, figures.

    summary = analyze_models(["runs/hybrid", "runs/uniform"], out="analysis", data="builtin", num_seqs=16)
    summary["layers"][0]["entropy"], summary["figures"]

Three pieces:

* Indicators of a layer's mixing maps, pure functions of a tensor of maps `[..., heads, L, L]` (rows =
  queries, causal, each row sums to 1), each averaged over the heads (docs/method.md §6, paper §4.4):
  `entropy`, `concentration`, `head_diversity`, `sink`, `local_focus`; `attention_indicators` gives all
  eight (`INDICATORS`).
* `ActivationStatistics`: a streaming summary of pre-softmax activations (exact count, min, max, max |x|,
  count above 10³; quantiles read off a fixed histogram), fed with the `mixer_scores` of the model's
  inspection API (for `nonapprox` the per-position scores s_j, for pairwise mixers the causal s_ij).
* `analyze_models`: runs checkpoints on held-out text and writes `OUT/indicators.json` and the figures
  (`attnlab.plots`). Each layer's map is consumed by a forward hook on its mixer as soon as the mixer
  returns it, and dropped before the next layer runs, so memory holds one layer's maps, never the whole
  model's (issue 5, item 3).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

INDICATORS = ("entropy", "conc", "headdiv", "sink", "locfoc0", "locfoc1", "locfoc2", "locfoc3")
NORMALISED_INDICATORS = ("entropy", "conc", "headdiv")  # min–max normalised for the radar plots (docs/method.md §6)
LOCAL_FOCUS_DISTANCES = (0, 1, 2, 3)
QUANTILES = (0.0, 0.001, 0.01, 0.25, 0.5, 0.75, 0.99, 0.999, 1.0)
OUTLIER_THRESHOLD = 1e3  # |pre-softmax activation| above this is the paper's failure signature (docs/method.md §6)
# Largest number of map entries (batch × heads × L × L) one forward may hold per layer: about 256 MB in
# float32. At L = 2048 with 14 heads (paper-500m) this is one sequence per forward.
MAP_ELEMENTS_PER_FORWARD = 1 << 26
MIN_SEQ_LEN = max(LOCAL_FOCUS_DISTANCES) + 1  # LocFoc_3 needs at least one entry


# ---------------------------------------------------------------------------------------------------------
# Indicators (docs/method.md §6). Input: maps [..., heads, L, L]; output: [...] in float64, averaged over heads.


def _check_maps(maps: torch.Tensor) -> int:
    if maps.dim() < 3 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"expected maps of shape [..., heads, L, L], got {tuple(maps.shape)}")
    return maps.shape[-1]


def _sum_map(values: torch.Tensor) -> torch.Tensor:
    """Sum over the last two dimensions: rows in the input's precision, then across rows in float64."""
    return values.sum(-1).double().sum(-1)


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """Entropy `H = −Σ_{a∈A} a·log a` of each head's whole L×L map, then the mean over heads (docs/method.md §6).

    The sum runs over every entry of the map (all rows), with 0·log 0 = 0; it is *not* divided by the
    number of rows, so it grows with L: a uniform causal map (A_ij = 1/(i+1)) has H = Σ_i log(i+1) = log L!,
    the largest value a causal map can have; the identity has H = 0.
    """
    _check_maps(maps)
    return (-_sum_map(torch.special.xlogy(maps, maps))).mean(-1)


def concentration(maps: torch.Tensor) -> torch.Tensor:
    """Concentration `Conc = ||A||_F`, the Frobenius norm of each head's map, mean over heads (docs/method.md §6).

    Between sqrt(H_L) (uniform causal map, H_L the L-th harmonic number) and sqrt(L) (every row one-hot).
    """
    _check_maps(maps)
    return _sum_map(maps * maps).sqrt().mean(-1)


def head_diversity(maps: torch.Tensor) -> torch.Tensor:
    """Head diversity `HeadDiv` (docs/method.md §6): at every causal position (i, j ≤ i) the standard deviation of
    the heads' values A_h[i, j], averaged over the L(L+1)/2 causal positions.

    The standard deviation is the *population* one (divisor = number of heads, `correction=0`): the layer's
    heads are all of its heads, not a sample of them. Identical heads give 0; a single head gives 0.
    """
    seq_len = _check_maps(maps)
    spread = maps.std(dim=-3, correction=0)  # [..., L, L]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=maps.device).tril()
    return _sum_map(spread * causal) / (seq_len * (seq_len + 1) / 2)


def sink(maps: torch.Tensor) -> torch.Tensor:
    """Sink `Σ_i A[i, 0] / L` (docs/method.md §6, the paper's A_{i,1}): the mean weight that the L queries give the
    first token, mean over heads. 1 when every query attends only to the first token."""
    seq_len = _check_maps(maps)
    return (maps[..., :, 0].double().sum(-1) / seq_len).mean(-1)


def local_focus(maps: torch.Tensor, distance: int) -> torch.Tensor:
    """Local focus `LocFoc_N` (docs/method.md §6): the mean of the N-th sub-diagonal A[i, i−N] (its L−N entries),
    i.e. the mean weight at relative distance N, mean over heads. N = 0 is the diagonal."""
    seq_len = _check_maps(maps)
    if not 0 <= distance < seq_len:
        raise ValueError(f"local focus at distance {distance} needs 0 <= distance < L = {seq_len}")
    diagonal = torch.diagonal(maps, offset=-distance, dim1=-2, dim2=-1)  # [..., heads, L − N]
    return diagonal.double().mean(-1).mean(-1)


def attention_indicators(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """All eight indicators of `INDICATORS` for maps [..., heads, L, L]; each value has shape [...]."""
    values = {
        "entropy": entropy(maps),
        "conc": concentration(maps),
        "headdiv": head_diversity(maps),
        "sink": sink(maps),
    }
    for distance in LOCAL_FOCUS_DISTANCES:
        values[f"locfoc{distance}"] = local_focus(maps, distance)
    return values


def min_max_normalise(values: Sequence[float]) -> list[float]:
    """(v − min) / (max − min) over `values` (docs/method.md §6: across layers and models compared).

    When every value is the same there is nothing to contrast, and every normalised value is 0.5.
    """
    low, high = min(values), max(values)
    if high == low:
        return [0.5 for _ in values]
    return [(value - low) / (high - low) for value in values]


# ---------------------------------------------------------------------------------------------------------
# Pre-softmax activations


class ActivationStatistics:
    """A streaming summary of pre-softmax activations; `update` with any number of tensors, then `summary`.

    Exact: the count, min, max, max |x|, min |x|, the number (and fraction) of |x| > 10³, and the mean.
    Quantiles come from a fixed histogram: bins of equal width `ln(10) / BINS_PER_DECADE` in
    t = asinh(x / LINEAR_SCALE), which is logarithmic in |x| for |x| ≫ 10⁻⁶ (32 bins per decade: each
    bin spans a factor 1.075) and linear around 0, covering |x| ≤ 10¹² (larger values fall in the end
    bins). A quantile is interpolated linearly in t inside its bin and clamped to the exact [min, max], so
    quantile 0 and 1 are exact and the others are within one bin (7.5 % of the value). The histogram is
    the same whatever the order and the batching of the updates, so streaming equals one pass.
    NaN entries (the masked, non-causal positions of `mixer_scores`) are ignored; ±inf is counted.
    """

    BINS_PER_DECADE = 32
    JSON_BINS_PER_DECADE = 8  # resolution of the |x| histogram written out by `summary`
    LINEAR_SCALE = 1e-6
    MAX_MAGNITUDE = 1e12

    def __init__(self) -> None:
        self.bin_width = math.log(10) / self.BINS_PER_DECADE
        self.half_bins = math.ceil(math.asinh(self.MAX_MAGNITUDE / self.LINEAR_SCALE) / self.bin_width)
        self.counts: torch.Tensor | None = None  # [2·half_bins] int64, on the device of the first update
        self.count = 0
        self.num_infinite = 0
        self.num_above_threshold = 0
        self.minimum = math.inf
        self.maximum = -math.inf
        self.min_abs = math.inf
        self.finite_sum = 0.0

    def update(self, values: torch.Tensor) -> None:
        """Add every non-NaN entry of `values` (any shape)."""
        values = values.detach().reshape(-1)
        values = values[~torch.isnan(values)].float()
        if values.numel() == 0:
            return
        if self.counts is None:
            self.counts = torch.zeros(2 * self.half_bins, dtype=torch.int64, device=values.device)
        magnitudes = values.abs()
        finite = torch.isfinite(values)
        self.count += values.numel()
        self.num_infinite += int((~finite).sum())
        self.num_above_threshold += int((magnitudes > OUTLIER_THRESHOLD).sum())
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        self.min_abs = min(self.min_abs, float(magnitudes.min()))
        self.finite_sum += float(values[finite].double().sum())
        self.counts += torch.bincount(self._bin_index(values), minlength=self.counts.numel())

    def _bin_index(self, values: torch.Tensor) -> torch.Tensor:
        position = torch.asinh(values / self.LINEAR_SCALE) / self.bin_width  # ±inf for huge or infinite x
        position = torch.clamp(torch.floor(position) + self.half_bins, 0, 2 * self.half_bins - 1)
        return position.long()

    def _coarse_histogram(self, abs_counts: list[int]) -> dict:
        """The |x| histogram at `JSON_BINS_PER_DECADE` (groups of fine bins) over its non-empty range, for
        plots that draw distributions: bin k spans [edges[k], edges[k+1])."""
        group = self.BINS_PER_DECADE // self.JSON_BINS_PER_DECADE
        grouped = [sum(abs_counts[k : k + group]) for k in range(0, len(abs_counts), group)]
        first = next(k for k, count in enumerate(grouped) if count)
        last = max(k for k, count in enumerate(grouped) if count)
        edges = [self._value_at((first + k) * group * self.bin_width) for k in range(last - first + 2)]
        return {"edges": [float(f"{edge:.6g}") for edge in edges], "counts": grouped[first : last + 1]}

    def _value_at(self, t: float) -> float:
        return self.LINEAR_SCALE * math.sinh(t)

    def _quantile(self, counts: list[int], first_edge: float, q: float, low: float, high: float) -> float:
        """The q-quantile of a histogram whose bin k spans t ∈ [first_edge + k·w, first_edge + (k+1)·w)."""
        if q <= 0:
            return low
        if q >= 1:
            return high
        target, cumulative = q * sum(counts), 0
        for index, count in enumerate(counts):
            if count and cumulative + count >= target:
                fraction = (target - cumulative) / count
                value = self._value_at(first_edge + (index + fraction) * self.bin_width)
                return min(max(value, low), high)
            cumulative += count
        return high

    def summary(self) -> dict | None:
        """A JSON-ready dict (None when nothing was added). Non-finite min/max/max_abs are written as None."""
        if self.count == 0:
            return None
        counts = self.counts.cpu().tolist()
        half = self.half_bins
        abs_counts = [counts[half + k] + counts[half - 1 - k] for k in range(half)]  # fold the sign away
        max_abs = max(abs(self.minimum), abs(self.maximum))
        finite_count = self.count - self.num_infinite
        return {
            "count": self.count,
            "num_infinite": self.num_infinite,
            "min": _finite_or_none(self.minimum),
            "max": _finite_or_none(self.maximum),
            "mean": self.finite_sum / finite_count if finite_count else None,
            "max_abs": _finite_or_none(max_abs),
            "num_above_1e3": self.num_above_threshold,
            "frac_above_1e3": self.num_above_threshold / self.count,
            "quantiles": {
                _quantile_key(q): _finite_or_none(
                    self._quantile(counts, -half * self.bin_width, q, self.minimum, self.maximum)
                )
                for q in QUANTILES
            },
            "abs_quantiles": {
                _quantile_key(q): _finite_or_none(self._quantile(abs_counts, 0.0, q, self.min_abs, max_abs))
                for q in QUANTILES
            },
            "abs_histogram": self._coarse_histogram(abs_counts),
            "quantile_method": (
                f"histogram with {self.BINS_PER_DECADE} bins per decade in asinh(x / {self.LINEAR_SCALE:g}), "
                "linear interpolation inside a bin, clamped to the exact min and max"
            ),
        }


def _quantile_key(q: float) -> str:
    return f"{q:g}"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------------
# Streaming accumulation over sequences, one layer at a time


class LayerAccumulator:
    """Running sums for one layer of one model: the indicators summed over sequences, the activation
    statistics, and (optionally) the sum of the head-averaged maps for a mean-map heatmap."""

    def __init__(self, mixer: str, has_map: bool, keep_mean_map: bool) -> None:
        self.mixer = mixer
        self.has_map = has_map
        self.keep_mean_map = keep_mean_map and has_map
        self.num_sequences = 0
        self.indicator_sums = dict.fromkeys(INDICATORS, 0.0)
        self.activations = ActivationStatistics()
        self.map_sum: torch.Tensor | None = None  # [L, L]

    def add_maps(self, maps: torch.Tensor) -> None:
        """maps: [batch, heads, L, L], one map per head for each sequence of the batch."""
        for name, values in attention_indicators(maps).items():
            self.indicator_sums[name] += float(values.sum())
        self.num_sequences += maps.shape[0]
        if self.keep_mean_map:
            head_mean = maps.float().mean(1).sum(0)  # [L, L]
            self.map_sum = head_mean if self.map_sum is None else self.map_sum + head_mean

    def add_scores(self, scores: torch.Tensor) -> None:
        self.activations.update(scores)

    def indicators(self) -> dict[str, float | None]:
        if not self.has_map or self.num_sequences == 0:
            return dict.fromkeys(INDICATORS)
        # NaN (a diverged model's maps) is written as null: JSON has no NaN.
        return {name: _finite_or_none(total / self.num_sequences) for name, total in self.indicator_sums.items()}

    def mean_map(self) -> torch.Tensor | None:
        if self.map_sum is None:
            return None
        return (self.map_sum / self.num_sequences).cpu()


def _consume_mixer_outputs(accumulators: list[LayerAccumulator]):
    """A forward hook per mixer that feeds its map and scores to the layer's accumulator and then drops them
    from the output, so the model's `attentions`/`mixer_scores` tuples hold None and no map outlives its layer.

    The shadow streams (rndembqk/fixedseqqk) run the layers without asking for weights; those calls are
    left alone."""

    def hook(module, args, kwargs, output):
        inputs = args[1] if len(args) > 1 else kwargs["inputs"]
        if not (inputs.need_weights or inputs.need_scores):
            return None
        accumulator = accumulators[module.layer_idx]
        if output.weights is not None:
            accumulator.add_maps(output.weights)
        if output.scores is not None:
            accumulator.add_scores(output.scores)
        return dataclasses.replace(output, weights=None, scores=None)

    return hook


@torch.no_grad()
def accumulate_layers(
    model, sequences: torch.Tensor, batch_size: int, keep_mean_maps: bool = False
) -> list[LayerAccumulator]:
    """Run `model` (an AttnLabForCausalLM) over `sequences` [n, L] and return one accumulator per layer.

    Forwards take at most `batch_size` sequences, fewer when one layer's maps would exceed
    `MAP_ELEMENTS_PER_FORWARD` entries (at large L: one sequence per forward).
    """
    config = model.config
    layers = model.model.layers
    seq_len = sequences.shape[1]
    accumulators = [
        LayerAccumulator(layer.mixer_type, layer.self_attn.has_mixing_matrix, keep_mean_maps) for layer in layers
    ]
    per_forward = max(1, min(batch_size, MAP_ELEMENTS_PER_FORWARD // (config.num_attention_heads * seq_len * seq_len)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hook = _consume_mixer_outputs(accumulators)
    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        for start in range(0, sequences.shape[0], per_forward):
            input_ids = sequences[start : start + per_forward].to(device)
            model(input_ids=input_ids, output_attentions=True, output_mixer_scores=True, return_logits=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return accumulators


# ---------------------------------------------------------------------------------------------------------
# analyze_models


def _checkpoint_config(path: Path) -> dict:
    """The saved config of a checkpoint, checked as far as can be without loading it (one-line errors)."""
    from .evaluation import check_checkpoint, find_tokenizer_folder

    config = check_checkpoint(path)
    find_tokenizer_folder(path)
    return config


def find_metrics_files(checkpoints: Sequence[str | Path]) -> list[Path]:
    """The `metrics.jsonl` of each checkpoint's run: in the folder itself or, for a `checkpoint-<step>`
    folder, in its run folder (each run once, in order)."""
    found: list[Path] = []
    for checkpoint in checkpoints:
        path = Path(checkpoint)
        for candidate in (path / "metrics.jsonl", path.parent / "metrics.jsonl"):
            if candidate.is_file():
                if candidate.resolve() not in [f.resolve() for f in found]:
                    found.append(candidate)
                break
    return found


def _layer_entries(label: str, accumulators: list[LayerAccumulator]) -> list[dict]:
    entries = []
    for index, accumulator in enumerate(accumulators):
        entry = {"model": label, "layer": index, "mixer": accumulator.mixer, "has_map": accumulator.has_map}
        entry.update(accumulator.indicators())
        entry["logits"] = accumulator.activations.summary()
        entries.append(entry)
    return entries


def add_normalised(layers: list[dict]) -> None:
    """Give every layer entry `normalised`: entropy, conc, headdiv min–max normalised across all entries
    with a map (all layers of all models compared, docs/method.md §6); None for layers without a map."""
    for entry in layers:
        entry["normalised"] = dict.fromkeys(NORMALISED_INDICATORS)
    for name in NORMALISED_INDICATORS:
        with_value = [entry for entry in layers if entry["has_map"] and entry[name] is not None]
        if not with_value:
            continue
        for entry, value in zip(with_value, min_max_normalise([entry[name] for entry in with_value])):
            entry["normalised"][name] = value


def _check_arguments(checkpoints, out, data, num_seqs, seq_len, batch_size, heatmap_model, metrics_files) -> None:
    from .synthetic import is_task_spec

    if isinstance(checkpoints, (str, Path)) or not checkpoints:
        raise ValueError("give a list of one or more checkpoint folders to analyze")
    if not isinstance(num_seqs, int) or num_seqs < 1:
        raise ValueError(f"num_seqs must be a positive integer (sequences of held-out text), got {num_seqs!r}")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN):
        raise ValueError(f"seq_len must be an integer >= {MIN_SEQ_LEN} (LocFoc_3 needs 4 positions), got {seq_len!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(heatmap_model, int) or not 0 <= heatmap_model < len(checkpoints):
        raise ValueError(
            f"heatmap_model must index the checkpoints (0 to {len(checkpoints) - 1}), got {heatmap_model!r}"
        )
    if isinstance(data, str) and is_task_spec(data):
        raise ValueError(
            f"--data {data} is a synthetic task, which has no text to analyse; analyze needs a text corpus "
            "(builtin, hf:<name> or text files: the --data the corpus runs were trained on)"
        )
    for path in metrics_files or []:
        if not _metrics_path(path).is_file():
            raise ValueError(
                f"metrics file {_metrics_path(path)} does not exist; give a run folder or its metrics.jsonl"
            )
    check_output_folder(Path(out), "indicators.json and the figures")


def check_output_folder(out: Path, contents: str) -> None:
    """Refuse, with one line and before any work, an output folder that cannot be written: an existing file,
    a folder whose parent does not exist, or a place where nothing can be created. Leaves nothing behind: the
    folder itself is created only when the results are written."""
    from .runconfig import cannot_create_in

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give a folder for {contents}")
    place = out if out.is_dir() else out.parent
    if not place.is_dir():
        raise ValueError(f"--out {out}: folder {place} does not exist")
    reason = cannot_create_in(place)
    if reason:
        raise ValueError(f"--out {out}: cannot create anything in {place} ({reason})")


def _check_metrics(metrics: Sequence[Path]) -> None:
    """Read every metrics file for the loss curves now (`plots.read_metrics`), so that a file with no training
    records fails in one line before any model runs rather than after."""
    from .plots import read_metrics

    for path in metrics:
        read_metrics(path)


def _metrics_path(path: str | Path) -> Path:
    """A run folder stands for its metrics.jsonl."""
    path = Path(path)
    return path / "metrics.jsonl" if path.is_dir() else path


def _resolve_seq_len(seq_len: int | None, configs: list[dict], checkpoints: list[Path]) -> int:
    """The analysis length: `seq_len`, or the shortest length the models compared were trained on (their
    max_position_embeddings when unknown): one common L, so that L-dependent indicators like entropy
    compare across models, and no positions the models never saw in training."""
    from .evaluation import trained_seq_len
    from .mixers import get_mixer
    from .mixers.base import SHADOW_SOURCES

    limits, defaults = [], []
    for path, config in zip(checkpoints, configs):
        limit = int(config.get("max_position_embeddings", 0))
        if any(get_mixer(name).qk_source in SHADOW_SOURCES for name in config.get("mixer_types") or []):
            limit = min(limit, int(config.get("shadow_seq_len", limit)))
        limits.append((limit, path))
        defaults.append(min(limit, trained_seq_len(path) or limit))
    if seq_len is None:
        seq_len = min(defaults)
        if seq_len < MIN_SEQ_LEN:
            raise ValueError(f"the models take at most {seq_len} tokens; the indicators need seq_len >= {MIN_SEQ_LEN}")
        return seq_len
    for limit, path in limits:
        if seq_len > limit:
            raise ValueError(
                f"seq_len {seq_len} exceeds the {limit} positions that {path} was built for "
                f"(max_position_embeddings); use --seq-len {limit} or less"
            )
    return seq_len


def _fewer_sequences_note(data: str, available: int, requested: int, seq_len: int, label: str, models: int) -> str:
    """The one line that says the held-out text gave fewer sequences than `--num-seqs` asked for."""
    whose = f" with {label}'s tokenizer" if models > 1 else ""
    return (
        f"attnlab: note: the held-out (valid) split of {data}{whose} holds only {available} sequence(s) of "
        f"{seq_len} tokens, so {available} are analysed, not the {requested} asked for (--num-seqs); use more "
        "data or a shorter --seq-len for more"
    )


def analyze_models(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    data: str = "builtin",
    num_seqs: int = 16,
    seq_len: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    metrics_files: Sequence[str | Path] | None = None,
    heatmap_model: int = 0,
) -> dict:
    """Indicators and activation statistics of every layer of each checkpoint, on held-out text; figures.

    Each model reads the first `num_seqs` sequences of `seq_len` tokens of the `valid` split of `data`
    (`attnlab.data.heldout_sequences`, with the model's own tokenizer); `seq_len` defaults to the shortest
    training length of the models (see `_resolve_seq_len`), so every model is analysed at the same L. Indicators are the
    per-sequence values (docs/method.md §6, see `attention_indicators`) averaged over the sequences; activation
    statistics pool every causal score of every sequence (`ActivationStatistics`).

    Writes `OUT/indicators.json` (atomically):
        {"models": [{"checkpoint", "label", "mixer_types", "seq_len", "num_sequences"}, ...],
         "layers": [{"model": label, "layer": i, "mixer", "has_map", "entropy", "conc", "headdiv", "sink",
                     "locfoc0".."locfoc3", "logits": {...ActivationStatistics.summary()},
                     "normalised": {"entropy", "conc", "headdiv"}}, ...],   # per model, then per layer
         "settings": {...}}
    `mlp` layers have `has_map: false` and None (null) indicators, logits and normalised values.
    Figures in OUT (PNG and SVG, see `attnlab.plots`): radar plots, activation box plots, the mean attention
    maps of checkpoint number `heatmap_model`, and loss curves of `metrics_files` (run folders or their
    metrics.jsonl; None: those found beside the checkpoints, `find_metrics_files`; []: no loss curves).

    `out` is created (its parent must exist) only when the results are written. When the held-out text
    holds fewer than `num_seqs` sequences, every one is analysed and a note line on stderr says so.

    Returns the indicators dict plus "indicators_path" and "figures" (the figure paths, str).
    Raises ValueError with one line for bad input. The arguments, `out` (an existing file, or a place where
    nothing can be created), `data` (a synthetic task has no text), the checkpoints' configs and the metrics
    files' records are all checked before any model is loaded.
    """
    from . import plots
    from .checkpoint import checkpoint_labels
    from .data import heldout_sequences, open_corpus
    from .evaluation import load_checkpoint
    from .runconfig import write_text_atomic

    _check_arguments(checkpoints, out, data, num_seqs, seq_len, batch_size, heatmap_model, metrics_files)
    paths = [Path(checkpoint) for checkpoint in checkpoints]
    configs = [_checkpoint_config(path) for path in paths]
    seq_len = _resolve_seq_len(seq_len, configs, paths)
    metrics = find_metrics_files(paths) if metrics_files is None else [_metrics_path(path) for path in metrics_files]
    _check_metrics(metrics)
    labels = checkpoint_labels(paths)
    corpus = open_corpus(data)
    out = Path(out)

    models, layers, mean_maps, noted = [], [], None, set()
    for index, (path, label) in enumerate(zip(paths, labels)):
        loaded = load_checkpoint(path, device=device)
        sequences = heldout_sequences(corpus, loaded.tokenizer, seq_len=seq_len, max_sequences=num_seqs)
        if sequences.shape[0] < num_seqs and sequences.shape[0] not in noted:
            noted.add(sequences.shape[0])
            print(
                _fewer_sequences_note(data, sequences.shape[0], num_seqs, seq_len, label, len(paths)), file=sys.stderr
            )
        keep_maps = index == heatmap_model
        accumulators = accumulate_layers(loaded.model, sequences, batch_size, keep_mean_maps=keep_maps)
        if keep_maps:
            mean_maps = [accumulator.mean_map() for accumulator in accumulators]
        models.append(
            {
                "checkpoint": str(path),
                "label": label,
                "mixer_types": list(loaded.model.config.mixer_types),
                "seq_len": seq_len,
                "num_sequences": int(sequences.shape[0]),
            }
        )
        layers.extend(_layer_entries(label, accumulators))
        del loaded, accumulators
    add_normalised(layers)
    indicators = {
        "models": models,
        "layers": layers,
        "settings": {
            "data": data,
            "split": "valid",
            "seq_len": seq_len,
            "num_seqs_requested": num_seqs,
            "definitions": {
                "entropy": "-sum of a*log(a) over all entries of a head's LxL map (not divided by L), mean over heads",
                "conc": "Frobenius norm of a head's map, mean over heads",
                "headdiv": "population std across heads at each causal position, mean over the L(L+1)/2 positions",
                "sink": "sum_i A[i,0] / L, mean over heads",
                "locfocN": "mean of the N-th sub-diagonal A[i,i-N] (L-N entries), mean over heads",
                "averaging": "per-sequence values averaged over sequences",
                "normalised": "min-max over all layers with a map of all models; 0.5 when all values are equal",
                "logits": "pre-softmax activations (mixer_scores): causal s_ij, or s_j for nonapprox",
            },
        },
    }
    out.mkdir(exist_ok=True)  # only now: a failure above leaves no empty folder behind
    indicators_path = out / "indicators.json"
    write_text_atomic(indicators_path, json.dumps(indicators, indent=1, allow_nan=False) + "\n")

    figures = plots.radar_plots(indicators, out) + plots.activation_boxplots(indicators, out)
    if mean_maps is not None:
        figures += plots.attention_heatmaps(
            mean_maps,
            models[heatmap_model]["mixer_types"],
            labels[heatmap_model],
            out,
            num_sequences=models[heatmap_model]["num_sequences"],
        )
    if metrics:
        figures += plots.loss_curves(metrics, out)
    return {**indicators, "indicators_path": str(indicators_path), "figures": [str(path) for path in figures]}


__all__ = [
    "INDICATORS",
    "NORMALISED_INDICATORS",
    "QUANTILES",
    "ActivationStatistics",
    "LayerAccumulator",
    "accumulate_layers",
    "add_normalised",
    "analyze_models",
    "attention_indicators",
    "concentration",
    "entropy",
    "find_metrics_files",
    "head_diversity",
    "local_focus",
    "min_max_normalise",
    "sink",
]
