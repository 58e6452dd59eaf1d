"""Properties of the seven mixers (docs/method.md §3) inside real tiny attnlab models.

Every model here is tiny (vocab 97, width 32, 4 heads) and initialised with a larger weight scale than the
training default (plus random biases and norm gains), so that pre-softmax scores are O(1) and the mixing
maps are far from uniform: a wrong term in a fast path then shows up well above float32 noise. The chunked
fast paths of `approximate` and `nonapprox` get a small `chunk_size`, so the test lengths cross several
chunks and end in a partial one.

Fast and reference paths share formula code (the Taylor polynomial, the score scale, the masks), so their
agreement alone would pass an error they make together: both are also held to the independent float64
forward of tests/test_inspection.py (`spec_logits`).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from attnlab import BUILTIN_MIXERS, AttnLabConfig, AttnLabForCausalLM
from attnlab.kernels import taylor
from attnlab.mixers import nonapprox, standard
from attnlab.optim import build_optimizer
from attnlab.runconfig import TrainConfig

from .test_inspection import spec_logits

VOCAB = 97
MAX_LEN = 64
IMPLEMENTATIONS = ("fast", "reference")
SHADOW_MIXERS = ("rndembqk", "fixedseqqk")
# Mixers whose map depends only on the input and on relative positions (RoPE, or no positions at all).
INPUT_DEPENDENT_MIXERS = tuple(name for name in BUILTIN_MIXERS if name not in SHADOW_MIXERS)


# --------------------------------------------------------------------------------------------- helpers


def num_layers_for(layers) -> int:
    """Depth used for a layer pattern: 2 for uniform, 3 for hybrid (variant, standard, variant), else len."""
    if isinstance(layers, list):
        return len(layers)
    return 3 if layers.startswith("hybrid:") else 2


def make_model(
    layers, *, kv_heads: int = 2, qk_norm: bool = False, tie: bool = True, chunk_size: int = 5, hidden_size: int = 32
) -> AttnLabForCausalLM:
    """A tiny float32 model with O(1) attention scores and a small fast-path chunk size (seeded: every
    test builds its model here, so every test is deterministic)."""
    torch.manual_seed(0)
    config = AttnLabConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=num_layers_for(layers),
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_LEN,
        layers=layers,
        qk_norm=qk_norm,
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    model = AttnLabForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.normal_(1.0, 0.1)
    set_chunk_size(model, chunk_size)
    return model


def set_chunk_size(model: AttnLabForCausalLM, chunk_size: int) -> None:
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "chunk_size"):
            layer.self_attn.chunk_size = chunk_size


def random_ids(batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq_len), generator=generator)


def logits_of(model, input_ids, implementation="fast", **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, mixer_implementation=implementation, **kwargs).logits


def maps_of(model, input_ids, **kwargs) -> tuple[torch.Tensor | None, ...]:
    with torch.no_grad():
        return model(input_ids, output_attentions=True, **kwargs).attentions


def parameter_grads(model, input_ids, implementation) -> dict[str, torch.Tensor | None]:
    """Gradient of every named parameter for the next-token loss (labels = input_ids).

    A single token has no next-token target, so length 1 uses cross-entropy against the token itself.
    """
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids, mixer_implementation=implementation)
    loss = out.loss if input_ids.shape[1] > 1 else F.cross_entropy(out.logits[:, 0], input_ids[:, 0])
    loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(fast: dict, reference: dict, rtol: float = 1e-4, floor: float = 1e-6) -> None:
    """Per-parameter comparison relative to the size of that parameter's reference gradient.

    `floor` (relative to the largest gradient of the model) covers gradients that are zero in exact
    arithmetic, e.g. W_q/W_k for a single token, where either path leaves float32 rounding residue.
    """
    assert fast.keys() == reference.keys()
    assert all(g is not None for g in [*fast.values(), *reference.values()]), "a parameter got no gradient"
    model_scale = max(g.abs().max().item() for g in reference.values())
    for name, ref in reference.items():
        atol = rtol * ref.abs().max().item() + floor * model_scale
        torch.testing.assert_close(fast[name], ref, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def replace_token(input_ids: torch.Tensor, position: int) -> torch.Tensor:
    changed = input_ids.clone()
    changed[:, position] = (changed[:, position] + 1 + torch.arange(len(changed))) % VOCAB
    return changed


def pad(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 1-D id rows to a batch (pad id 0) with a 2-D attention mask (1 = token, 0 = padding)."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[b, span], mask[b, span] = row, 1
    return ids, mask


def padded_batch(side: str) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Three rows of lengths 13, 10 and 6: with chunk size 4 the shortest left-padded row starts with an
    all-padding chunk."""
    rows = [random_ids(1, n, seed=10 + n)[0] for n in (13, 10, 6)]
    return (rows, *pad(rows, side))


