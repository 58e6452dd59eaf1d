"""The Taylor attention kernels (attnlab.kernels.taylor) against the explicit `approximate` of docs/method.md §3.

Every fast path must be the same function as `reference_taylor_attention` (explicit L×L, float32) in outputs and
in gradients w.r.t. q, k and v: in float64 against the same explicit formula evaluated in float64 (round-off only,
tight), in float32 against the reference itself (tolerance measured: largest errors ~4e-6 absolute on O(1) values,
the reference's own distance to float64), in bf16 loosely. Lengths cross block boundaries (L < block, L = block,
block ± 1, k·block ± 1, not a multiple), with left padding as in batched generation (including a row that is all
padding: its queries see only themselves), GQA-expanded keys/values, and torch.autograd.gradcheck on tiny cases.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from attnlab.kernels import taylor
from attnlab.kernels.taylor import blocked_taylor_attention, flex_taylor_attention
from attnlab.mixers.approximate import chunked_taylor_attention, reference_taylor_attention, taylor_exp
from attnlab.mixers.base import allowed_positions

PREFIXES = ("blocks", "features")
FLOAT32_TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # measured max |error| 3.8e-6 (grad v), relative 9e-5 (grad k)


def explicit_taylor(query, key, value, key_padding_mask, scaling):
    """Spec §3 in the inputs' own precision: A_ij = f(s_ij) / Σ_j' f(s_ij') over `allowed_positions`."""
    scores = query @ key.transpose(-1, -2) * scaling
    weights = taylor_exp(scores) * allowed_positions(query.shape[2], key_padding_mask, query.device)
    return (weights / weights.sum(-1, keepdim=True)) @ value


def left_padding(batch: int, seq_len: int) -> torch.Tensor:
    """[batch, seq] bool: row 0 unpadded, row 1 half left-padded, row 2 all padding, row 3 one pad token, …"""
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    pads = [0, seq_len // 2, seq_len, 1]
    for row in range(batch):
        mask[row, : pads[row % len(pads)]] = False
    return mask


def random_qkv(batch, heads, seq_len, head_dim, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, heads, seq_len, head_dim, generator=generator, dtype=dtype).requires_grad_()
        for _ in range(3)
    )


def outputs_and_grads(function, inputs, grad_output):
    output = function(*inputs)
    return (output, *torch.autograd.grad(output, inputs, grad_output))


# ------------------------------------------------------------------------------------- blocked_taylor_attention


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
@pytest.mark.parametrize(
    "seq_len, block_size",
    [(1, 16), (5, 16), (15, 16), (16, 16), (17, 16), (40, 16), (47, 16), (49, 16), (33, 8), (64, 8)],
)
def test_blocked_matches_explicit_float64(prefix, padded, seq_len, block_size):
    batch, heads, head_dim = 4, 2, 8
    scaling = head_dim**-0.5
    inputs = random_qkv(batch, heads, seq_len, head_dim, seed=seq_len)
    mask = left_padding(batch, seq_len) if padded else None
    grad_output = torch.randn_like(inputs[0])
    expected = outputs_and_grads(lambda q, k, v: explicit_taylor(q, k, v, mask, scaling), inputs, grad_output)
    actual = outputs_and_grads(
        lambda q, k, v: blocked_taylor_attention(q, k, v, mask, scaling, block_size, prefix), inputs, grad_output
    )
    for name, got, want in zip(("output", "dq", "dk", "dv"), actual, expected):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_blocked_matches_reference_float32(prefix):
    """cpu-tiny's head width, several blocks and a partial one, padding: against the module's float32 reference."""
    batch, heads, seq_len, head_dim = 2, 4, 150, 32
    scaling = head_dim**-0.5
    inputs = random_qkv(batch, heads, seq_len, head_dim, dtype=torch.float32)
    mask = left_padding(batch, seq_len)
    allowed = allowed_positions(seq_len, mask, inputs[0].device)
    grad_output = torch.randn_like(inputs[0])
    expected = outputs_and_grads(
        lambda q, k, v: reference_taylor_attention(q, k, v, allowed, scaling)[0], inputs, grad_output
    )
    actual = outputs_and_grads(
        lambda q, k, v: blocked_taylor_attention(q, k, v, mask, scaling, 64, prefix), inputs, grad_output
    )
    for name, got, want in zip(("output", "dq", "dk", "dv"), actual, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, **FLOAT32_TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_blocked_gradcheck(prefix):
    """Finite differences in float64 on a tiny padded case with three blocks (one partial)."""
    batch, heads, seq_len, head_dim = 2, 1, 11, 3
    inputs = random_qkv(batch, heads, seq_len, head_dim)
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[1, :5] = False
    assert torch.autograd.gradcheck(
        lambda q, k, v: blocked_taylor_attention(q, k, v, mask, head_dim**-0.5, 4, prefix), inputs
    )


@pytest.mark.parametrize("prefix", PREFIXES)
def test_blocked_gqa_expanded_heads(prefix):
    """Keys/values of 2 heads shared by 4 query heads (repeat_interleave, as the mixers expand them): gradients
    reach the shared heads summed over their group."""
    batch, seq_len, head_dim = 2, 37, 8
    scaling = head_dim**-0.5
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(batch, 4, seq_len, head_dim, generator=generator, dtype=torch.float64, requires_grad=True)
    key, value = (
        torch.randn(batch, 2, seq_len, head_dim, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    mask = left_padding(batch, seq_len)
    grad_output = torch.randn_like(query)

    def expanded(function):
        return lambda q, k, v: function(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))

    expected = outputs_and_grads(
        expanded(lambda q, k, v: explicit_taylor(q, k, v, mask, scaling)), (query, key, value), grad_output
    )
    actual = outputs_and_grads(
        expanded(lambda q, k, v: blocked_taylor_attention(q, k, v, mask, scaling, 16, prefix)),
        (query, key, value),
        grad_output,
    )
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_blocked_bfloat16_inputs(prefix):
    """bf16 in, bf16 out and bf16 gradients, float32 inside: close to the float32 reference of the same inputs."""
    batch, heads, seq_len, head_dim = 2, 4, 100, 32
    scaling = head_dim**-0.5
    inputs = random_qkv(batch, heads, seq_len, head_dim, dtype=torch.bfloat16)
    grad_output = torch.randn_like(inputs[0])
    allowed = allowed_positions(seq_len, None, inputs[0].device)
    expected = outputs_and_grads(
        lambda q, k, v: reference_taylor_attention(q, k, v, allowed, scaling)[0], inputs, grad_output
    )
    actual = outputs_and_grads(
        lambda q, k, v: blocked_taylor_attention(q, k, v, None, scaling, 32, prefix), inputs, grad_output
    )
    for got, want in zip(actual, expected):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2)


def test_blocked_keeps_no_pairwise_tensor_for_backward():
    """Only q, k, v, the output and the per-row normaliser are saved: nothing of size L×L."""
    batch, heads, seq_len, head_dim = 1, 2, 300, 8
    inputs = random_qkv(batch, heads, seq_len, head_dim, dtype=torch.float32)
    output = blocked_taylor_attention(*inputs, None, head_dim**-0.5, 64, "blocks")
    saved = output.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(batch, heads, seq_len, head_dim)] * 4 + [(batch, heads, seq_len, 1)]


@pytest.mark.parametrize("prefix", ["auto", *PREFIXES])
def test_blocked_without_grad_matches_chunked_form(prefix):
    """The no-grad (inference) forward with the default block sizes, against the existing linear form."""
    batch, heads, seq_len, head_dim = 2, 2, 600, 32
    scaling = head_dim**-0.5
    query, key, value = (t.detach() for t in random_qkv(batch, heads, seq_len, head_dim, dtype=torch.float32))
    mask = left_padding(batch, seq_len)
    with torch.no_grad():
        actual = blocked_taylor_attention(query, key, value, mask, scaling, prefix=prefix)
        expected = chunked_taylor_attention(query, key, value, mask, scaling, 256)
    torch.testing.assert_close(actual, expected, **FLOAT32_TOLERANCE)


@pytest.mark.parametrize(
    "prefix, setting, value", [("blocks", "EXPLICIT_SLAB", 3 * 8 * 32), ("features", "FEATURE_TOKENS", 100)]
)
def test_blocked_steps_over_row_groups(monkeypatch, prefix, setting, value):
    """Batch·head rows processed 3 at a time (8 rows: a ragged last group; padding that differs between rows)."""
    monkeypatch.setattr(taylor, setting, value)
    batch, heads, seq_len, head_dim = 4, 2, 29, 4
    scaling = head_dim**-0.5
    inputs = random_qkv(batch, heads, seq_len, head_dim, seed=7)
    mask = left_padding(batch, seq_len)
    grad_output = torch.randn_like(inputs[0])
    expected = outputs_and_grads(lambda q, k, v: explicit_taylor(q, k, v, mask, scaling), inputs, grad_output)
    actual = outputs_and_grads(
        lambda q, k, v: blocked_taylor_attention(q, k, v, mask, scaling, 8, prefix), inputs, grad_output
    )
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------- flex_taylor_attention


def flex_or_skip(*args, **kwargs):
    """Run flex_taylor_attention, skipping the test only where this torch has no FlexAttention module (a failure
    inside FlexAttention fails the test)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as error:
        pytest.skip(f"FlexAttention unavailable here: {error}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager FlexAttention warns that it is unfused
        return flex_taylor_attention(*args, **kwargs)


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
def test_flex_forward_on_cpu_matches_reference(padded):
    """FlexAttention's unfused CPU forward with the log f score_mod (CPU has no FlexAttention backward)."""
    batch, heads, seq_len, head_dim = 4, 2, 37, 16
    scaling = head_dim**-0.5
    query, key, value = (t.detach() for t in random_qkv(batch, heads, seq_len, head_dim, dtype=torch.float32))
    mask = left_padding(batch, seq_len) if padded else None
    expected = reference_taylor_attention(query, key, value, allowed_positions(seq_len, mask, query.device), scaling)[0]
    actual = flex_or_skip(query, key, value, mask, scaling, compiled=False)
    torch.testing.assert_close(actual, expected, **FLOAT32_TOLERANCE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention (forward and backward) needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
def test_flex_cuda_matches_reference(dtype, padded):
    """The compiled fused kernel: outputs and gradients against the float32 reference, across 128-blocks."""
    batch, heads, seq_len, head_dim = 4, 4, 300, 32
    scaling = head_dim**-0.5
    inputs = tuple(t.detach().cuda().requires_grad_() for t in random_qkv(batch, heads, seq_len, head_dim, dtype=dtype))
    mask = left_padding(batch, seq_len).cuda() if padded else None
    grad_output = torch.randn_like(inputs[0])
    allowed = allowed_positions(seq_len, mask, inputs[0].device)
    expected = outputs_and_grads(
        lambda q, k, v: reference_taylor_attention(q, k, v, allowed, scaling)[0], inputs, grad_output
    )
    actual = outputs_and_grads(lambda q, k, v: flex_taylor_attention(q, k, v, mask, scaling), inputs, grad_output)
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-4)
    for name, got, want in zip(("output", "dq", "dk", "dv"), actual, expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), **tolerance, msg=lambda m, n=name: f"{n}: {m}")
