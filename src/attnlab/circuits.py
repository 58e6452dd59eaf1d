"""Who does what: per-head circuit scores from the maps, and causal ablations of heads and layers.

Scores, per layer that has a map (`output_attentions`; A [batch, heads, L, L], rows sum to 1) and per head,
averaged over the batch; a mixer without a map (`mlp`) has no scores (None, shown as "n/a", never 0):

  previous-token   mean over queries i ≥ 1 of A[i, i − 1]: how much a position reads the one before it, the
                   first step of the induction / associative-recall circuit (Olsson et al. 2022, "In-context
                   learning and induction heads").
  sink             mean over queries i of A[i, 0]: the weight parked on the first position.
  duplicate-token  on a random block of T tokens repeated (x₁…x_T x₁…x_T), mean over the second copy's
                   queries i ∈ [T, 2T) of A[i, i − T]: attention to the earlier occurrence of the same token.
  induction        on the same sequences, mean over i ∈ [T, 2T) of A[i, i − T + 1]: attention from a token
                   of the second copy to the token that FOLLOWED its first occurrence (Olsson et al.'s
                   prefix-matching score).

A uniform causal head scores (1/(L − 1)) Σ_{i=1}^{L−1} 1/(i + 1) previous-token; a perfect previous-token
head 1; a perfect induction head 1.

Ablations (`ablated`): one layer's mixer output, or one head's slice of it (the input of the mixer's output
projection `o_proj`, one d_h-wide slice per head), replaced by its mean over the batch at each position
("mean") or by zeros ("zero"), in every pass through that layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

SCORE_NAMES = ("previous_token", "duplicate_token", "induction", "sink")
ABLATION_MODES = ("mean", "zero")


def repeated_blocks(vocab_size: int, block: int, batch: int, seed: int = 0) -> torch.Tensor:
    """[batch, 2·block] token ids: a block of `block` distinct random ids (from 1, so never id 0), twice."""
    if not 1 <= block < vocab_size:
        raise ValueError(f"a repeated block needs 1 ≤ block < vocab_size, got block={block}, vocab={vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.stack([torch.randperm(vocab_size - 1, generator=generator)[:block] + 1 for _ in range(batch)])
    return torch.cat([blocks, blocks], dim=1)


def previous_token_score(maps: torch.Tensor) -> torch.Tensor:
    """Per head [heads]: mean over the batch and queries i ≥ 1 of A[i, i − 1]. maps: [batch, heads, L, L]."""
    return maps.diagonal(offset=-1, dim1=-2, dim2=-1).double().mean(dim=(0, -1))


def sink_score(maps: torch.Tensor) -> torch.Tensor:
    """Per head [heads]: mean over the batch and queries of A[i, 0]."""
    return maps[..., 0].double().mean(dim=(0, -1))


def duplicate_token_score(maps: torch.Tensor, block: int) -> torch.Tensor:
    """Per head [heads], on repeated blocks (`repeated_blocks`): mean over i ∈ [block, 2·block) of A[i, i − block]."""
    _check_repeated(maps, block)
    return maps.diagonal(offset=-block, dim1=-2, dim2=-1).double().mean(dim=(0, -1))


def induction_score(maps: torch.Tensor, block: int) -> torch.Tensor:
    """Per head [heads], on repeated blocks: mean over i ∈ [block, 2·block) of A[i, i − block + 1]."""
    _check_repeated(maps, block)
    return maps.diagonal(offset=1 - block, dim1=-2, dim2=-1)[..., 1:].double().mean(dim=(0, -1))


def _check_repeated(maps: torch.Tensor, block: int) -> None:
    if maps.shape[-1] != 2 * block or block < 2:
        raise ValueError(f"maps of repeated blocks are 2·block = {2 * block} long (block ≥ 2), got {maps.shape[-1]}")


def head_scores(
    model, block: int, batch: int = 16, seed: int = 0, vocab_size: int | None = None
) -> list[dict[str, list[float]] | None]:
    """The four scores of every layer's heads on `batch` repeated blocks of `block` tokens drawn from the first
    `vocab_size` ids (default: the model's vocabulary) ({score: [per head]} per layer, or None for a layer
    without a map). The maps are the model's reference-path maps."""
    tokens = repeated_blocks(vocab_size or model.config.vocab_size, block, batch, seed).to(model.device)
    with torch.no_grad():
        maps = model(tokens, output_attentions=True).attentions
    layers = []
    for layer_maps in maps:
        if layer_maps is None:
            layers.append(None)
            continue
        scores = {
            "previous_token": previous_token_score(layer_maps),
            "duplicate_token": duplicate_token_score(layer_maps, block),
            "induction": induction_score(layer_maps, block),
            "sink": sink_score(layer_maps),
        }
        layers.append({name: score.tolist() for name, score in scores.items()})
    return layers