# ----------------------------------------------------------------------------------- 1. fast == reference


class Shape(NamedTuple):
    batch: int
    seq_len: int
    kv_heads: int
    qk_norm: bool = False


SHAPES = [
    Shape(1, 1, 4),  # a single token, MHA
    Shape(3, 7, 2),  # odd length, one full chunk plus a partial one, GQA
    Shape(1, 37, 4),  # 7 full chunks + 2, MHA
    Shape(3, 37, 2),  # batch of 3, GQA
    Shape(2, 12, 2, qk_norm=True),  # Qwen3-style QK-norm
]
PATTERNS = [
    *(f"uniform:{name}" for name in BUILTIN_MIXERS),
    "hybrid:approximate",
    "hybrid:nonapprox",
    "hybrid:fixedseqqk",
    ["rndembqk", "fixedseqqk", "staticembqk", "approximate"],
]


def shape_id(shape: Shape) -> str:
    return f"b{shape.batch}-L{shape.seq_len}-kv{shape.kv_heads}" + ("-qknorm" if shape.qk_norm else "")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layers", PATTERNS, ids=lambda p: p if isinstance(p, str) else "mixed")
def test_fast_path_matches_reference(layers, shape):
    """The fast path gives the reference path's logits and the same gradient for every parameter, and both
    give the spec's logits (independent float64 forward). Measured float32 error against it: ≤ 5.8e-6 over
    these cases (logits of std ≈ 1.8; mean row max of the maps 0.23–0.36 at L = 37), where scaling every
    score by 1.01 moves the logits by ≥ 3.6e-2 (L ≥ 7, no QK-norm)."""
    model = make_model(layers, kv_heads=shape.kv_heads, qk_norm=shape.qk_norm)
    input_ids = random_ids(shape.batch, shape.seq_len)
    fast, reference = logits_of(model, input_ids, "fast"), logits_of(model, input_ids, "reference")
    assert fast.shape == (shape.batch, shape.seq_len, VOCAB)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    expected = spec_logits(model, input_ids)
    for path, logits in (("fast", fast), ("reference", reference)):
        torch.testing.assert_close(logits.double(), expected, atol=2e-5, rtol=0, msg=lambda m: f"{path} path: {m}")

    fast_grads = parameter_grads(model, input_ids, "fast")
    reference_grads = parameter_grads(model, input_ids, "reference")
    assert any(g.abs().sum() > 0 for g in reference_grads.values())
    assert_grads_close(fast_grads, reference_grads)


