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

On the task's own sequences (MQAR, `attnlab.synthetic`: k₁ v₁ … k_P v_P, then queries `k _` whose answer is
the value paired with k), the two steps of the recall circuit, per head, on the held-out examples:

  task previous-token   mean over the context's value positions 2i + 1 of A[2i + 1, 2i]: the value reads its
                        own key, which writes the key into the value's position.
  retrieval             mean over the scored query positions t of A[t, p], p the position of the asked
                        value: the query reads the value whose position now carries the matching key.

In-context learning score (text models; Olsson et al. 2022 compare the loss of token 500 with token 50 of a
512-token context): the mean held-out loss of the tokens in the last sixteenth of the context [15L/16, L) minus
that of the tokens in [L/16, L/8) (bands around the same fractions, averaged over every sequence). Negative:
later tokens are predicted better, the model uses its context.

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
import torch.nn.functional as F

from .losses import IGNORE_INDEX

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


def mqar_scores(
    maps: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, num_pairs: int
) -> dict[str, torch.Tensor]:
    """Per head [heads], on MQAR examples (input_ids, labels: [batch, L]; maps: [batch, heads, L, L]): the task
    previous-token score at the context's value positions and the retrieval score at the scored query positions
    (module docstring)."""
    values = torch.arange(1, 2 * num_pairs, 2)  # positions of v₁ … v_P
    previous = maps[:, :, values, values - 1].double().mean(dim=(0, -1))  # A[2i + 1, 2i]
    rows, queries = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # a label at t + 1 scores position t
    answers = labels[rows, queries + 1]  # [scored]
    sources = (input_ids[rows, : 2 * num_pairs] == answers[:, None]).int().argmax(dim=1)  # where each answer is
    retrieval = maps[rows, :, queries, sources].double().mean(dim=0)  # A[t, p]: [scored, heads] → [heads]
    return {"previous_token": previous, "retrieval": retrieval}


def task_head_scores(model, task, input_ids: torch.Tensor, labels: torch.Tensor) -> list[dict | None] | None:
    """`mqar_scores` of every layer's heads on the task's examples ({score: [per head]} per layer, None for a
    layer without a map); None for a task other than MQAR (an induction task's sequences are repeated blocks,
    which `head_scores` already measures)."""
    if task.name != "mqar":
        return None
    with torch.no_grad():
        maps = model(input_ids.to(model.device), output_attentions=True).attentions
    per_layer = [None if m is None else mqar_scores(m.cpu(), input_ids, labels, task.num_pairs) for m in maps]
    return [None if scores is None else {name: v.tolist() for name, v in scores.items()} for scores in per_layer]


