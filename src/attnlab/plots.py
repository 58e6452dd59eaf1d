"""The analysis figures (issue 5): radar plots of the attention indicators (paper Fig. 1/7/8), per-layer
pre-softmax activation distributions (Fig. 2/6), training-loss curves (Fig. 5), mean attention maps; and the
placement study's share sweep (issue 7: perplexity and recall against the number of standard layers).

    radar_plots(indicators, "analysis")            # indicators: the dict of analysis.analyze_models
    activation_boxplots(indicators, "analysis")
    loss_curves(["runs/a/metrics.jsonl", "runs/b/metrics.jsonl"], "analysis")
    attention_heatmaps(mean_maps, mixer_types, "runs/a", "analysis")
    share_sweep(points, depth, "mlp", "figures")     # points: report.placement_section's

Each function writes `<name>.png` and `<name>.svg` into a folder and returns the two paths. Figures are
`matplotlib.figure.Figure` objects (PNG through the Agg renderer): no pyplot, no global backend state, no
figure left open. Layers are numbered from 0, as in `indicators.json` and `config.mixer_types`. Grids of
per-layer panels have at most 6 columns (4 up to 12 layers), so 4–24 layers stay readable.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, FuncFormatter, NullFormatter

PANEL_INCHES = 2.9  # width and height of one per-layer panel
MIN_FIGURE_WIDTH = 7.0
LOCAL_FOCUS_SCALE = 2.0  # the paper doubles LocFoc on its radar plots for visibility (docs/method.md §6)
# Radar axes: (label, where the value comes from).
RADAR_AXES = (
    ("H", ("normalised", "entropy")),
    ("C", ("normalised", "conc")),
    ("HD", ("normalised", "headdiv")),
    (f"LF×{LOCAL_FOCUS_SCALE:g}", ("locfoc0",)),
    ("S", ("sink",)),
)
RADAR_CAPTION = (
    "H entropy, C concentration, HD head diversity: min–max normalised over all layers and models; "
    f"LF local focus LocFoc₀ × {LOCAL_FOCUS_SCALE:g} (doubled for visibility, as in the paper); S sink (absolute)"
)
ACTIVATION_FLOOR = 1e-6  # |x| below this is drawn at the floor of the log axis
OUTLIER_LINE = 1e3
HEATMAP_PIXELS = 256  # larger maps are block-averaged to at most this many rows and columns


def _save(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Write `<name>.png` and `<name>.svg` (each via a temporary file and a rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for extension, options in (("png", {"dpi": 150}), ("svg", {})):
        path = out_dir / f"{name}.{extension}"
        temporary = out_dir / f".{name}.{extension}.tmp"
        fig.savefig(temporary, format=extension, **options)
        temporary.replace(path)
        paths.append(path)
    return paths


def _grid(panels: int) -> tuple[int, int]:
    columns = panels if panels <= 4 else 4 if panels <= 12 else 6
    return math.ceil(panels / columns), columns


def _model_colours(count: int) -> list:
    """Distinct colours: tab10, or tab20 for more than ten models (a placement study has fifteen)."""
    size = 10 if count <= 10 else 20
    palette = colormaps[f"tab{size}"]
    return [palette(index % size) for index in range(count)]


def _layers_by_index(indicators: dict) -> tuple[list[str], dict[int, dict[str, dict]]]:
    """The model labels in order, and {layer index: {model label: layer entry}}."""
    labels = [model["label"] for model in indicators["models"]]
    by_index: dict[int, dict[str, dict]] = {}
    for entry in indicators["layers"]:
        by_index.setdefault(entry["layer"], {})[entry["model"]] = entry
    return labels, dict(sorted(by_index.items()))


def _mixer_names(entries: dict[str, dict], most: int = 3) -> str:
    """The layer's mixers across the models ("standard / mlp"), or their count ("7 mixers") when there are
    more than `most` (the legend names the models)."""
    names = list(dict.fromkeys(entry["mixer"] for entry in entries.values()))
    return " / ".join(names) if len(names) <= most else f"{len(names)} mixers"


def _radar_value(entry: dict, source: tuple[str, ...]) -> float:
    value = entry
    for key in source:
        value = value[key]
    if value is None:
        return 0.0
    return value * LOCAL_FOCUS_SCALE if source == ("locfoc0",) else value


def radar_plots(indicators: dict, out_dir: str | Path, name: str = "radar") -> list[Path]:
    """Write `radar_figure(indicators)` as `<name>.png` and `<name>.svg`."""
    return _save(radar_figure(indicators), out_dir, name)


def radar_figure(indicators: dict) -> Figure:
    """One radar panel per layer (Fig. 1 style): axes H, C, HD (min–max normalised), LF (LocFoc₀ doubled),
    S (sink); one polygon per model. Layers without a map in any model say so."""
    labels, by_index = _layers_by_index(indicators)
    colours = dict(zip(labels, _model_colours(len(labels))))
    rows, columns = _grid(len(by_index))
    width = max(MIN_FIGURE_WIDTH, PANEL_INCHES * columns)
    # Polar panels keep a square aspect: rows get extra height for the panel title and the spoke labels.
    fig = Figure(figsize=(width, (PANEL_INCHES + 0.5) * rows + 1.6), layout="constrained")
    axes = fig.subplots(rows, columns, subplot_kw={"projection": "polar"}, squeeze=False).ravel()
    angles = np.linspace(0, 2 * np.pi, len(RADAR_AXES), endpoint=False)
    closed = np.append(angles, angles[0])
    largest = max(
        [1.0]
        + [
            _radar_value(e, s)
            for entries in by_index.values()
            for e in entries.values()
            if e["has_map"]
            for _, s in RADAR_AXES
        ]
    )
    for ax, (layer, entries) in zip(axes, by_index.items()):
        ax.set_title(f"layer {layer}: {_mixer_names(entries)}", fontsize=9, pad=12)
        mapped = {label: entry for label, entry in entries.items() if entry["has_map"]}
        if not mapped:
            # Spoke labels kept but transparent: the panel takes the same room as its neighbours.
            ax.set_xticks(angles, [axis for axis, _ in RADAR_AXES], fontsize=8)
            ax.tick_params(axis="x", labelcolor="none")
            _blank_panel(ax, keep_xticks=True)
            continue
        for label, entry in mapped.items():
            values = [_radar_value(entry, source) for _, source in RADAR_AXES]
            values.append(values[0])
            ax.plot(closed, values, color=colours[label], linewidth=1.5)
            ax.fill(closed, values, color=colours[label], alpha=0.15)
        ax.set_theta_offset(np.pi / 2)  # the first axis (H) points up
        ax.set_xticks(angles, [axis for axis, _ in RADAR_AXES], fontsize=8)
        ax.set_ylim(0, largest * 1.05)
        ticks = [0.5, 1.0] if largest <= 1.5 else [0.5, 1.0, largest]
        ax.set_yticks(ticks, [f"{tick:.2g}" for tick in ticks])
        ax.set_rlabel_position(36)  # radial tick labels between the H and C spokes
        ax.tick_params(axis="y", labelsize=6, labelcolor="0.5")
    for ax in axes[len(by_index) :]:
        ax.remove()
    handles = [Line2D([], [], color=colours[label], linewidth=2) for label in labels]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=9, frameon=False)
    fig.suptitle("Attention indicators per layer\n" + _wrap(RADAR_CAPTION, width), fontsize=9)
    return fig


def _blank_panel(ax, keep_xticks: bool = False) -> None:
    """A layer without a map: no grid, ticks or frame (the title stays aligned with its row), and a note."""
    ax.grid(False)
    if not keep_xticks:
        ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.patch.set_visible(False)
    if ax.name != "polar":  # polar panels are square already
        ax.set_box_aspect(1)  # square like the map panels, so titles of a row line up
    ax.text(
        0.5, 0.5, "no map\n(token-wise mlp)", ha="center", va="center", fontsize=9, color="0.4", transform=ax.transAxes
    )


def _wrap(text: str, width_inches: float, characters_per_inch: float = 15.0) -> str:
    """Break a caption into lines that fit the figure width (at about 8 pt)."""
    return "\n".join(textwrap.wrap(text, width=max(40, int(width_inches * characters_per_inch))))


def _box_stats(entry: dict) -> dict | None:
    """matplotlib `bxp` statistics of |x| for one layer: box 25–75 %, median, whiskers 1–99 %, flier = max."""
    logits = entry.get("logits")
    if not logits:
        return None
    quantiles = logits["abs_quantiles"]
    floor = lambda value: ACTIVATION_FLOOR if value is None else max(value, ACTIVATION_FLOOR)
    max_abs = logits["max_abs"] if logits["max_abs"] is not None else quantiles["1"]
    return {
        "whislo": floor(quantiles["0.01"]),
        "q1": floor(quantiles["0.25"]),
        "med": floor(quantiles["0.5"]),
        "q3": floor(quantiles["0.75"]),
        "whishi": floor(quantiles["0.99"]),
        "fliers": [floor(max_abs)],
    }


def activation_boxplots(indicators: dict, out_dir: str | Path, name: str = "activations") -> list[Path]:
    """Write `activation_figure(indicators)` as `<name>.png` and `<name>.svg`."""
    return _save(activation_figure(indicators), out_dir, name)


def activation_figure(indicators: dict) -> Figure:
    """Per-layer box plots of |pre-softmax activation| on a log scale (Fig. 2 style), one box per layer and
    model, with a reference line at 10³ (the outlier threshold of docs/method.md §6)."""
    labels, by_index = _layers_by_index(indicators)
    colours = dict(zip(labels, _model_colours(len(labels))))
    layers = list(by_index)
    slot = 0.8 / len(labels)  # each layer gets 0.8 of the axis unit, shared by the models
    width = max(MIN_FIGURE_WIDTH, 1.5 + len(layers) * max(0.45, 0.3 * len(labels)))
    fig = Figure(figsize=(width, 5.0), layout="constrained")
    ax = fig.subplots()
    values = []
    for number, label in enumerate(labels):
        stats, positions = [], []
        for position, layer in enumerate(layers):
            entry = by_index[layer].get(label)
            box = _box_stats(entry) if entry else None
            if box is not None:
                stats.append(box)
                positions.append(position - 0.4 + slot * (number + 0.5))
                values.extend([box["whislo"], box["fliers"][0]])
        if stats:
            colour = colours[label]
            ax.bxp(
                stats,
                positions=positions,
                widths=slot * 0.85,
                patch_artist=True,
                showfliers=True,
                boxprops={"facecolor": colour, "alpha": 0.55, "edgecolor": colour},
                medianprops={"color": "black", "linewidth": 1.2},
                whiskerprops={"color": colour},
                capprops={"color": colour},
                flierprops={"marker": "o", "markersize": 4, "markerfacecolor": colour, "markeredgecolor": "black"},
            )
    ax.set_yscale("log")
    ax.axhline(OUTLIER_LINE, color="tab:red", linestyle="--", linewidth=1)
    low = min(values, default=ACTIVATION_FLOOR)
    high = max(values + [OUTLIER_LINE], default=OUTLIER_LINE)
    ax.set_ylim(low / 3, high * 3)
    for position, layer in enumerate(layers):
        if not any(entry.get("logits") for entry in by_index[layer].values()):
            ax.text(
                position,
                0.03,
                "no map",
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=7,
                color="0.4",
                transform=ax.get_xaxis_transform(),
            )
    many = len(layers) > 6
    ticks = [
        f"{layer} {_mixer_names(by_index[layer])}" if many else f"{layer}\n{_mixer_names(by_index[layer])}"
        for layer in layers
    ]
    ax.set_xticks(range(len(layers)), ticks, rotation=90 if many else 0, fontsize=8)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xlabel("layer")
    ax.set_ylabel("|pre-softmax activation| (log scale)")
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.set_title(
        "box: 25–75 %, line: median, whiskers: 1–99 %, dot: max |x|\n"
        "nonapprox: per-position scores s_j; other mixers: causal pairwise scores s_ij",
        fontsize=8,
    )
    handles = [Patch(facecolor=colours[label], alpha=0.55, edgecolor=colours[label]) for label in labels]
    handles.append(Line2D([], [], color="tab:red", linestyle="--"))
    ax.legend(handles, [*labels, "|x| = 10³ (outliers above)"], fontsize=8, loc="upper left")
    fig.suptitle("Pre-softmax activations per layer", fontsize=12)
    return fig


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's `metrics.jsonl` that have `tokens` and a `loss` or `eval_loss`.

    A last line cut short (a run still writing) is skipped; any other bad line is a ValueError (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file {path} does not exist; give a run's metrics.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not a JSON record; is this a metrics.jsonl?") from None
        if isinstance(record, dict) and "tokens" in record and ("loss" in record or "eval_loss" in record):
            records.append(record)
    if not records:
        raise ValueError(f"{path} has no records with 'tokens' and 'loss'; is this an attnlab metrics.jsonl?")
    return records


def _moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` values (shorter at the start)."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def loss_curves(
    metrics_files: Sequence[str | Path],
    out_dir: str | Path,
    name: str = "loss_curves",
    labels: Sequence[str] | None = None,
) -> list[Path]:
    """Write `loss_figure(metrics_files, labels)` as `<name>.png` and `<name>.svg`."""
    return _save(loss_figure(metrics_files, labels), out_dir, name)


def loss_figure(metrics_files: Sequence[str | Path], labels: Sequence[str] | None = None) -> Figure:
    """Training loss against tokens seen, one line per run (Fig. 5 style): the raw per-step loss faintly,
    its moving mean over 2 % of the steps solid, the held-out loss (`eval_loss`) as markers.
    Runs are labelled by their folder names unless `labels` are given."""
    from .checkpoint import checkpoint_labels

    paths = [Path(path) for path in metrics_files]
    if not paths:
        raise ValueError("give at least one metrics.jsonl to plot loss curves")
    runs = [read_metrics(path) for path in paths]
    labels = list(labels) if labels is not None else checkpoint_labels([path.resolve().parent for path in paths])
    colours = _model_colours(len(paths))
    fig = Figure(figsize=(MIN_FIGURE_WIDTH + 1, 4.8), layout="constrained")
    ax = fig.subplots()
    for records, label, colour in zip(runs, labels, colours):
        train = [r for r in records if "loss" in r and r["loss"] is not None and math.isfinite(r["loss"])]
        held_out = [r for r in records if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])]
        if train:
            tokens = np.array([r["tokens"] for r in train], dtype=float)
            loss = np.array([r["loss"] for r in train], dtype=float)
            window = max(1, len(loss) // 50)
            ax.plot(tokens, loss, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(tokens, _moving_mean(loss, window), color=colour, linewidth=1.8, label=label)
        if held_out:
            ax.plot(
                [r["tokens"] for r in held_out],
                [r["eval_loss"] for r in held_out],
                "o",
                color=colour,
                markeredgecolor="black",
                markersize=5,
                label=None if train else label,
            )
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    if len(paths) > 6:  # many runs: the legend goes beside the axes instead of over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.set_figwidth(MIN_FIGURE_WIDTH + 4)
    else:
        ax.legend(fontsize=8)
    ax.set_title("faint: per-step loss; solid: moving mean over 2 % of the steps; dots: held-out loss", fontsize=8)
    fig.suptitle("Training loss", fontsize=12)
    return fig


def _block_average(matrix: np.ndarray, pixels: int) -> np.ndarray:
    """Mean over square blocks so that the result has at most `pixels` rows and columns (NaN ignored)."""
    size = matrix.shape[0]
    factor = math.ceil(size / pixels)
    if factor == 1:
        return matrix
    padded_size = math.ceil(size / factor) * factor
    padded = np.full((padded_size, padded_size), np.nan)
    padded[:size, :size] = matrix
    blocks = padded.reshape(padded_size // factor, factor, padded_size // factor, factor)
    with np.errstate(invalid="ignore"):
        counts = np.sum(~np.isnan(blocks), axis=(1, 3))
        sums = np.nansum(blocks, axis=(1, 3))
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def attention_heatmaps(
    mean_maps: Sequence,
    mixer_types: Sequence[str],
    label: str,
    out_dir: str | Path,
    name: str = "heatmaps",
    num_sequences: int | None = None,
) -> list[Path]:
    """Write `heatmap_figure(...)` as `<name>.png` and `<name>.svg`."""
    return _save(heatmap_figure(mean_maps, mixer_types, label, num_sequences), out_dir, name)


def heatmap_figure(
    mean_maps: Sequence, mixer_types: Sequence[str], label: str, num_sequences: int | None = None
) -> Figure:
    """One panel per layer with the model's mean attention map (mean over heads and sequences), rows =
    queries i, columns = keys j, on a log colour scale; positions j > i are blank, layers without a map
    (None, the `mlp` mixer) say so. Maps longer than 256 positions are block-averaged for display."""
    maps = [None if m is None else np.asarray(m, dtype=float) for m in mean_maps]
    seq_len = next((m.shape[0] for m in maps if m is not None), 1)
    rows, columns = _grid(len(maps))
    width = max(MIN_FIGURE_WIDTH, PANEL_INCHES * columns + 1.0)
    fig = Figure(figsize=(width, (PANEL_INCHES + 0.4) * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    colour_map = colormaps["viridis"].with_extremes(bad="white")
    norm = LogNorm(vmin=min(1e-2, 0.1 / seq_len), vmax=1.0)
    image = None
    for index, (ax, matrix) in enumerate(zip(axes.ravel(), maps)):
        ax.set_title(f"layer {index}: {mixer_types[index]}", fontsize=9)
        if matrix is None:
            _blank_panel(ax)
            continue
        size = matrix.shape[0]
        masked = np.where(np.tri(size, dtype=bool), np.maximum(matrix, norm.vmin), np.nan)  # j > i: blank
        image = ax.imshow(
            _block_average(masked, HEATMAP_PIXELS),
            cmap=colour_map,
            norm=norm,
            extent=(-0.5, size - 0.5, size - 0.5, -0.5),
            interpolation="nearest",
        )
        if index >= len(maps) - columns:  # axis titles on the outer panels only
            ax.set_xlabel("key position j", fontsize=8)
        if index % columns == 0:
            ax.set_ylabel("query position i", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(maps) :]:
        ax.remove()
    if image is not None:
        fig.colorbar(
            image, ax=[ax for ax in axes.ravel()[: len(maps)]], shrink=0.8, label="mean attention weight (log scale)"
        )
    over = f"heads and {num_sequences} sequences" if num_sequences else "heads and sequences"
    fig.suptitle(f"Mean attention maps of {label} (mean over {over}; L = {seq_len})", fontsize=12)
    return fig


PLACEMENT_MARKERS = ("s", "^", "v", "D", "P", "X", "*", "h", "<", ">")


def share_sweep(
    points: Sequence[dict],
    depth: int,
    mixer: str,
    out_dir: str | Path,
    name: str = "share_sweep",
    close_ratio: float | None = None,
) -> list[Path]:
    """Write `share_sweep_figure(...)` as `<name>.png` and `<name>.svg`."""
    return _save(share_sweep_figure(points, depth, mixer, close_ratio), out_dir, name)


def share_sweep_figure(points: Sequence[dict], depth: int, mixer: str, close_ratio: float | None = None) -> Figure:
    """Held-out perplexity (relative to standard, log scale) and recall accuracy against the number of
    standard layers, 0 (uniform `mixer`) to `depth` (all standard). Each point is a dict with
    `standard_layers`, `label`, `ppl_ratio` and `recall` (either may be None) and `spread` (True for the
    share sweep's evenly spread layers, joined by a line; the other placements are single markers).
    `close_ratio` draws the "close to standard" perplexity threshold."""
    if not points:
        raise ValueError("give at least one placement point to plot the share sweep")
    fig = Figure(figsize=(MIN_FIGURE_WIDTH + 4, 4.4), layout="constrained")
    ppl_ax, recall_ax = fig.subplots(1, 2)
    spread = sorted((p for p in points if p["spread"]), key=lambda p: p["standard_layers"])
    others = [p for p in points if not p["spread"]]
    # placements with the same number of standard layers sit side by side around it, so none hides another
    offsets = []
    for index, point in enumerate(others):
        same = [p for p in others if p["standard_layers"] == point["standard_layers"]]
        offsets.append(0.15 * (same.index(point) - (len(same) - 1) / 2))
    for ax, key in ((ppl_ax, "ppl_ratio"), (recall_ax, "recall")):
        line = [(p["standard_layers"], p[key]) for p in spread if p[key] is not None]
        if line:
            ax.plot(*zip(*line), "o-", color="black", linewidth=1.6, label="evenly spread (share sweep)")
        for index, (point, offset) in enumerate(zip(others, offsets)):
            if point[key] is not None:
                marker = PLACEMENT_MARKERS[index % len(PLACEMENT_MARKERS)]
                x = point["standard_layers"] + offset
                ax.plot(x, point[key], marker, markersize=8, alpha=0.8, label=point["label"])
        ax.set_xticks(range(depth + 1))
        ax.set_xlim(-0.5, depth + 0.5)
        ax.set_xlabel(f"standard layers of {depth} (the rest {mixer})")
        ax.grid(alpha=0.3)
    ppl_ax.set_yscale("log")
    ratio_format = FuncFormatter(lambda value, _: f"×{value:g}")
    ratios = [p["ppl_ratio"] for p in points if p["ppl_ratio"] is not None] + [1.0]
    ppl_ax.yaxis.set_major_formatter(ratio_format)  # within a decade the minor ticks are the only labelled ones
    ppl_ax.yaxis.set_minor_formatter(ratio_format if max(ratios) / min(ratios) < 10 else NullFormatter())
    ppl_ax.axhline(1.0, color="grey", linewidth=1)
    if close_ratio is not None:
        ppl_ax.axhline(close_ratio, color="grey", linestyle="--", linewidth=1, label=f"close: ×{close_ratio:g}")
    ppl_ax.set_ylabel("held-out word ppl ÷ standard's")
    recall_ax.set_ylabel("MQAR accuracy (%)")
    recall_ax.set_ylim(0, 102)
    entries: dict[str, object] = {}  # label → handle, from both panels (a point may lack one of the measures)
    for ax in (ppl_ax, recall_ax):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), fontsize=8, loc="outside right upper")
    fig.suptitle(f"How many standard layers, and where, rescue {mixer}", fontsize=12)
    return fig


def train_throughput(
    tokens_per_s: dict[str, dict[int, float]], out_dir: str | Path, name: str = "train_throughput", title: str = ""
) -> list[Path]:
    """Write `train_throughput_figure(tokens_per_s, title)` as `<name>.png` and `<name>.svg`."""
    return _save(train_throughput_figure(tokens_per_s, title), out_dir, name)


def train_throughput_figure(tokens_per_s: dict[str, dict[int, float]], title: str = "") -> Figure:
    """Training tokens/s against the sequence length L (log₂ x axis, linear y from 0), one line per model:
    `tokens_per_s[model][L]`, as `attnlab bench` measures it at a fixed number of tokens per step."""
    if not tokens_per_s:
        raise ValueError("give at least one model's tokens/s to plot the training throughput")
    fig = Figure(figsize=(MIN_FIGURE_WIDTH, 4.5), layout="constrained")
    ax = fig.add_subplot()
    lengths = sorted({length for row in tokens_per_s.values() for length in row})
    for (model, row), colour in zip(tokens_per_s.items(), _model_colours(len(tokens_per_s))):
        points = sorted(row.items())
        ax.plot(*zip(*points), "o-", color=colour, label=model)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"Training throughput{': ' + title if title else ''}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper")  # beside the axes: the lines may cross anywhere
    return fig


__all__ = [
    "activation_boxplots",
    "activation_figure",
    "attention_heatmaps",
    "heatmap_figure",
    "loss_curves",
    "loss_figure",
    "radar_figure",
    "radar_plots",
    "read_metrics",
    "share_sweep",
    "share_sweep_figure",
    "train_throughput",
    "train_throughput_figure",
]


CIRCUIT_PANELS = (
    ("previous_token", "previous-token score"),
    ("induction", "induction score"),
    ("duplicate_token", "duplicate-token score"),
    ("sink", "sink score"),
)
TASK_CIRCUIT_PANELS = (("previous_token", "task previous-token score"), ("retrieval", "task retrieval score"))


def circuit_heatmaps(entry: dict, out_dir: str | Path, name: str) -> list[Path]:
    """Layers × heads heatmaps of one model's circuit scores and of the accuracy lost when each head is
    ablated (`attnlab.circuits.checkpoint_circuits`); grey cells with "n/a": no map, or no heads."""
    fig = circuit_figure(entry)
    return _save(fig, out_dir, name)


def circuit_figure(entry: dict) -> Figure:
    layers = len(entry["mixer_types"])
    heads = max((len(scores["sink"]) for scores in entry["scores"] if scores), default=1)
    baseline = entry["ablation"]["baseline"]["accuracy"]
    panels = [(entry["scores"], key, title) for key, title in CIRCUIT_PANELS]
    if entry["task_scores"]:
        panels = [(entry["task_scores"], key, title) for key, title in TASK_CIRCUIT_PANELS] + panels
    matrices = []
    for per_layer, key, title in panels:
        rows = [scores[key] if scores else [math.nan] * heads for scores in per_layer]
        matrices.append((title, np.array(rows, dtype=float), (0.0, 1.0)))
    drops = [
        [baseline - head["accuracy"] for head in layer["heads"]] if layer["heads"] else [math.nan] * heads
        for layer in entry["ablation"]["layers"]
    ]
    drop_matrix = np.array(drops, dtype=float)
    limit = max(0.01, float(np.nanmax(np.abs(drop_matrix))) if np.isfinite(drop_matrix).any() else 0.01)
    matrices.append((f"accuracy drop, head {entry['ablation']['mode']}-ablated", drop_matrix, (-limit, limit)))
    fig = Figure(figsize=(3.0 * len(matrices), 0.5 * layers + 1.6), layout="constrained")
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    labels = [f"{index + 1} {mixer}" for index, mixer in enumerate(entry["mixer_types"])]
    for ax, (title, matrix, (low, high)) in zip(axes, matrices):
        cmap = colormaps["RdBu_r" if low < 0 else "viridis"].with_extremes(bad="0.85")
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=low, vmax=high, aspect="auto")
        for (row, column), value in np.ndenumerate(matrix):
            ax.text(column, row, "n/a" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(matrix.shape[1]), [str(head) for head in range(matrix.shape[1])])
        ax.set_yticks(range(layers), labels if ax is axes[0] else [""] * layers)
        ax.set_xlabel("head")
        fig.colorbar(image, ax=ax, shrink=0.8)
    icl = "" if entry["icl_score"] is None else f", in-context-learning score {entry['icl_score']:+.3f} nats"
    fig.suptitle(f"{Path(entry['checkpoint']).name}: {entry['task']} (accuracy {baseline:.3f}{icl})", fontsize=10)
    return fig