# ----------------------------------------------------------------------------------------- 2. padding


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mixer", BUILTIN_MIXERS)
def test_padded_fast_matches_reference(mixer, side):
    """With a 2-D attention mask, fast and reference paths agree on every real token's logits."""
    model = make_model(f"uniform:{mixer}", chunk_size=4)
    _, input_ids, mask = padded_batch(side)
    fast = logits_of(model, input_ids, "fast", attention_mask=mask)
    reference = logits_of(model, input_ids, "reference", attention_mask=mask)
    assert torch.isfinite(fast).all()
    real = mask.bool()
    torch.testing.assert_close(fast[real], reference[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mixer, side",
    [(name, "right") for name in BUILTIN_MIXERS] + [(name, "left") for name in INPUT_DEPENDENT_MIXERS],
)
def test_padded_rows_match_unpadded(mixer, side):
    """A padded row's real-token logits equal those of the row run alone (both paths).

    Left padding shifts positions, which only mixers without absolute-position maps tolerate (RoPE is
    relative), so the shadow-stream mixers are checked with right padding only.
    """
    model = make_model(f"uniform:{mixer}", chunk_size=4)
    rows, input_ids, mask = padded_batch(side)
    for implementation in IMPLEMENTATIONS:
        padded = logits_of(model, input_ids, implementation, attention_mask=mask)
        for b, row in enumerate(rows):
            alone = logits_of(model, row[None], implementation)[0]
            torch.testing.assert_close(padded[b][mask[b].bool()], alone, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- 3. causality


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("form", ["uniform", "hybrid"])
@pytest.mark.parametrize("mixer", BUILTIN_MIXERS)
def test_causality(mixer, form, implementation):
    """Changing the token at position t leaves the logits at positions < t unchanged."""
    model = make_model(f"{form}:{mixer}", chunk_size=4)
    input_ids = random_ids(2, 11)
    before = logits_of(model, input_ids, implementation)
    for t in (1, 5, 10):
        after = logits_of(model, replace_token(input_ids, t), implementation)
        torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
        assert (after[:, t] - before[:, t]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ 4. mlp


def test_mlp_has_no_token_mixing():
    """In the uniform `mlp` model a position's logits depend on its own token only, and there is no map."""
    model = make_model("uniform:mlp")
    input_ids = random_ids(2, 6)
    before = logits_of(model, input_ids)
    for j in range(input_ids.shape[1]):
        after = logits_of(model, replace_token(input_ids, j))
        others = [i for i in range(input_ids.shape[1]) if i != j]
        torch.testing.assert_close(after[:, others], before[:, others], atol=1e-6, rtol=0)
        assert (after[:, j] - before[:, j]).abs().max() > 1e-3
    assert all(weights is None for weights in maps_of(model, input_ids))


# ------------------------------------------------------------------------ 5. input-independent maps


@pytest.mark.parametrize("form", ["uniform", "hybrid"])
@pytest.mark.parametrize("mixer", SHADOW_MIXERS)
def test_shadow_maps_are_input_independent(mixer, form):
    """rndembqk/fixedseqqk maps are the same for every input and batch row, and a length-L map is the
    top-left L×L block of a longer input's map."""
    model = make_model(f"{form}:{mixer}")
    variant_layers = [i for i, layer in enumerate(model.model.layers) if layer.mixer_type == mixer]
    long_a, long_b = random_ids(3, 20, seed=1), random_ids(3, 20, seed=2)
    short = random_ids(2, 9, seed=3)
    maps_a, maps_b, maps_short = maps_of(model, long_a), maps_of(model, long_b), maps_of(model, short)
    causal_uniform = torch.ones(20, 20).tril()
    causal_uniform = causal_uniform / causal_uniform.sum(-1, keepdim=True)
    for i in variant_layers:
        reference_map = maps_a[i][0]
        assert (reference_map - causal_uniform).abs().max() > 1e-2  # a real, non-trivial map
        torch.testing.assert_close(maps_a[i], reference_map.expand_as(maps_a[i]), atol=1e-6, rtol=0)
        torch.testing.assert_close(maps_b[i], maps_a[i], atol=1e-6, rtol=0)
        top_left = reference_map[:, :9, :9].expand_as(maps_short[i])
        torch.testing.assert_close(maps_short[i], top_left, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------- 6. staticembqk


def perturb_first_mlp(model) -> None:
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-2.0)


@pytest.mark.parametrize("mixer, map_may_change", [("staticembqk", False), ("standard", True)])
def test_staticembqk_map_ignores_hidden_state(mixer, map_may_change):
    """Changing layer 1's MLP changes the hidden state fed to layer 2 and the output, but a staticembqk
    layer-2 map stays the same (a standard layer, the control, changes)."""
    model = make_model(f"uniform:{mixer}")
    input_ids = random_ids(2, 15)
    with torch.no_grad():
        before = model(input_ids, output_attentions=True, output_hidden_states=True)
        perturb_first_mlp(model)
        after = model(input_ids, output_attentions=True, output_hidden_states=True)
    assert (after.hidden_states[1] - before.hidden_states[1]).abs().max() > 1e-2
    assert (after.logits - before.logits).abs().max() > 1e-2
    map_change = (after.attentions[1] - before.attentions[1]).abs().max()
    if map_may_change:
        assert map_change > 1e-3
    else:
        assert map_change < 1e-6


def renormalised_without_column(weights: torch.Tensor, column: int) -> torch.Tensor:
    """Map rows with one key column removed and renormalised (what is left of softmax ratios)."""
    kept = weights.clone()
    kept[..., column] = 0
    return kept / kept.sum(-1, keepdim=True)


@pytest.mark.parametrize("mixer, ratios_may_change", [("staticembqk", False), ("standard", True)])
def test_staticembqk_map_is_context_free(mixer, ratios_may_change):
    """In a later staticembqk layer, s_ij depends only on tokens i, j: replacing the token at position m
    leaves the weight ratios between the other keys of every other row unchanged (standard: they change)."""
    model = make_model(f"uniform:{mixer}")
    input_ids, m = random_ids(2, 12), 4
    before = maps_of(model, input_ids)[1]
    after = maps_of(model, replace_token(input_ids, m))[1]
    rows = [i for i in range(input_ids.shape[1]) if i != m and i > 0]  # row 0 has only its own key
    drift = renormalised_without_column(after, m) - renormalised_without_column(before, m)
    drift = drift[:, :, rows].abs().max()
    if ratios_may_change:
        assert drift > 1e-3
    else:
        assert drift < 1e-5


# --------------------------------------------------------------------- 7. nonapprox with huge scores


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["large-positive", "large-negative"])
def test_nonapprox_fast_path_survives_huge_scores(sign):
    """With pre-softmax scores beyond 1e3 (both signs: exp overflows or underflows naively), the chunked
    fast path stays finite and matches the reference path, gradients included."""
    model = make_model("uniform:nonapprox")
    mixer = model.model.layers[1].self_attn
    with torch.no_grad():
        mixer.q_proj.weight.mul_(40.0)
        mixer.k_proj.weight.mul_(40.0 * sign)
    input_ids = random_ids(2, 23)
    with torch.no_grad():
        scores = model(input_ids, output_mixer_scores=True).mixer_scores[1]
    assert (sign * scores).max() > 1e3
    fast, reference = logits_of(model, input_ids, "fast"), logits_of(model, input_ids, "reference")
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    fast_grads = parameter_grads(model, input_ids, "fast")
    assert all(torch.isfinite(g).all() for g in fast_grads.values())
    # The softmax is saturated, so this layer's W_q/W_k gradients nearly vanish (~1e-9) and both paths
    # resolve them only to float32 rounding of the O(1) terms that cancel: compare on the model's scale.
    assert_grads_close(fast_grads, parameter_grads(model, input_ids, "reference"), rtol=1e-3, floor=1e-4)


# ------------------------------------------------------------------ 8. gradients via the shadow stream


def next_token_loss(model, input_ids, implementation):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=input_ids, mixer_implementation=implementation).loss
    loss.backward()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mixer", SHADOW_MIXERS)
def test_shadow_stream_gets_query_key_gradients(mixer, implementation):
    """W_q/W_k of a shadow-stream layer only act on the shadow stream, yet they receive gradients."""
    model = make_model(f"uniform:{mixer}")
    next_token_loss(model, random_ids(2, 12), implementation)
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.weight.grad.abs().max() > 0
        assert layer.self_attn.k_proj.weight.grad.abs().max() > 0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rndembqk_gradient_reaches_shadow_input(implementation):
    """The loss is differentiable w.r.t. the noise input ε of the shadow stream: rows 0..L-2 get gradients,
    rows from L on none (row L-1 only shapes the last position's map, whose logits have no target)."""
    model = make_model("uniform:rndembqk")
    noise = model.model.shadow_noise.requires_grad_(True)
    next_token_loss(model, random_ids(2, 12), implementation)
    row_norms = noise.grad.norm(dim=-1)
    assert (row_norms[:11] > 0).all()
    assert (row_norms[12:] == 0).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fixedseqqk_gradient_reaches_fixed_sequence_embeddings(implementation):
    """Embedding rows of fixed-sequence tokens absent from the input still get gradients (through the
    shadow stream); rows of tokens in neither get none. Untied head, so the LM head does not touch them."""
    model = make_model("uniform:fixedseqqk", tie=False)
    input_ids = random_ids(2, 12)
    next_token_loss(model, input_ids, implementation)
    row_norms = model.model.embed_tokens.weight.grad.norm(dim=-1)
    shadow_ids = model.model.shadow_token_ids[:12].tolist()
    seen = set(input_ids.flatten().tolist())
    # The last shadow position only shapes the last row of the map, whose logits have no target.
    shadow_only = sorted(set(shadow_ids[:-1]) - seen)
    unused = sorted(set(range(VOCAB)) - set(shadow_ids) - seen)
    assert len(shadow_only) >= 3 and unused
    assert (row_norms[shadow_only] > 0).all()
    assert (row_norms[unused] == 0).all()


def test_approximate_default_chunking_matches_reference_past_the_crossover():
    """With the default chunk (2·d_h²) a sequence longer than one chunk runs the running-sum form."""
    torch.manual_seed(0)
    config = AttnLabConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=6,
        max_position_embeddings=160,
        layers="uniform:approximate",
        initializer_range=0.2,
    )
    model = AttnLabForCausalLM(config).eval()
    assert model.model.layers[0].self_attn.chunk_size is None  # default: 2 · 6² = 72 positions per chunk
    input_ids = torch.randint(0, VOCAB, (2, 150))  # three chunks, the last one partial
    with torch.no_grad():
        fast = model(input_ids).logits
        reference = model(input_ids, mixer_implementation="reference").logits
    assert torch.allclose(fast, reference, atol=1e-5)


