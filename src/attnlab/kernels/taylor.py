"""Causal Taylor attention (docs/method.md §3, `approximate`) without L×L tensors: a blocked CPU kernel and
FlexAttention.

    s_ij = q_i·k_j·scaling,   f(s) = 1 + s + s²/2 (docs/method.md §3),   A_ij = f(s_ij) / Σ_{j' allowed} f(s_ij'),
    o_i = Σ_j A_ij v_j

Since 2·f(s) = (1 + s)² + 1 and the factor 2 cancels in A, the kernels compute with t_ij = 1 + s_ij:

    o_i = (Σ_j t_ij² v_j + Σ_j v_j) / (Σ_j t_ij² + n_i)        (sums over the n_i keys j that query i sees)

The "+1" part is a prefix sum of the values and a count; t² ≥ 0 is the only pairwise term, and no running maximum
is needed (unlike softmax). t comes from one matrix product of augmented vectors, t_ij = [q̃_i, 1]·[k̃_j, 1] with
q̃ = q·√scaling, k̃ = k·√scaling, and a column of ones appended to v makes one product give the numerator and the
normaliser l_i together: acc_i = Σ_j t_ij² [v_j, 1] + Σ_j [v_j, 1] = [l_i·o_i, l_i].

`blocked_taylor_attention` (CPU training): an autograd Function that keeps only q, k, v, o and l and recomputes in
backward, as FlashAttention does. Queries and keys are cut into blocks of b tokens; diagonal blocks are explicit and
causally masked; the earlier keys are summed in one of two ways (`prefix`):

- "blocks": explicit products, query block i against all its earlier keys at once (a [b, i·b] slab, reused):
  O(L²·d) work, the fastest form for short sequences;
- "features": t² = ([q̃, 1]·[k̃, 1])² = φ([q̃, 1])·φ([k̃, 1]) with φ(x) = [x_a², √2·x_a·x_b (a < b)] ((d+1)(d+2)/2
  features: the paper's Appx. I map, packed symmetrically), so block c reads the running sum
  S_c = Σ_{j < c} φ([k̃_j, 1])[v_j, 1]ᵀ: O(L·d³) work, the fastest from L ≈ 2–2.5·d² on (`FEATURES_FROM`).

Backward (FlashAttention-2's form for this normalisation): with dÕ_i = dO_i / l_i and D̃_i = dÕ_i·o_i the gradient
of acc_i is [dÕ_i, −D̃_i], so

    dv_j = Σ_i t_ij² dÕ_i + Σ_{i sees j} dÕ_i,   dt_ij = 2·t_ij·(dÕ_i·v_j − D̃_i),
    dq̃_i = Σ_j dt_ij k̃_j,   dk̃_j = Σ_i dt_ij q̃_i

— i.e. dp_ij·f'(s_ij) with dp_ij = (dO_i·v_j − dO_i·o_i)/l_i and f'(s) = 1 + s, up to the cancelled factor 2. The
feature prefix gets dv from φ(k̃)·R_c (R_c = Σ_{c' > c} φ(q̃_c')ᵀ[dÕ, −D̃]_c') and dq̃, dk̃ from the quadratic forms
x ↦ xᵀ M x that S_c and R_c define (`_quadratic_form_grad`).

Key padding (`attnlab.mixers.base.allowed_positions`): query i sees the real keys j ≤ i and always itself. Padded
keys are zeroed in [k̃, 1] and [v, 1], so t, φ and every prefix sum skip them; a padded query's own position is added
back as a per-token term; key blocks that are padding in every row of a step are skipped.

`flex_taylor_attention` (CUDA training): FlexAttention with the score modification s ↦ log f(s) (f > 0, so the
normalised Taylor map is exactly the softmax of log f): one fused kernel, compiled once per process, whose
backward also recomputes.

Layout: [batch, heads, seq, head_dim]; key/value already expanded to the query heads (GQA).
"""

from __future__ import annotations

import math
from functools import cache, lru_cache
from typing import Literal

import torch

Prefix = Literal["auto", "blocks", "features"]