def _replacement(tensor: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean over the batch at each position (broadcast back), or zeros."""
    return torch.zeros_like(tensor) if mode == "zero" else tensor.mean(dim=0, keepdim=True).expand_as(tensor)


@contextlib.contextmanager
def ablated(model, layer_idx: int, head: int | None = None, mode: str = "mean") -> Iterator[None]:
    """Within the block, layer `layer_idx`'s mixer output (head=None) or one head's slice of the input of its
    output projection is replaced (`mode`: "mean" over the batch, or "zero"); hooks are removed on exit."""
    if mode not in ABLATION_MODES:
        raise ValueError(f"ablation mode must be one of {ABLATION_MODES}, got {mode!r}")
    mixer = model.model.layers[layer_idx].self_attn
    if head is None:

        def replace_output(module, inputs, output):
            return replace(output, hidden_states=_replacement(output.hidden_states, mode))

        handle = mixer.register_forward_hook(replace_output)
    else:
        projection = getattr(mixer, "o_proj", None)
        if projection is None or not 0 <= head < mixer.num_heads:
            raise ValueError(
                f"layer {layer_idx} ({type(mixer).name}) has no head {head}: head ablation needs a mixer with "
                "per-head outputs into an `o_proj`; ablate the whole layer instead (head=None)"
            )
        width = mixer.head_dim

        def replace_head(module, inputs):
            (merged,) = inputs  # [batch, seq, heads·d_h]
            merged = merged.clone()
            piece = merged[..., head * width : (head + 1) * width]
            merged[..., head * width : (head + 1) * width] = _replacement(piece, mode)
            return (merged,)

        handle = projection.register_forward_pre_hook(replace_head)
    try:
        yield
    finally:
        handle.remove()


def ablation_sweep(model, input_ids: torch.Tensor, labels: torch.Tensor, mode: str = "mean") -> dict:
    """Accuracy and loss at the scored labels (`synthetic.evaluate_examples`) with nothing ablated, with each
    layer ablated, and with each head of each layer that has per-head outputs ablated. The whole example
    set is one batch, so a mean-ablation replaces an output by its mean over all the examples. Runs the
    reference path: a fast path's shadow row must not enter the batch mean."""
    from .synthetic import evaluate_examples

    def measure() -> dict[str, float]:
        result = evaluate_examples(model, input_ids, labels, batch_size=len(input_ids), device=model.device)
        return {"accuracy": result["accuracy"], "loss": result["loss"]}

    implementation = model.config.mixer_implementation
    model.config.mixer_implementation = "reference"
    try:
        layers = []
        for index, layer in enumerate(model.model.layers):
            with ablated(model, index, mode=mode):
                entry = {"layer": index, "mixer": layer.mixer_type, **measure()}
            if getattr(layer.self_attn, "o_proj", None) is not None:
                entry["heads"] = []
                for head in range(layer.self_attn.num_heads):
                    with ablated(model, index, head=head, mode=mode):
                        entry["heads"].append(measure())
            else:
                entry["heads"] = None
            layers.append(entry)
        return {"mode": mode, "baseline": measure(), "layers": layers}
    finally:
        model.config.mixer_implementation = implementation


def checkpoint_circuits(
    checkpoint,
    task_spec: str | None = None,
    num_examples: int = 256,
    mode: str = "mean",
    block: int | None = None,
    device: str = "cpu",
) -> dict:
    """Scores and ablation effects of one checkpoint trained on a synthetic task (or on `task_spec`): the
    head scores on repeated blocks of `block` tokens (default: half the trained length, at most 32 and below
    the task's vocabulary), the ablation sweep on the task's first `num_examples` held-out examples."""
    from . import synthetic
    from .evaluation import check_checkpoint, load_checkpoint, train_settings, trained_seq_len

    checkpoint = Path(checkpoint)
    check_checkpoint(checkpoint)
    train = train_settings(checkpoint)
    spec = task_spec or train.get("data")
    if not (isinstance(spec, str) and synthetic.is_task_spec(spec)):
        raise ValueError(f"{checkpoint} was not trained on a synthetic task; give one with --task, e.g. mqar:pairs=4")
    loaded = load_checkpoint(checkpoint, device=device, with_tokenizer=False)
    model = loaded.model.eval()
    seq_len = trained_seq_len(checkpoint) or model.config.max_position_embeddings
    task = synthetic.parse_task_spec(spec, seq_len)
    block = block or max(2, min(32, seq_len // 2, task.vocab_size - 1))
    input_ids, labels = synthetic.heldout_examples(task, int(train.get("seed", 0)), num_examples)
    return {
        "checkpoint": str(checkpoint),
        "task": spec,
        "mixer_types": list(model.config.mixer_types),
        "block": block,
        "scores": head_scores(model, block, vocab_size=task.vocab_size),
        "ablation": ablation_sweep(model, input_ids, labels, mode),
    }


def run_circuits(
    checkpoints,
    out,
    task_spec: str | None = None,
    num_examples: int = 256,
    mode: str = "mean",
    block: int | None = None,
    device: str = "cpu",
) -> dict:
    """`checkpoint_circuits` of every checkpoint; writes OUT/circuits.json and one heatmap figure per model
    (OUT/circuits-<label>.png/.svg). Bad input fails in one line before any model runs."""
    import json

    from .analysis import check_output_folder
    from .checkpoint import checkpoint_labels
    from .evaluation import check_checkpoint
    from .plots import circuit_heatmaps
    from .runconfig import write_text_atomic

    if mode not in ABLATION_MODES:
        raise ValueError(f"--mode must be one of {', '.join(ABLATION_MODES)}, got {mode!r}")
    out = Path(out)
    check_output_folder(out, "circuits.json and the figures")
    for checkpoint in checkpoints:
        check_checkpoint(Path(checkpoint))
    labels = checkpoint_labels(checkpoints)
    models = {
        label: checkpoint_circuits(path, task_spec, num_examples, mode, block, device)
        for label, path in zip(labels, checkpoints)
    }
    out.mkdir(exist_ok=True)
    figures = [path for label, entry in models.items() for path in circuit_heatmaps(entry, out, f"circuits-{label}")]
    write_text_atomic(out / "circuits.json", json.dumps({"models": models}, indent=1) + "\n")
    return {"circuits_path": out / "circuits.json", "figures": figures, "models": models}