# ------------------------------------------- 9. the fast path's shared maps and vectorised prefix softmax


SHARED_MAP_KERNELS = ("shared_map_attention", "padded_shared_map_attention")


@pytest.mark.parametrize("kernel", SHARED_MAP_KERNELS)
def test_shared_map_kernels_match_fused_attention(kernel, monkeypatch):
    """The CPU shared-map kernels (`shared_map_attention` in blocks of 4 query rows: lengths inside one block,
    on a block edge and with a partial last block; `padded_shared_map_attention`) give the fused kernel's
    output for each sequence of a batch-1 map, and the same gradients for queries, keys and values (float32
    rounding: ∂q of row 0, zero in exact arithmetic, comes out ~1e-6 from the fused kernel)."""
    monkeypatch.setattr(standard, "SHARED_MAP_BLOCK", 4)
    generator = torch.Generator().manual_seed(0)
    for seq_len in (1, 3, 8, 13):
        query, key = (torch.randn(1, 2, seq_len, 6, generator=generator).requires_grad_() for _ in range(2))
        value = torch.randn(3, 2, seq_len, 6, generator=generator).requires_grad_()
        output = getattr(standard, kernel)(query, key, value)
        expected = F.scaled_dot_product_attention(
            query.expand(3, -1, -1, -1), key.expand(3, -1, -1, -1), value, is_causal=True
        )
        torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-5)
        upstream = torch.randn(expected.shape, generator=generator)
        grads = torch.autograd.grad(output, (query, key, value), upstream)
        expected_grads = torch.autograd.grad(expected, (query, key, value), upstream)
        for name, grad, expected_grad in zip("qkv", grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"∂{name}: {m}")