# Tuned with scripts/bench_taylor_kernel.py (cpu-tiny attention: 4 heads, d_h = 32, B·L = 16384, 2 threads, fp32).
# Forward + backward s/step, 2026-12-04 (best of 2 on a shared machine, where equal cases differed by up to 1.5×):
#   L      SDPA (softmax)  blocks-128  blocks-256  features-64  features-128  chunked (autograd)  reference
#   512    0.56            0.33-0.42   0.71        1.24         0.98          0.84                1.45
#   2048   0.92            0.87-1.30   0.86        1.11         0.93          3.98                5.75
#   8192   2.72            3.12        3.26        1.02         0.89          –                   –
#   16384  5.40            7.19        7.69        1.09         1.03          –                   –
# so the crossover from explicit blocks to the feature sums lies near L = 2048-2560 at d_h = 32 (2-2.5·d_h²).
BLOCK_SIZE = {"blocks": 128, "features": 128}  # tokens per block, per prefix
FEATURES_FROM = 2.5  # "auto" sums the prefix through φ from L ≥ FEATURES_FROM·d_h² on (2560 at d_h = 32)
EXPLICIT_SLAB = 2**18  # "blocks": about this many entries in a [rows, b, L] slab (1 MiB in float32)
FEATURE_TOKENS = 4096  # "features": about this many batch·head·token rows per batched step
SQRT2 = math.sqrt(2.0)


def choose_prefix(seq_len: int, head_dim: int) -> str:
    """The faster way to sum earlier blocks at this length: "features" from L ≥ FEATURES_FROM·d_h², else "blocks".

    The explicit form costs ~L·d per query, the feature form ~d³ (both forward and backward), hence a crossover ∝ d².
    """
    return "features" if seq_len >= FEATURES_FROM * head_dim**2 else "blocks"


def blocked_taylor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scaling: float,
    block_size: int | None = None,
    prefix: Prefix = "auto",
) -> torch.Tensor:
    """Causal Taylor attention in blocks (module docstring): the same function as `reference_taylor_attention`.

    query/key: [1 or batch, heads, seq, d]; value: [batch, heads, seq, d_v]; key_padding_mask: [batch, seq] bool,
    True = real token, or None. Computes in float32 (float64 for float64 inputs) and returns [batch, heads, seq, d_v]
    in value's dtype, gradients in each input's dtype. `prefix`: "auto" = `choose_prefix`; `block_size`: None =
    `BLOCK_SIZE[prefix]`.
    """
    batch = value.shape[0]
    query, key = query.expand(batch, -1, -1, -1), key.expand(batch, -1, -1, -1)
    if prefix == "auto":
        prefix = choose_prefix(query.shape[2], query.shape[3])
    keep = None
    if key_padding_mask is not None and not bool(key_padding_mask.all()):
        keep = key_padding_mask.to(device=value.device, dtype=torch.bool)
    return _BlockedTaylorAttention.apply(query, key, value, keep, scaling, block_size or BLOCK_SIZE[prefix], prefix)


