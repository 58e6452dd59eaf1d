"""Inspection outputs (`output_attentions`, `output_mixer_scores`) against the spec's formulas (PAPER.md §2, §3, §6).

Every expected value here is computed independently of attnlab's mixers and modules: plain float64 torch
ops written from the spec text, using only the model's parameters, buffers, config fields and its own
`output_hidden_states` (HF convention: hidden_states[l] is the input of layer l, hidden_states[0] the
embedding output, the last entry the final normed output).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnlab import AttnLabConfig, AttnLabForCausalLM

ATTENTION_MIXERS = ("standard", "approximate", "nonapprox", "staticembqk", "rndembqk", "fixedseqqk")
SHADOW_AS_STANDARD = ("standard", "rndembqk", "fixedseqqk")  # attend over the shadow sequence itself
ALL_MIXERS = ATTENTION_MIXERS + ("mlp",)
SEQ_LEN = 12
ATOL = 2e-5
ROW_MAX_RANGE = (0.2, 0.5)  # mean row max of a map that is neither near-uniform nor near-one-hot (see mean_row_max)


# ----------------------------------------------------------------------------------------------------------
# Model construction
# ----------------------------------------------------------------------------------------------------------


def make_config(layers: str, **overrides) -> AttnLabConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        layers=layers,
    )
    kwargs.update(overrides)
    return AttnLabConfig(**kwargs)


def make_model(layers: str, seed: int = 0, qk_scale: float = 1.0, **overrides) -> AttnLabForCausalLM:
    """A tiny model whose weights are re-drawn large enough that the maps are far from uniform.

    The default init (std 0.02, unit norms) gives near-uniform maps, which would hide most formula errors.
    `qk_scale` multiplies the W_q, W_k weights and biases (the same draws), which sets how peaked the maps are.
    """
    torch.manual_seed(seed)
    model = AttnLabForCausalLM(make_config(layers, **overrides)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * noise)  # RMSNorm gains (incl. QK-norm), away from 1
            elif name.endswith("bias"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.3 * noise)
            if ".q_proj." in name or ".k_proj." in name:
                param.mul_(qk_scale)
    return model


def make_ids(batch: int = 2, seq_len: int = SEQ_LEN, vocab: int = 64, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def inspect(model: AttnLabForCausalLM, ids: torch.Tensor):
    with torch.no_grad():
        return model(ids, output_attentions=True, output_hidden_states=True, output_mixer_scores=True)


# ----------------------------------------------------------------------------------------------------------
# Independent float64 reference (docs/method.md §2-3)
# ----------------------------------------------------------------------------------------------------------


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * h / sqrt(mean(h^2) + eps) over the last dimension."""
    h = f64(h)
    return f64(weight) * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    y = x @ f64(layer.weight).T
    return y if layer.bias is None else y + f64(layer.bias)