def loss_and_grads(model, input_ids, implementation, attention_mask=None):
    """Logits and every parameter's gradient (plus the rndembqk noise input's) for the next-token loss of the
    real tokens."""
    model.zero_grad(set_to_none=True)
    noise = model.model.shadow_noise
    if noise is not None:
        noise.grad = None
        noise.requires_grad_(True)
    labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    out = model(input_ids, attention_mask=attention_mask, labels=labels, mixer_implementation=implementation)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    if noise is not None:
        grads["shadow_noise"] = noise.grad.clone()
    return out.logits.detach(), grads


@pytest.mark.parametrize("kernel", SHARED_MAP_KERNELS, ids=["blocks", "padded"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "right-padded"])
@pytest.mark.parametrize(
    "layers",
    ["uniform:rndembqk", "uniform:fixedseqqk", "hybrid:rndembqk", ["fixedseqqk", "staticembqk", "fixedseqqk"]],
    ids=lambda p: p if isinstance(p, str) else "mixed",
)
def test_shadow_row_fast_path_matches_separate_streams(layers, padded, kernel, monkeypatch):
    """The fast path runs the shadow stream as row 0 of the batch, sharing each map with it (through either
    CPU kernel; blocks of 4 query rows), instead of a separate batch-1 pass: logits and gradients (every
    parameter, the noise input of rndembqk) are the reference path's, which runs the stream on its own.
    Batch 3, length 13, with and without right padding (the loss skips padding)."""
    monkeypatch.setattr(standard, "SHARED_MAP_BLOCK", 4)
    model = make_model(layers)
    calls = {"separate streams": 0, "shared-map batches": []}
    separate = model.model._shadow_stream

    def count_separate(*args, **kwargs):
        calls["separate streams"] += 1
        return separate(*args, **kwargs)

    def record_batch(query, key, value, kernel=getattr(standard, kernel)):
        calls["shared-map batches"].append(value.shape[0])
        return kernel(query, key, value)

    monkeypatch.setattr(model.model, "_shadow_stream", count_separate)
    monkeypatch.setattr(standard, "shared_map_attention", record_batch)  # float32 on the CPU: always this one
    rows = [random_ids(1, n, seed=20 + n)[0] for n in (13, 9, 4)] if padded else list(random_ids(3, 13))
    input_ids, mask = pad(rows, "right")
    mask = mask if padded else None
    fast_logits, fast_grads = loss_and_grads(model, input_ids, "fast", mask)
    assert calls["separate streams"] == 0
    shadow_layers = sum(layer.mixer_type in SHADOW_MIXERS for layer in model.model.layers)
    # unpadded: the shadow row and the batch share each map; the last layer's map serves the batch alone
    assert calls["shared-map batches"] == ([] if padded else [4] * (shadow_layers - 1) + [3])
    reference_logits, reference_grads = loss_and_grads(model, input_ids, "reference", mask)
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(fast_logits[real], reference_logits[real], atol=1e-5, rtol=1e-5)
    assert_grads_close(fast_grads, reference_grads)
    for layer in model.model.layers:  # W_q/W_k of shadow layers act only on the stream, yet learn
        assert layer.self_attn.q_proj.weight.grad.abs().max() > 0