def blocked_forward_flops(seq_len: int, head_dim: int, prefix: Prefix = "auto", block_size: int | None = None) -> int:
    """Multiply-adds ×2 of one batch row and head of `blocked_taylor_attention`'s forward (value width = head_dim).

    "blocks": every query block i against key blocks 0..i, t = [q̃, 1]·[k̃, 1] and t²·[v, 1]: 2·b²·nb(nb+1)/2·(2d + 3).
    "features": the diagonal blocks alone, plus folding and reading the sums of φ (F = (d+1)(d+2)/2 features,
    width d + 2 with the normaliser): nb·b²·2(2d + 3) + 2·2·L·F·(d + 2).
    """
    if prefix == "auto":
        prefix = choose_prefix(seq_len, head_dim)
    block_size = block_size or BLOCK_SIZE[prefix]
    num_blocks = -(-seq_len // block_size)
    block = min(block_size, -(-seq_len // (8 * num_blocks)) * 8)
    pair_flops = 2 * (2 * head_dim + 3)  # per (query, key) pair: t and t²·[v, 1]
    if prefix == "blocks":
        return block * block * num_blocks * (num_blocks + 1) // 2 * pair_flops
    return num_blocks * block * block * pair_flops + 4 * seq_len * _num_features(head_dim + 1) * (head_dim + 2)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------- the Function


class _BlockedTaylorAttention(torch.autograd.Function):
    """Forward saves q, k, v, o and l ([B, H, L, 1]); backward recomputes t step by step (module docstring)."""

    @staticmethod
    def forward(ctx, query, key, value, keep, scaling: float, block_size: int, prefix: str):
        blocks = _Blocks(query, key, value, keep, scaling, block_size)
        acc = torch.empty_like(blocks.va)  # [BH, nb, b, d_v + 1]: Σ t² [v, 1], every row written by its step
        workspace = _Workspace(acc)
        for rows, first in blocks.steps(prefix):
            if prefix == "blocks":
                _explicit_forward(blocks, rows, first, acc, workspace)
            else:
                _features_forward(blocks, rows, acc, workspace)
        acc = blocks.real(acc)  # [B, H, L, d_v + 1]
        acc += blocks.real(blocks.va).cumsum(2)  # the "+1" of 2f = t² + 1: Σ_{j ≤ i} keep_j [v_j, 1]
        self_term = blocks.padded_query_self(query, key)
        if self_term is not None:  # a padded query's own position: weight pad_i·(t_ii² + 1)
            pad, diagonal = self_term
            acc += (pad * (diagonal.square() + 1)) * torch.cat([value.to(acc.dtype), torch.ones_like(diagonal)], -1)
        normaliser = acc[..., -1:].clone()  # l: [B, H, L, 1]
        output = acc[..., :-1] / normaliser  # [B, H, L, d_v]
        ctx.save_for_backward(query, key, value, output, normaliser)
        ctx.keep, ctx.scaling, ctx.block_size, ctx.prefix = keep, scaling, block_size, prefix
        return output.to(value.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, normaliser = ctx.saved_tensors
        blocks = _Blocks(query, key, value, ctx.keep, ctx.scaling, ctx.block_size)
        grad_scaled = grad_output.to(blocks.dtype) / normaliser  # dÕ = dO / l: [B, H, L, d_v]
        grad_acc = torch.zeros_like(blocks.va)  # [dÕ, −D̃]: [BH, nb, b, d_v + 1]
        real_grad_acc = blocks.real(grad_acc)
        real_grad_acc[..., :-1] = grad_scaled
        real_grad_acc[..., -1:] = -(grad_scaled * output).sum(-1, keepdim=True)
        grad_q = torch.zeros_like(blocks.qa[..., :-1])  # dq̃, dk̃, dv: [BH, nb, b, ·]
        grad_k = torch.zeros_like(blocks.ka[..., :-1])
        grad_v = torch.zeros_like(blocks.va[..., :-1])
        workspace = _Workspace(grad_acc)
        for rows, first in blocks.steps(ctx.prefix):
            if ctx.prefix == "blocks":
                _explicit_backward(blocks, rows, first, grad_acc, grad_q, grad_k, grad_v, workspace)
            else:
                _features_backward(blocks, rows, grad_acc, grad_q, grad_k, grad_v, workspace)
        grad_q, grad_k, grad_v = blocks.real(grad_q), blocks.real(grad_k), blocks.real(grad_v)
        constant = grad_scaled.flip(2).cumsum(2).flip(2)  # the "+1" part: every query i ≥ j sees a real key j
        grad_v += constant if blocks.keep is None else constant * blocks.keep[:, None, :, None]
        self_term = blocks.padded_query_self(query, key)
        if self_term is not None:
            pad, diagonal = self_term
            grad_v += (pad * (diagonal.square() + 1)) * grad_scaled
            grad_weight = (grad_scaled * value.to(blocks.dtype)).sum(-1, keepdim=True) + real_grad_acc[..., -1:]
            grad_diagonal = 2 * pad * diagonal * grad_weight  # dt_ii
            grad_q += grad_diagonal * key.to(blocks.dtype) * blocks.root
            grad_k += grad_diagonal * query.to(blocks.dtype) * blocks.root
        grad_q, grad_k = grad_q * blocks.root, grad_k * blocks.root  # q̃ = q·√scaling, k̃ = k·√scaling
        return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), None, None, None, None


class _Blocks:
    """The augmented, zero-padded operands of one call, [batch·heads, nb, b, ·] (a view of [BH, nb·b, ·]).

    qa = [q̃, 1], ka = keep·[k̃, 1], va = keep·[v, 1] (keep = 1 without padding); nb equal blocks of b ≤ block_size
    tokens (a multiple of 8). Rows past seq_len are zero: queries there are dropped, keys there come after every
    real query.
    """

    def __init__(self, query, key, value, keep: torch.Tensor | None, scaling: float, block_size: int) -> None:
        batch, heads, seq_len, head_dim = query.shape
        self.batch, self.heads, self.seq_len, self.head_dim = batch, heads, seq_len, head_dim
        self.dtype = compute_dtype(query.dtype)
        self.num_blocks = -(-seq_len // block_size)
        self.block = min(block_size, -(-seq_len // (8 * self.num_blocks)) * 8)
        self.padded_len = self.num_blocks * self.block
        self.root = scaling**0.5
        self.keep = keep
        self.qa = self._augmented(query, self.root)  # [BH, nb, b, d + 1]
        self.ka = self._augmented(key, self.root)
        self.va = self._augmented(value, 1.0)  # [BH, nb, b, d_v + 1]
        if keep is not None:
            kept = torch.zeros(batch, 1, self.padded_len, 1, dtype=self.dtype, device=keep.device)  # [B, 1, L_p, 1]
            kept[:, 0, :seq_len, 0] = keep.to(self.dtype)
            self.ka.view(batch, heads, self.padded_len, -1).mul_(kept)
            self.va.view(batch, heads, self.padded_len, -1).mul_(kept)

    def _augmented(self, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        """[B, H, L, w] → [BH, nb, b, w + 1] = [factor·tensor, 1], zero rows past seq_len but for the 1."""
        rows, width = self.batch * self.heads, tensor.shape[-1]
        out = torch.zeros(rows, self.padded_len, width + 1, dtype=self.dtype, device=tensor.device)
        torch.mul(tensor.reshape(rows, self.seq_len, width), factor, out=out[:, : self.seq_len, :width])
        out[:, :, width] = 1
        return out.view(rows, self.num_blocks, self.block, width + 1)

    def real(self, tensor: torch.Tensor) -> torch.Tensor:
        """[BH, nb, b, c] → [B, H, L, c], the real rows (a view)."""
        return tensor.view(self.batch, self.heads, self.padded_len, -1)[:, :, : self.seq_len]

    def steps(self, prefix: str) -> list[tuple[slice, int]]:
        """The batch·head rows of each step (about EXPLICIT_SLAB slab entries or FEATURE_TOKENS tokens), with the
        first key block that holds a real key in any of them (the earlier ones are skipped by explicit products)."""
        rows = self.batch * self.heads
        budget = EXPLICIT_SLAB // self.block if prefix == "blocks" else FEATURE_TOKENS
        group = max(1, min(rows, budget // self.padded_len))
        first = [0] * rows
        if self.keep is not None:
            has_real = torch.zeros(self.batch, self.padded_len, dtype=torch.bool, device=self.keep.device)
            has_real[:, : self.seq_len] = self.keep
            per_batch = has_real.view(self.batch, self.num_blocks, self.block).any(-1).int().argmax(-1).tolist()
            first = [per_batch[row // self.heads] for row in range(rows)]
        return [(slice(start, start + group), min(first[start : start + group])) for start in range(0, rows, group)]

    def padded_query_self(self, query, key) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Padded queries see their own key: pad_i [B, 1, L, 1] and t_ii = q̃_i·k̃_i + 1 [B, H, L, 1]; None if none."""
        if self.keep is None:
            return None
        pad = (~self.keep)[:, None, :, None].to(self.dtype)
        diagonal = (query.to(self.dtype) * key.to(self.dtype)).sum(-1, keepdim=True).mul_(self.root**2).add_(1)
        return pad, diagonal


class _Workspace:
    """Scratch memory reused by every step of one call: a fresh large allocation page-faults each time it is touched."""

    def __init__(self, like: torch.Tensor) -> None:
        self.like, self.buffer = like, None

    def take(self, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
        """Contiguous, uninitialised tensors of these shapes, side by side in the buffer (grown when too small)."""
        sizes = [math.prod(shape) for shape in shapes]
        if self.buffer is None or self.buffer.numel() < sum(sizes):
            self.buffer = self.like.new_empty(sum(sizes))
        views, offset = [], 0
        for shape, size in zip(shapes, sizes):
            views.append(self.buffer[offset : offset + size].view(shape))
            offset += size
        return views


def _tokens(tensor: torch.Tensor) -> torch.Tensor:
    """[G, nb, b, c] → [G, nb·b, c] (a view)."""
    return tensor.view(tensor.shape[0], -1, tensor.shape[-1])


def _flat_blocks(tensor: torch.Tensor) -> torch.Tensor:
    """[G, nb, b, c] → [G·nb, b, c] (a view: a row slice of the blocked layout is contiguous)."""
    return tensor.view(-1, *tensor.shape[2:])


# --------------------------------------------------------------------------------------------- prefix "blocks"


def _explicit_forward(
    blocks: _Blocks,
    rows: slice,
    first: int,
    acc: torch.Tensor,
    workspace: _Workspace,
) -> None:
    """acc_i = Σ_{first·b ≤ j ≤ i} t_ij² [v_j, 1] per query block i, from one [G, b, keys] slab t = qa_i·ka_{≤i}ᵀ
    (its last b columns are the diagonal block, causally masked)."""
    qa, ka, va, acc = (_tokens(x[rows]) for x in (blocks.qa, blocks.ka, blocks.va, acc))  # [G, L_p, ·]
    group, b = qa.shape[0], blocks.block
    (slab,) = workspace.take((group * b * blocks.padded_len,))
    for i in range(blocks.num_blocks):
        start, stop = min(first, i) * b, (i + 1) * b
        t = slab[: group * b * (stop - start)].view(group, b, stop - start)
        torch.bmm(qa[:, i * b : stop], ka[:, start:stop].transpose(1, 2), out=t).square_()
        t[:, :, -b:].tril_()  # causal mask of the diagonal block
        torch.bmm(t, va[:, start:stop], out=acc[:, i * b : stop])


def _explicit_backward(
    blocks: _Blocks,
    rows: slice,
    first: int,
    grad_acc: torch.Tensor,
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    grad_v: torch.Tensor,
    workspace: _Workspace,
) -> None:
    """Recompute the slab t of query block i; dv_{≤i} += (t²)ᵀ dÕ_i, dq̃_i = 2(g ⊙ t) k̃_{≤i},
    dk̃_{≤i} += 2(g ⊙ t)ᵀ q̃_i with g_ij = [dÕ_i, −D̃_i]·[v_j, 1] = dÕ_i·v_j − D̃_i."""
    qa, ka, va, grad_acc, grad_q, grad_k, grad_v = (
        _tokens(x[rows]) for x in (blocks.qa, blocks.ka, blocks.va, grad_acc, grad_q, grad_k, grad_v)
    )
    group, b = qa.shape[0], blocks.block
    slabs = workspace.take(*[(group * b * blocks.padded_len,)] * 3)  # t, t², g ⊙ t
    for i in range(blocks.num_blocks):
        start, stop = min(first, i) * b, (i + 1) * b
        t, squared, grad_t = (slab[: group * b * (stop - start)].view(group, b, stop - start) for slab in slabs)
        query_block, grad_block = qa[:, i * b : stop], grad_acc[:, i * b : stop]
        torch.bmm(query_block, ka[:, start:stop].transpose(1, 2), out=t)
        t[:, :, -b:].tril_()  # causal mask of the diagonal block
        torch.mul(t, t, out=squared)
        grad_v[:, start:stop].baddbmm_(squared.transpose(1, 2), grad_block[..., :-1])
        torch.bmm(grad_block, va[:, start:stop].transpose(1, 2), out=grad_t).mul_(t)
        grad_q[:, i * b : stop].baddbmm_(grad_t, ka[:, start:stop, :-1], alpha=2.0)
        grad_k[:, start:stop].baddbmm_(grad_t.transpose(1, 2), query_block[..., :-1], alpha=2.0)


# --------------------------------------------------------------------------------------------- prefix "features"


def _num_features(width: int) -> int:
    """φ of an augmented vector of `width` = d + 1 entries has width·(width + 1)/2 features."""
    return width * (width + 1) // 2


def _features(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """φ(x) = [x_a², √2·x_a·x_b (a < b, row by row)] with φ(x)·φ(y) = (x·y)², feature-major: x [N, b, c] →
    out [N, c(c+1)/2, b] (each product then fills whole rows of b tokens).

    With x = [q̃, 1] and y = [k̃, 1] that is t² = (1 + s)²; a zeroed (padded) key has φ = 0.
    """
    width = x.shape[-1]
    x = x.transpose(1, 2).contiguous()  # [N, c, b]
    torch.mul(x, x, out=out[:, :width])
    scaled = x * SQRT2
    offset = width
    for a in range(width - 1):
        torch.mul(scaled[:, a + 1 :], x[:, a : a + 1], out=out[:, offset : offset + width - 1 - a])
        offset += width - 1 - a
    return out


@cache
def _pair_positions(width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In `_features`' order: the flat positions a·c + b and b·c + a of each pair (a ≤ b), and its entry in the
    symmetric matrix of the quadratic form (1 for a = b; 1/√2 for a < b, since √2·x_a·x_b = (x_a·x_b + x_b·x_a)/√2)."""
    pairs = [(a, a) for a in range(width)] + [(a, b) for a in range(width - 1) for b in range(a + 1, width)]
    first, second = (torch.tensor(column, device=device) for column in zip(*pairs))
    weights = torch.full((len(pairs),), 1 / SQRT2, dtype=torch.float64, device=device)
    weights[:width] = 1
    return first * width + second, second * width + first, weights


def _quadratic_form(states: torch.Tensor, width: int, out: torch.Tensor) -> torch.Tensor:
    """Sums over φ, [N, F, e] → symmetric M [N, c, c·e] with φ(x)·states[n, :, e] = xᵀ M[n, :, :, e] x."""
    upper, lower, weights = _pair_positions(width, states.device)
    weighted = states * weights.to(states.dtype)[:, None]
    full = out.view(states.shape[0], width * width, states.shape[-1])
    full.index_copy_(1, upper, weighted).index_copy_(1, lower, weighted)  # together they fill every (a, b)
    return out


def _quadratic_form_grad(x: torch.Tensor, y: torch.Tensor, matrix: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """∂/∂x_i of Σ_e y_ie·x_iᵀ M_e x_i = 2·Σ_{b,e} M[a, b, e]·x_ib·y_ie: one product with the outer products x ⊗ y.

    x [N, b, c], y [N, b, e], matrix [N, c, c·e] (`_quadratic_form`), outer: scratch [N, b, c, e]. Returns [N, b, c].
    """
    torch.mul(x.unsqueeze(-1), y.unsqueeze(-2), out=outer)  # x_ib·y_ie
    return torch.bmm(outer.view(*x.shape[:2], -1), matrix.transpose(1, 2)).mul_(2)


def _exclusive_sums(states: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Σ over the earlier (reverse: later) blocks of per-block states [G, nb, F, e]; zero for the first (last)."""
    out = torch.zeros_like(states)
    if reverse:
        out[:, :-1] = torch.cumsum(states[:, 1:].flip(1), 1).flip(1)
    else:
        out[:, 1:] = torch.cumsum(states[:, :-1], 1)
    return out


def _features_forward(blocks: _Blocks, rows: slice, acc: torch.Tensor, workspace: _Workspace) -> None:
    """Diagonal blocks explicit (one batched product), earlier blocks through S_c = Σ_{j < c} φ(ka_j)[v_j, 1]ᵀ."""
    qa, ka, va, acc = (_flat_blocks(x[rows]) for x in (blocks.qa, blocks.ka, blocks.va, acc))  # [G·nb, b, ·]
    count, b, width = qa.shape[0], blocks.block, qa.shape[-1]
    t, phi = workspace.take((count, b, b), (count, _num_features(width), b))
    torch.bmm(qa, ka.transpose(1, 2), out=t).square_().tril_()  # causal
    torch.bmm(t, va, out=acc)
    if blocks.num_blocks == 1:
        return
    states = torch.bmm(_features(ka, phi), va)  # Σ_block φ(ka)[v, 1]ᵀ: [G·nb, F, e]
    prefix = _exclusive_sums(states.view(-1, blocks.num_blocks, *states.shape[1:]))
    acc.baddbmm_(_features(qa, phi).transpose(1, 2), _flat_blocks(prefix))


def _features_backward(
    blocks: _Blocks,
    rows: slice,
    grad_acc: torch.Tensor,
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    grad_v: torch.Tensor,
    workspace: _Workspace,
) -> None:
    """Backward of `_features_forward`: diagonal blocks as in `_explicit_backward`; through the sums, with
    R_c = Σ_{c' > c} φ(qa_c')ᵀ [dÕ, −D̃]_c': d[v, 1]_c = φ(ka_c) R_c, dqa and dka from the quadratic forms of S, R."""
    qa, ka, va, grad_acc = (_flat_blocks(x[rows]) for x in (blocks.qa, blocks.ka, blocks.va, grad_acc))
    grad_q, grad_k, grad_v = (_flat_blocks(x[rows]) for x in (grad_q, grad_k, grad_v))
    count, b, width, value_width = qa.shape[0], blocks.block, qa.shape[-1], va.shape[-1]
    num_features = _num_features(width)
    # φ(ka) and φ(qa), later reused for the outer products x ⊗ y; t and g ⊙ t; the quadratic forms.
    scratch, t, grad_t, matrix = workspace.take(
        (count * b * max(2 * num_features, width * value_width),),
        (count, b, b),
        (count, b, b),
        (count, width, width * value_width),
    )
    torch.bmm(qa, ka.transpose(1, 2), out=t).tril_()
    torch.bmm(grad_acc, va.transpose(1, 2), out=grad_t).mul_(t)
    grad_v.baddbmm_(t.square_().transpose(1, 2), grad_acc[..., :-1])
    grad_q.baddbmm_(grad_t, ka[..., :-1], alpha=2.0)
    grad_k.baddbmm_(grad_t.transpose(1, 2), qa[..., :-1], alpha=2.0)
    if blocks.num_blocks == 1:
        return
    phi_k, phi_q = scratch[: 2 * count * num_features * b].view(2, count, num_features, b)  # [G·nb, F, b] each
    _features(ka, phi_k), _features(qa, phi_q)
    shape = (-1, blocks.num_blocks, num_features, value_width)
    prefix = _flat_blocks(_exclusive_sums(torch.bmm(phi_k, va).view(shape)))  # S_c
    suffix = _flat_blocks(_exclusive_sums(torch.bmm(phi_q, grad_acc).view(shape), reverse=True))  # R_c
    grad_v += torch.bmm(phi_k.transpose(1, 2), suffix)[..., :-1]  # φ(ka) = 0 on padded keys
    outer = scratch[: count * b * width * value_width].view(count, b, width, value_width)  # φ no longer needed
    grad_q += _quadratic_form_grad(qa, grad_acc, _quadratic_form(prefix, width, matrix), outer)[..., :-1]
    grad_k += _quadratic_form_grad(ka, va, _quadratic_form(suffix, width, matrix), outer)[..., :-1]


# --------------------------------------------------------------------------------------------- FlexAttention


def _taylor_score(score: torch.Tensor, batch, head, query_index, key_index) -> torch.Tensor:
    """FlexAttention score_mod: s ↦ log f(s), f(s) = 1 + s + s²/2 = ((s + 1)² + 1)/2 ≥ 1/2 (s already scaled)."""
    return torch.log(0.5 * ((score + 1) * (score + 1) + 1))


def _causal(batch, head, query_index, key_index):
    return key_index <= query_index


@cache
def _compiled_flex_attention():
    """torch.compile(flex_attention), built once per process (FlexAttention is only fused when compiled)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@lru_cache(maxsize=8)
def _causal_block_mask(seq_len: int, device: torch.device):
    """The causal BlockMask of one length, shared by every batch and head."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, None, None, seq_len, seq_len, device=device)


def taylor_block_mask(key_padding_mask: torch.Tensor | None, batch: int, seq_len: int, device: torch.device):
    """FlexAttention BlockMask of `allowed_positions`: causal, padded keys removed, the diagonal always kept."""
    from torch.nn.attention.flex_attention import create_block_mask

    if key_padding_mask is None:
        return _causal_block_mask(seq_len, torch.device(device))
    keep = key_padding_mask.to(device=device, dtype=torch.bool)

    def allowed(batch_index, head, query_index, key_index):
        real_key = keep[batch_index, key_index]
        return (_causal(batch_index, head, query_index, key_index) & real_key) | (key_index == query_index)

    return create_block_mask(allowed, batch, None, seq_len, seq_len, device=device)


def flex_taylor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scaling: float,
    compiled: bool = True,
) -> torch.Tensor:
    """Taylor attention as FlexAttention with score_mod s ↦ log f(s): fused forward and recomputing backward (CUDA).

    Same arguments and result as `blocked_taylor_attention` ([batch, heads, seq, d], key/value expanded to the query
    heads); FlexAttention multiplies q·k by `scale` = scaling before the score_mod and accumulates in float32.
    `compiled=False` runs FlexAttention's eager reference instead (dense and unfused: for tests, also on CPU).
    """
    from torch.nn.attention.flex_attention import flex_attention

    batch, _, seq_len, _ = value.shape
    query, key = query.expand(batch, -1, -1, -1), key.expand(batch, -1, -1, -1)
    block_mask = taylor_block_mask(key_padding_mask, batch, seq_len, value.device)
    attend = _compiled_flex_attention() if compiled else flex_attention
    return attend(query, key, value, score_mod=_taylor_score, block_mask=block_mask, scale=scaling)