def swiglu(x: torch.Tensor, mlp) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), no biases."""
    return linear(F.silu(linear(x, mlp.gate_proj)) * linear(x, mlp.up_proj), mlp.down_proj)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of x [batch, heads, seq, d_h] at positions 0..seq-1."""
    seq_len, d_h = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d_h, 2, dtype=torch.float64) / d_h)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # [seq, d_h]
    first, second = x[..., : d_h // 2], x[..., d_h // 2 :]
    rotated = torch.cat([-second, first], dim=-1)
    return x * angles.cos() + rotated * angles.sin()


def split_heads(y: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[batch, seq, heads*d_h] -> [batch, heads, seq, d_h]."""
    batch, seq_len, width = y.shape
    return y.reshape(batch, seq_len, num_heads, width // num_heads).transpose(1, 2)


def kv_for_query_heads(t: torch.Tensor, config: AttnLabConfig) -> torch.Tensor:
    """GQA: query head h reads K/V head h // (heads / kv_heads)."""
    group = config.num_attention_heads // config.num_key_value_heads
    index = torch.arange(config.num_attention_heads) // group
    return t[:, index]


def queries_keys(attn, source: torch.Tensor, config: AttnLabConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head q, k = W source + b (with optional per-head QK-norm), before RoPE; k expanded for GQA."""
    q = split_heads(linear(source, attn.q_proj), config.num_attention_heads)
    k = split_heads(linear(source, attn.k_proj), config.num_key_value_heads)
    if config.qk_norm:
        q = rms_norm(q, attn.q_norm.weight, config.rms_norm_eps)
        k = rms_norm(k, attn.k_norm.weight, config.rms_norm_eps)
    return q, kv_for_query_heads(k, config)


def causal_mask(seq_len: int) -> torch.Tensor:
    return torch.ones(seq_len, seq_len, dtype=torch.bool).tril()


def rope_scores(attn, source: torch.Tensor, config: AttnLabConfig) -> torch.Tensor:
    """s_ij = RoPE_i(q_i)·RoPE_j(k_j)/sqrt(d_h): [batch, heads, seq, seq] (all entries, unmasked)."""
    q, k = queries_keys(attn, source, config)
    q, k = rope(q, config.rope_theta), rope(k, config.rope_theta)
    return q @ k.transpose(-1, -2) / math.sqrt(config.head_dim_resolved)


def softmax_map(scores: torch.Tensor) -> torch.Tensor:
    mask = causal_mask(scores.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def taylor_map(scores: torch.Tensor) -> torch.Tensor:
    """A_ij = f(s_ij) / sum_{j'<=i} f(s_ij'), f(s) = 1 + s + s^2/2."""
    f = (1 + scores + scores**2 / 2) * causal_mask(scores.shape[-1])
    return f / f.sum(-1, keepdim=True)


def nonapprox_scores(attn, x: torch.Tensor, config: AttnLabConfig) -> torch.Tensor:
    """s_j = SiLU(W_q x + b_q)_j · (W_k x + b_k)_j / sqrt(d_h): [batch, heads, seq]."""
    q, k = queries_keys(attn, x, config)
    return (F.silu(q) * k).sum(-1) / math.sqrt(config.head_dim_resolved)


def prefix_softmax_map(position_scores: torch.Tensor) -> torch.Tensor:
    """A_ij = exp(s_j) / sum_{j'<=i} exp(s_j') for j <= i."""
    seq_len = position_scores.shape[-1]
    rows = position_scores[:, :, None, :].expand(-1, -1, seq_len, -1)
    return softmax_map(rows)


def mix(attn, x: torch.Tensor, weights: torch.Tensor, config: AttnLabConfig) -> torch.Tensor:
    """o = W_o (A v), v = W_v x + b_v per head (a shared map of batch 1 broadcasts over the batch)."""
    v = kv_for_query_heads(split_heads(linear(x, attn.v_proj), config.num_key_value_heads), config)
    o = weights @ v  # [batch, heads, seq, d_h]
    batch, _, seq_len, _ = o.shape
    return linear(o.transpose(1, 2).reshape(batch, seq_len, -1), attn.o_proj)


def block(layer, h: torch.Tensor, weights: torch.Tensor | None, config: AttnLabConfig) -> torch.Tensor:
    """h + Mixer(RMSNorm1(h)), then + SwiGLU(RMSNorm2(h)); the mixer applies `weights` (or the token MLP)."""
    h = f64(h)
    x = rms_norm(h, layer.input_layernorm.weight, config.rms_norm_eps)
    if weights is None:
        h = h + swiglu(x, layer.self_attn.token_mlp)
    else:
        h = h + mix(layer.self_attn, x, weights, config)
    return h + swiglu(rms_norm(h, layer.post_attention_layernorm.weight, config.rms_norm_eps), layer.mlp)


def standard_block(layer, h: torch.Tensor, config: AttnLabConfig) -> torch.Tensor:
    """A full pre-norm block whose mixer is standard attention over h itself."""
    x = rms_norm(h, layer.input_layernorm.weight, config.rms_norm_eps)
    return block(layer, h, softmax_map(rope_scores(layer.self_attn, x, config)), config)


def shadow_stream_inputs(model: AttnLabForCausalLM, x0: torch.Tensor, mixer: str) -> list[torch.Tensor]:
    """X_{l-1} for every layer l up to the last `mixer` layer (the stream's last user; later layers never
    read it): the fixed sequence (batch 1) run through full blocks, attending over itself as standard."""
    config = model.config
    last_user = max(i for i, kind in enumerate(config.mixer_types) if kind == mixer)
    states = [f64(x0)[None]]
    for layer in model.model.layers[:last_user]:
        if layer.mixer_type not in SHADOW_AS_STANDARD:
            raise NotImplementedError(f"this test's shadow stream does not model a {layer.mixer_type} layer")
        states.append(standard_block(layer, states[-1], config))
    return states


def expected_layer(model, layer_idx: int, hidden_states, shadow: dict):
    """(map A [batch or 1, heads, L, L] or None, scores or None) of layer `layer_idx`, by docs/method.md §3."""
    config = model.config
    layer = model.model.layers[layer_idx]
    attn, kind = layer.self_attn, layer.mixer_type
    norm = lambda h: rms_norm(h, layer.input_layernorm.weight, config.rms_norm_eps)
    x = norm(hidden_states[layer_idx])
    if kind == "mlp":
        return None, None
    if kind == "nonapprox":
        s = nonapprox_scores(attn, x, config)
        return prefix_softmax_map(s), s
    if kind == "staticembqk":
        source = norm(hidden_states[0])  # e = embedding output
    elif kind == "rndembqk":
        source = norm(shadow["noise"][layer_idx])
    elif kind == "fixedseqqk":
        source = norm(shadow["tokens"][layer_idx])
    else:  # standard, approximate: q, k from x
        source = x
    s = rope_scores(attn, source, config)
    return (taylor_map(s) if kind == "approximate" else softmax_map(s)), s


def shadow_streams(model: AttnLabForCausalLM, seq_len: int) -> dict:
    kinds = set(model.config.mixer_types)
    streams = {}
    if "rndembqk" in kinds:
        streams["noise"] = shadow_stream_inputs(model, model.model.shadow_noise[:seq_len], "rndembqk")
    if "fixedseqqk" in kinds:
        token_ids = model.model.shadow_token_ids[:seq_len]
        streams["tokens"] = shadow_stream_inputs(model, model.model.embed_tokens.weight[token_ids], "fixedseqqk")
    return streams


def expected_all_layers(model, out, seq_len: int) -> list:
    shadow = shadow_streams(model, seq_len)
    return [expected_layer(model, i, out.hidden_states, shadow) for i in range(len(model.model.layers))]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    actual, expected = f64(actual), f64(expected)
    if expected.dim() == actual.dim() and expected.shape[0] == 1:  # a map shared by the batch
        expected = expected.expand(actual.shape[0], *expected.shape[1:])
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=atol, rtol=1e-5), f"{what}: max abs error {err:.3g}"


def assert_maps_match(model, out, seq_len: int) -> None:
    """Every layer's attentions / mixer_scores equal the spec formula computed from hidden_states."""
    mask = causal_mask(seq_len)
    for i, (weights, scores) in enumerate(expected_all_layers(model, out, seq_len)):
        kind = model.config.mixer_types[i]
        if weights is None:
            assert out.attentions[i] is None, f"layer {i} ({kind}) should have no map"
            continue
        assert_close(out.attentions[i], weights, f"layer {i} ({kind}) attentions")
        got = out.mixer_scores[i]
        if kind == "nonapprox":
            assert_close(got, scores, f"layer {i} ({kind}) per-position scores")
        else:
            batch = out.attentions[i].shape[0]
            assert got.shape == (batch, model.config.num_attention_heads, seq_len, seq_len)
            assert torch.isnan(got[..., ~mask]).all(), f"layer {i} ({kind}) scores above the diagonal must be NaN"
            assert not torch.isnan(got[..., mask]).any()
            assert_close(got[..., mask], scores.expand_as(got)[..., mask], f"layer {i} ({kind}) scores")


def spec_logits(model: AttnLabForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """The whole forward per docs/method.md §2-3 in float64, from the token ids alone: [batch, seq, vocab].

    Each layer's map comes from `expected_layer` on the hidden states computed here (not the model's), is
    applied by `block`, and the final norm and LM head follow.
    """
    config = model.config
    hidden_states = [f64(model.model.embed_tokens.weight[input_ids])]  # e = Emb(t): [batch, seq, hidden]
    shadow = shadow_streams(model, input_ids.shape[1])
    for i, layer in enumerate(model.model.layers):
        weights, _ = expected_layer(model, i, hidden_states, shadow)
        hidden_states.append(block(layer, hidden_states[i], weights, config))
    return rms_norm(hidden_states[-1], model.model.norm.weight, config.rms_norm_eps) @ f64(model.lm_head.weight).T


def mean_row_max(attentions: tuple[torch.Tensor | None, ...]) -> float:
    """max_j A_ij averaged over layers (those with a map), batch, heads and rows i: 1 for one-hot maps,
    H_L / L for uniform causal maps of length L (0.13 at L = 32)."""
    return torch.stack([weights.amax(-1).mean() for weights in attentions if weights is not None]).mean().item()


def assert_attention_matters(attentions: tuple[torch.Tensor | None, ...]) -> None:
    """The maps are neither near-uniform nor near-one-hot, so a test on them sees the score scale."""
    row_max = mean_row_max(attentions)
    assert ROW_MAX_RANGE[0] <= row_max <= ROW_MAX_RANGE[1], f"mean row max {row_max:.3f} outside {ROW_MAX_RANGE}"


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_uniform_maps_match_spec_formula(mixer):
    """Uniform models: each layer's attentions and mixer_scores equal the mixer's formula (docs/method.md §3)."""
    model = make_model(f"uniform:{mixer}", num_hidden_layers=3)
    ids = make_ids()
    out = inspect(model, ids)
    assert len(out.attentions) == len(out.mixer_scores) == 3
    assert len(out.hidden_states) == 4
    assert_maps_match(model, out, SEQ_LEN)


@pytest.mark.parametrize("mixer", ATTENTION_MIXERS)
def test_maps_are_causal_row_stochastic(mixer):
    """Every attentions row sums to 1, is non-negative and is zero above the diagonal."""
    model = make_model(f"uniform:{mixer}")
    out = inspect(model, make_ids(batch=3))
    upper = ~causal_mask(SEQ_LEN)
    for weights in out.attentions:
        assert weights.shape == (3, 4, SEQ_LEN, SEQ_LEN)
        assert (weights[..., upper] == 0).all()
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, SEQ_LEN))


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_hidden_states_follow_from_maps(mixer):
    """The maps are the ones applied: hidden_states[l+1] = Block_l(hidden_states[l]) using the expected map."""
    model = make_model(f"uniform:{mixer}")
    out = inspect(model, make_ids())
    config = model.config
    expected = expected_all_layers(model, out, SEQ_LEN)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        h = block(layer, out.hidden_states[i], expected[i][0], config)
        if i == len(layers) - 1:
            h = rms_norm(h, model.model.norm.weight, config.rms_norm_eps)
        assert_close(out.hidden_states[i + 1], h, f"hidden state after layer {i} ({mixer})", atol=1e-4)
    assert_close(out.logits, out.hidden_states[-1].double() @ f64(model.lm_head.weight).T, "logits", atol=1e-4)


@pytest.mark.parametrize("mixer", ["rndembqk", "fixedseqqk"])
def test_shadow_maps_shared_and_prefix_consistent(mixer):
    """Shadow-stream maps are identical for every sequence and the length-L map is the top-left block."""
    model = make_model(f"uniform:{mixer}")
    full = inspect(model, make_ids(seq_len=20))
    short = inspect(model, make_ids(batch=3, seq_len=7, seed=9))
    for long_map, short_map in zip(full.attentions, short.attentions):
        assert torch.equal(long_map[0], long_map[1])
        assert_close(short_map, long_map[:1, :, :7, :7], f"{mixer} prefix block")


@pytest.mark.parametrize("mixer", ATTENTION_MIXERS)
def test_gqa_maps(mixer):
    """Grouped-query attention (kv_heads=2, the paper's Table 3 ablation): query head h uses key head h // 2."""
    model = make_model(f"uniform:{mixer}", num_key_value_heads=2)
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * model.config.head_dim_resolved
    out = inspect(model, make_ids())
    assert_maps_match(model, out, SEQ_LEN)


@pytest.mark.parametrize("mixer", ATTENTION_MIXERS)
def test_qk_norm_maps(mixer):
    """Qwen3-style QK-norm: per-head RMSNorm on q and k before RoPE (for nonapprox: before the SiLU)."""
    model = make_model(f"uniform:{mixer}", qk_norm=True)
    ids = make_ids()
    out = inspect(model, ids)
    assert_maps_match(model, out, SEQ_LEN)
    # The QK-norm must matter: with the q-norm weights reset to 1 the maps change.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
    assert not torch.allclose(inspect(model, ids).attentions[0], out.attentions[0], atol=1e-3)


def test_rope_theta_is_used():
    """A non-default rope_theta changes the maps and is still matched by the formula."""
    model = make_model("uniform:standard", rope_theta=100.0)
    out = inspect(model, make_ids())
    assert_maps_match(model, out, SEQ_LEN)


@pytest.mark.parametrize("mixer", ["approximate", "nonapprox", "staticembqk", "rndembqk", "fixedseqqk", "mlp"])
def test_hybrid_maps_match_each_layers_formula(mixer):
    """Hybrid models (variant in layers 1 and 3, standard in 2): every layer's map follows its own formula."""
    model = make_model(f"hybrid:{mixer}", num_hidden_layers=3)
    assert model.config.mixer_types == [mixer, "standard", mixer]
    out = inspect(model, make_ids())
    assert_maps_match(model, out, SEQ_LEN)


def test_skip_mode_runs_only_standard_layers():
    """Skip mode with the same weights: logits = only the standard layers' blocks; one map per standard layer."""
    full = make_model("hybrid:nonapprox", num_hidden_layers=4)
    skip = AttnLabForCausalLM(make_config("hybrid:nonapprox", num_hidden_layers=4, skip_nonstandard=True)).eval()
    skip.load_state_dict(full.state_dict())
    config = skip.config
    ids = make_ids()
    out = inspect(skip, ids)
    standard = [layer for layer in skip.model.layers if layer.mixer_type == "standard"]
    assert [layer.layer_idx for layer in standard] == [1, 3]
    assert len(out.attentions) == len(out.mixer_scores) == 2
    assert len(out.hidden_states) == 3

    h = f64(skip.model.embed_tokens.weight[ids])
    for k, layer in enumerate(standard):
        x = rms_norm(h, layer.input_layernorm.weight, config.rms_norm_eps)
        expected_map = softmax_map(rope_scores(layer.self_attn, x, config))
        assert_close(out.hidden_states[k], h, f"skip: input of standard layer {layer.layer_idx}", atol=1e-4)
        assert_close(out.attentions[k], expected_map, f"skip: map of standard layer {layer.layer_idx}")
        h = standard_block(layer, h, config)
    logits = rms_norm(h, skip.model.norm.weight, config.rms_norm_eps) @ f64(skip.lm_head.weight).T
    assert_close(out.logits, logits, "skip-mode logits", atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(full(ids).logits, out.logits, atol=1e-3)  # the skipped layers did matter


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_inspection_does_not_change_the_forward(mixer):
    """Asking for attentions/scores (which forces the explicit path) leaves the logits of the fast path unchanged."""
    model = make_model(f"hybrid:{mixer}", num_hidden_layers=3)
    ids = make_ids(seq_len=20)
    with torch.no_grad():
        plain = model(ids).logits
    torch.testing.assert_close(inspect(model, ids).logits, plain, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["uniform", "hybrid"])
@pytest.mark.parametrize("mixer", ATTENTION_MIXERS)
def test_logits_match_spec_forward_where_attention_matters(mixer, form):
    """Both paths' logits equal the float64 spec forward from the token ids (`spec_logits`), on maps that are
    neither uniform nor one-hot, to a tolerance that a 1% change of the score scale exceeds by far.

    Measured float32 error (max |logit − spec|, 3 layers, L = 32): ≤ 8.9e-6 over these cases (logits of
    std ≈ 1.8); scaling every score by 1.01 (W_k ×1.01) moves the logits by ≥ 6e-2.
    """
    model = make_model(f"{form}:{mixer}", qk_scale=0.7, num_hidden_layers=3)
    ids = make_ids(seq_len=32)
    with torch.no_grad():
        assert_attention_matters(model(ids, output_attentions=True).attentions)
        expected = spec_logits(model, ids)
        for implementation in ("fast", "reference"):
            logits = model(ids, mixer_implementation=implementation).logits
            torch.testing.assert_close(
                logits.double(), expected, atol=3e-5, rtol=0, msg=lambda m: f"{implementation} path: {m}"
            )