def test_shadow_row_fast_path_keeps_positions_and_hidden_states():
    """With explicit per-row position_ids (which the standard layers of a hybrid use and the shadow row
    ignores) and output_hidden_states, the fast path's logits and every hidden state (batch rows only)
    equal the reference path's."""
    model = make_model("hybrid:rndembqk")
    input_ids = random_ids(2, 11)
    positions = torch.arange(11)
    position_ids = torch.stack([positions + 3, positions + 5 * (positions >= 6)])
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        with torch.no_grad():
            outputs[implementation] = model(
                input_ids, position_ids=position_ids, output_hidden_states=True, mixer_implementation=implementation
            )
    fast, reference = outputs["fast"], outputs["reference"]
    torch.testing.assert_close(fast.logits, reference.logits, atol=1e-5, rtol=1e-5)
    assert len(fast.hidden_states) == len(reference.hidden_states) == 4
    for got, expected in zip(fast.hidden_states, reference.hidden_states):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def float64_prefix_softmax(scores: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """o_i = Σ_{j ≤ i} exp(s_j) v_j / Σ_{j ≤ i} exp(s_j) over real keys j (and i itself), explicitly in float64."""
    seq_len = scores.shape[-1]
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    if keep is not None:
        allowed = (allowed & keep[:, None, None, :]) | torch.eye(seq_len, dtype=torch.bool)
    logits = scores.double()[..., None, :].expand(*scores.shape, seq_len).masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1) @ value.double()


