"""The analysis figures: files written, titled and labelled, and no text overlapping at 4 to 24 layers."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from attnlab.analysis import INDICATORS, ActivationStatistics, add_normalised
from attnlab.plots import (
    activation_boxplots,
    activation_figure,
    attention_heatmaps,
    heatmap_figure,
    loss_curves,
    loss_figure,
    radar_figure,
    radar_plots,
    read_metrics,
    share_sweep,
    share_sweep_figure,
)


def fake_indicators(num_layers: int, patterns: dict[str, list[str]], seed: int = 0) -> dict:
    """An indicators.json-shaped dict with random indicator values and real activation summaries."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for label, mixers in patterns.items():
        for layer, mixer in enumerate(mixers[:num_layers]):
            entry = {"model": label, "layer": layer, "mixer": mixer, "has_map": mixer != "mlp"}
            if mixer == "mlp":
                entry.update(dict.fromkeys(INDICATORS))
                entry["logits"] = None
            else:
                entry.update({name: float(torch.rand(1, generator=generator)) for name in INDICATORS})
                statistics = ActivationStatistics()
                scale = 10 ** (layer / 3) if mixer == "nonapprox" else 1.0  # outliers grow with depth
                statistics.update(torch.randn(2000, generator=generator) * scale)
                entry["logits"] = statistics.summary()
            layers.append(entry)
    add_normalised(layers)
    models = [
        {"checkpoint": f"runs/{label}", "label": label, "mixer_types": mixers} for label, mixers in patterns.items()
    ]
    return {"models": models, "layers": layers}


def paper_patterns(num_layers: int) -> dict[str, list[str]]:
    hybrid = ["nonapprox" if layer % 2 == 0 else "standard" for layer in range(num_layers)]
    hybrid[-1] = "mlp"
    return {"runs/hybrid-nonapprox": hybrid, "runs/uniform-nonapprox": ["nonapprox"] * num_layers}


def drawn_texts(fig) -> list[Text]:
    """The text a reader sees: titles, axis labels, tick labels of ticks inside the view, panel texts,
    legends and figure titles (tick label objects of ticks outside the view exist but are not drawn)."""
    texts = [fig._suptitle, fig._supxlabel, fig._supylabel]
    for legend in fig.legends:
        texts.extend(legend.get_texts())
    for ax in fig.axes:
        texts.extend([ax.title, ax._left_title, ax._right_title, *ax.texts])
        if ax.get_legend() is not None:
            texts.extend(ax.get_legend().get_texts())
        if not ax.axison:
            continue
        for axis in (ax.xaxis, ax.yaxis):
            texts.append(axis.label)
            low, high = sorted(axis.get_view_interval())
            for tick, location in zip(axis.get_major_ticks(), axis.get_majorticklocs()):
                if low - 1e-9 <= location <= high + 1e-9 and tick.get_visible() and tick.label1.get_visible():
                    texts.append(tick.label1)
    return [t for t in texts if t is not None and t.get_visible() and t.get_text().strip()]


def text_boxes(fig) -> list[tuple[str, object]]:
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]


def overlapping_text(fig) -> list[tuple[str, str]]:
    boxes = text_boxes(fig)
    width, height = fig.canvas.get_width_height()
    clashes = []
    for (text_a, box_a), (text_b, box_b) in itertools.combinations(boxes, 2):
        if box_a.shrunk(0.9, 0.9).overlaps(box_b.shrunk(0.9, 0.9)):
            clashes.append((text_a, text_b))
    outside = [text for text, box in boxes if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1]
    return clashes + [(text, "<outside the figure>") for text in outside]


@pytest.mark.parametrize("num_layers", [4, 24])
def test_radar_and_activation_figures_are_readable(num_layers):
    indicators = fake_indicators(num_layers, paper_patterns(num_layers))
    for fig in (radar_figure(indicators), activation_figure(indicators)):
        assert fig.get_suptitle()
        assert overlapping_text(fig) == []
    radar = radar_figure(indicators)
    titled = [ax for ax in radar.axes if ax.get_title()]
    assert len(titled) == num_layers
    assert titled[-1].get_title() == f"layer {num_layers - 1}: mlp / nonapprox"
    # The last layer is an mlp in one model only: one polygon (line + fill) for the other model.
    assert len(titled[-1].lines) == 1
    legend_texts = [t.get_text() for t in radar.legends[0].get_texts()]
    assert legend_texts == ["runs/hybrid-nonapprox", "runs/uniform-nonapprox"]

    boxes = activation_figure(indicators)
    ax = boxes.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel() and ax.get_xlabel() == "layer"
    assert any(np.allclose(line.get_ydata(), 1e3) for line in ax.lines)  # the 10³ reference line
    # One box per layer and model that has scores (the hybrid's last layer is an mlp).
    assert len([p for p in ax.patches if p.get_visible()]) == 2 * num_layers - 1


def test_only_mlp_layers_say_no_map():
    indicators = fake_indicators(4, {"tiny": ["standard", "mlp", "approximate", "mlp"]})
    fig = radar_figure(indicators)
    assert sum("no map" in t.get_text() for t in fig.findobj(Text)) == 2
    assert overlapping_text(activation_figure(indicators)) == []