def position_losses(model, sequences: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """[L − 1] float64: entry p − 1 is the mean loss of token p (predicted from tokens 0 … p − 1) over the
    sequences [n, L]."""
    total = torch.zeros(sequences.shape[1] - 1, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size].to(model.device)
            logits = model(input_ids=batch).logits[:, :-1].float()  # [batch, L − 1, vocab]
            losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # [batch, L − 1]
            total += losses.double().sum(dim=0).cpu()
    return total / len(sequences)


def in_context_score(losses: torch.Tensor) -> float:
    """Mean loss of the tokens in [15L/16, L) minus that of the tokens in [L/16, L/8) (module docstring);
    `losses` as from `position_losses` (L − 1 entries, L ≥ 16)."""
    length = len(losses) + 1
    if length < 16:
        raise ValueError(f"the in-context-learning score needs sequences of at least 16 tokens, got {length}")
    token = torch.arange(1, length)
    early = (token >= length // 16) & (token < length // 8)
    late = token >= length - length // 16
    return (losses[late].mean() - losses[early].mean()).item()


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
    """Accuracy and loss at the scored labels (`synthetic.evaluate_examples`; labels = input_ids scores every
    next token of a text) with nothing ablated, with each layer ablated, and with each head of each layer that
    has per-head outputs ablated. The whole example set is one batch, so a mean-ablation replaces an output by
    its mean over all the examples. Runs the reference path: a fast path's shadow row must not enter the batch
    mean."""
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


TASK_EXAMPLES = 256  # default held-out examples of a synthetic task
TEXT_SEQUENCES = 64  # default held-out sequences of a text model


def checkpoint_circuits(
    checkpoint,
    task_spec: str | None = None,
    num_examples: int | None = None,
    mode: str = "mean",
    block: int | None = None,
    device: str = "cpu",
    data: str | None = None,
) -> dict:
    """Scores and ablation effects of one checkpoint. Trained on a synthetic task (or given `task_spec`): the
    head scores on repeated blocks, the task's own scores (`task_head_scores`) and the ablation sweep on the
    task's first `num_examples` (default 256) held-out examples. Trained on text: the head scores, the
    in-context-learning score and the ablation sweep (next-token accuracy and loss) on the first
    `num_examples` (default 64) held-out sequences of `data` (default: the checkpoint's training data).
    Repeated blocks are `block` tokens (default: half the trained length, at most 32, below the vocabulary)."""
    from . import synthetic
    from .data import heldout_sequences, open_corpus
    from .evaluation import check_checkpoint, load_checkpoint, train_settings, trained_seq_len

    checkpoint = Path(checkpoint)
    check_checkpoint(checkpoint)
    train = train_settings(checkpoint)
    spec = task_spec or train.get("data")
    on_task = isinstance(spec, str) and synthetic.is_task_spec(spec)
    if on_task and data is not None:
        raise ValueError(f"{checkpoint} was trained on {spec}, not on text; --data applies to text models only")
    if not on_task and not isinstance(data or spec, str):
        raise ValueError(f"{checkpoint} records no training data; give held-out text with --data or a task with --task")
    loaded = load_checkpoint(checkpoint, device=device, with_tokenizer=not on_task)
    model = loaded.model.eval()
    seq_len = trained_seq_len(checkpoint) or model.config.max_position_embeddings
    if on_task:
        task = synthetic.parse_task_spec(spec, seq_len)
        vocab_size, chance = task.vocab_size, task.chance_accuracy
        input_ids, labels = synthetic.heldout_examples(task, int(train.get("seed", 0)), num_examples or TASK_EXAMPLES)
        task_scores, icl_score, what = task_head_scores(model, task, input_ids, labels), None, spec
    else:
        corpus = data or spec
        sequences = heldout_sequences(open_corpus(corpus), loaded.tokenizer, seq_len, num_examples or TEXT_SEQUENCES)
        input_ids = labels = sequences  # every next token is scored
        vocab_size, chance, task_scores, what = model.config.vocab_size, None, None, f"held-out text of {corpus}"
        icl_score = in_context_score(position_losses(model, sequences))
    block = block or max(2, min(32, seq_len // 2, vocab_size - 1))
    return {
        "checkpoint": str(checkpoint),
        "task": what,
        "mixer_types": list(model.config.mixer_types),
        "chance_accuracy": chance,
        "block": block,
        "scores": head_scores(model, block, vocab_size=vocab_size),
        "task_scores": task_scores,
        "icl_score": icl_score,
        "ablation": ablation_sweep(model, input_ids, labels, mode),
    }


def run_circuits(
    checkpoints,
    out,
    task_spec: str | None = None,
    num_examples: int | None = None,
    mode: str = "mean",
    block: int | None = None,
    device: str = "cpu",
    data: str | None = None,
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
        label: checkpoint_circuits(path, task_spec, num_examples, mode, block, device, data)
        for label, path in zip(labels, checkpoints)
    }
    out.mkdir(exist_ok=True)
    figures = [path for label, entry in models.items() for path in circuit_heatmaps(entry, out, f"circuits-{label}")]
    write_text_atomic(out / "circuits.json", json.dumps({"models": models}, indent=1) + "\n")
    return {"circuits_path": out / "circuits.json", "figures": figures, "models": models}