@pytest.mark.parametrize("chunk_size", [1, 3, 32])
def test_vectorised_prefix_softmax_matches_float64_across_chunks(chunk_size):
    """`chunked_prefix_softmax` (all chunks at once) against the explicit float64 prefix softmax, outputs and
    gradients, where scores jump by ±10⁴ between chunks (each carry is rescaled to a new maximum, and
    chunks far below it underflow exactly as they should), with padded keys, lengths 1, 7 and 40."""
    generator = torch.Generator().manual_seed(0)
    for seq_len in (1, 7, 40):
        scores = torch.randn(2, 3, seq_len, generator=generator)
        scores[..., seq_len // 3 :] += 1e4
        scores[..., 2 * seq_len // 3 :] -= 2e4
        scores.requires_grad_()
        value = torch.randn(2, 3, seq_len, 4, generator=generator).requires_grad_()
        keep = torch.ones(2, seq_len, dtype=torch.bool)
        keep[1, : seq_len // 2] = False
        upstream = torch.randn(2, 3, seq_len, 4, generator=generator)
        output = nonapprox.chunked_prefix_softmax(scores, value, keep, chunk_size)
        exact_inputs = [tensor.detach().double().requires_grad_() for tensor in (scores, value)]
        expected = float64_prefix_softmax(*exact_inputs, keep)
        torch.testing.assert_close(output.double(), expected, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(output, (scores, value), upstream)
        expected_grads = torch.autograd.grad(expected, exact_inputs, upstream.double())
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad.double(), expected_grad, atol=1e-5, rtol=1e-5)


def training_losses(layers, implementation: str, steps: int = 30) -> list[float]:
    """The losses of `steps` AdamW steps (the trainer's `build_optimizer`, lr 1e-3) on one random batch."""
    model = make_model(layers).train()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, beta2=0.99))
    input_ids = random_ids(3, 37, seed=3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids, mixer_implementation=implementation).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("prefix", ["blocks", "features"])
def test_thirty_training_steps_of_the_taylor_kernel_match_the_explicit_path(prefix, monkeypatch):
    """30 steps of `uniform:approximate` through the blocked kernel (blocks of 8, 37 tokens: five blocks, the last
    one partial; earlier keys summed explicitly or through φ) give the explicit path's losses within 1e-5."""
    monkeypatch.setattr(taylor, "BLOCK_SIZE", {"blocks": 8, "features": 8})
    monkeypatch.setattr(taylor, "FEATURES_FROM", 0.0 if prefix == "features" else 1e9)
    fast, reference = (training_losses("uniform:approximate", implementation) for implementation in IMPLEMENTATIONS)
    assert fast[-1] < fast[0] - 0.1  # it learns
    assert max(abs(a - b) for a, b in zip(fast, reference)) < 1e-5


@pytest.mark.parametrize("layers", ["uniform:rndembqk", "hybrid:fixedseqqk", "uniform:nonapprox"])
def test_thirty_training_steps_of_the_fast_paths_match_the_explicit_path(layers, monkeypatch):
    """The same for the shared maps (the shadow row with its blocked map kernel, blocks of 16 rows) and the
    vectorised prefix softmax (chunks of 5): 30 steps, losses within 1e-5 of the explicit path's (measured
    ≤ 4.8e-7). Not staticembqk: its fast path is the fused SDPA kernel, and its losses drift apart steadily
    by float32 rounding alone (1.5e-5 after 30 steps; standard's SDPA path stays within 4.8e-7)."""
    monkeypatch.setattr(standard, "SHARED_MAP_BLOCK", 16)
    fast, reference = (training_losses(layers, implementation) for implementation in IMPLEMENTATIONS)
    assert fast[-1] < fast[0] - 0.1
    assert max(abs(a - b) for a, b in zip(fast, reference)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA fast paths (FlexAttention, SDPA on the GPU)")
@pytest.mark.parametrize("mixer", BUILTIN_MIXERS)
def test_cuda_fast_path_matches_reference(mixer):
    """On CUDA, in float32 (TF32 off), the fast path (FlexAttention for approximate, the GPU's SDPA, the
    vectorised prefix softmax) gives the reference path's logits and gradients, full and right-padded; under
    bf16 autocast the loss stays within 2 % of float32's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_model(f"hybrid:{mixer}", hidden_size=64).cuda()  # heads of 16 dims: FlexAttention's least
    input_ids = random_ids(3, 37).cuda()
    fast, reference = logits_of(model, input_ids, "fast"), logits_of(model, input_ids, "reference")
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    assert_grads_close(parameter_grads(model, input_ids, "fast"), parameter_grads(model, input_ids, "reference"))
    rows = [random_ids(1, n, seed=20 + n)[0] for n in (37, 20, 9)]
    padded_ids, mask = (tensor.cuda() for tensor in pad(rows, "right"))
    real = mask.bool()
    fast, reference = (
        logits_of(model, padded_ids, implementation, attention_mask=mask)[real] for implementation in IMPLEMENTATIONS
    )
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    full = model(input_ids, labels=input_ids).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(input_ids, labels=input_ids).loss
    assert abs(half.item() - full.item()) < 0.02 * full.item()