def test_files_are_png_and_svg(tmp_path):
    indicators = fake_indicators(4, paper_patterns(4))
    paths = radar_plots(indicators, tmp_path, name="r") + activation_boxplots(indicators, tmp_path)
    assert [path.name for path in paths] == ["r.png", "r.svg", "activations.png", "activations.svg"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") if path.suffix == ".png" else b"<svg" in data[:2000]
    assert not list(tmp_path.glob(".*"))  # no temporary files left


@pytest.mark.parametrize("num_layers", [4, 24])
def test_heatmaps(num_layers, tmp_path):
    seq_len = 300 if num_layers == 4 else 40  # 300: longer than the display resolution, block-averaged
    rows = torch.arange(1, seq_len + 1, dtype=torch.float64)[:, None]
    uniform = (torch.ones(seq_len, seq_len, dtype=torch.float64).tril() / rows).numpy()
    mixers = ["standard"] * num_layers
    mixers[1] = "mlp"
    maps = [None if mixer == "mlp" else uniform for mixer in mixers]
    fig = heatmap_figure(maps, mixers, "runs/a", num_sequences=8)
    assert "runs/a" in fig.get_suptitle() and "8 sequences" in fig.get_suptitle()
    images = [image for ax in fig.axes for image in ax.images]
    assert len(images) == num_layers - 1
    array = images[0].get_array()
    assert array.shape == ((150, 150) if seq_len == 300 else (40, 40))  # 300 positions: blocks of 2
    assert np.ma.getmaskarray(array)[0, -1] or np.isnan(array[0, -1])  # above the diagonal: blank
    assert overlapping_text(fig) == []
    if num_layers == 4:  # writing is the same at any depth, and slow at 24 panels
        paths = attention_heatmaps(maps, mixers, "runs/a", tmp_path)
        assert all(path.stat().st_size > 1000 for path in paths)


def test_loss_curves(tmp_path):
    files = []
    for name, offset in (("hybrid", 0.0), ("uniform", 0.5)):
        folder = tmp_path / name
        folder.mkdir()
        records = [{"step": s, "loss": 7 - s / 20 + offset, "tokens": 2048 * s} for s in range(1, 201)]
        records[99]["eval_loss"] = 3.0 + offset
        records[199]["eval_loss"] = 2.0 + offset
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        files.append(folder / "metrics.jsonl")
    fig = loss_figure(files)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "tokens seen" and "loss" in ax.get_ylabel() and fig.get_suptitle()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["hybrid", "uniform"]  # one entry per run; the title says dots are held-out losses
    held_out = [line for line in ax.lines if line.get_marker() == "o"][1]  # the second run's
    assert list(held_out.get_xdata()) == [2048 * 100, 2048 * 200] and list(held_out.get_ydata()) == [3.5, 2.5]
    assert overlapping_text(fig) == []
    assert [p.suffix for p in loss_curves(files, tmp_path)] == [".png", ".svg"]

    many = files + [files[0]] * 6  # eight runs: the legend moves beside the axes, off the curves
    fig = loss_figure(many, labels=[f"run {i}" for i in range(8)])
    assert overlapping_text(fig) == []  # draws the figure
    renderer = fig.canvas.get_renderer()
    legend, axes = fig.axes[0].get_legend().get_window_extent(renderer), fig.axes[0].get_window_extent(renderer)
    assert legend.x0 >= axes.x1


def test_bad_metrics_files_are_one_line(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0, "tokens": 10}\nnot json\n{"step": 2, "loss": 1.0, "tokens": 20}\n')
    with pytest.raises(ValueError, match="line 2: not a JSON record"):
        read_metrics(bad)
    bad.write_text('{"something": 1}\n')
    with pytest.raises(ValueError, match="no records"):
        read_metrics(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_metrics(tmp_path / "missing.jsonl")
    bad.write_text('{"step": 1, "loss": 2.0, "tokens": 10}\n{"step": 2, "lo')  # a run still writing
    assert read_metrics(bad) == [{"step": 1, "loss": 2.0, "tokens": 10}]


def test_share_sweep_figure_draws_the_sweep_as_a_line_and_placements_as_markers(tmp_path):
    depth = 8
    points = [
        {"standard_layers": k, "label": f"share-{k}", "ppl_ratio": 6.0 / (k + 1), "recall": 10.0 * k, "spread": True}
        for k in range(depth + 1)
    ]
    points += [
        {"standard_layers": 4, "label": name, "ppl_ratio": 1.2, "recall": 60.0, "spread": False}
        for name in ("top", "bottom", "middle", "odd")
    ]
    points.append({"standard_layers": 1, "label": "first", "ppl_ratio": None, "recall": 30.0, "spread": False})
    fig = share_sweep_figure(points, depth, "mlp", close_ratio=1.1)
    ppl_ax, recall_ax = fig.axes
    sweep_line = ppl_ax.lines[0]
    assert list(sweep_line.get_xdata()) == list(range(depth + 1))
    assert sweep_line.get_ydata()[0] == 6.0 and recall_ax.lines[0].get_ydata()[-1] == 80.0
    assert ppl_ax.get_yscale() == "log" and fig.get_suptitle() == "How many standard layers, and where, rescue mlp"
    # "first" has no perplexity: a marker on the recall panel only
    assert len(ppl_ax.lines) == 1 + 4 + 2  # the sweep, four placements, the ×1 and ×1.1 guides
    assert len(recall_ax.lines) == 1 + 5
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend[0] == "evenly spread (share sweep)" and "close: ×1.1" in legend and legend[-1] == "first"
    assert len(legend) == len(set(legend)) == 1 + 5 + 1
    assert overlapping_text(fig) == []
    assert [path.suffix for path in share_sweep(points, depth, "mlp", tmp_path)] == [".png", ".svg"]
    with pytest.raises(ValueError, match="at least one placement point"):
        share_sweep_figure([], depth, "mlp")


def test_model_colours_stay_distinct_for_a_placement_studys_fifteen_models():
    from attnlab.plots import _model_colours

    assert len(set(_model_colours(15))) == 15
    assert len(set(_model_colours(4))) == 4 and len(_model_colours(25)) == 25
