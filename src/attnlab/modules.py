"""Building blocks shared by the decoder and the mixers: RMSNorm, rotary embeddings, the SwiGLU MLP.

Each is written first as transformers' Qwen2 writes it (same float32 upcasts), which is what lets an
all-standard attnlab model reproduce `Qwen2ForCausalLM` logits. RMSNorm and RoPE also have a fast form
for training: the same function with a hand-written backward (`torch.autograd.Function`) that makes
fewer passes over memory than autograd's chain of small ops. `reference=True` (the model's
`mixer_implementation="reference"`) selects the reference forms; the mixer tests compare the two paths
on outputs and gradients inside real models. (A fused SiLU·up backward and one gate/up matmul were
measured too and were not faster here, so SwiGLU has one form.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`y = w ⊙ x / sqrt(mean(x²) + eps)`, computed in float32 (as Qwen2RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, reference: bool = False) -> torch.Tensor:
        if reference or hidden_states.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return reference_rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def reference_rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm, verbatim: normalise in float32, cast back, scale."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


class _RMSNormFunction(torch.autograd.Function):
    """Float32 RMSNorm. With x̂ = x·r, r = (mean(x²) + eps)^(-1/2), y = w ⊙ x̂ and a = ∂L/∂y ⊙ w:
    ∂L/∂w = Σ_rows ∂L/∂y ⊙ x̂ and ∂L/∂x = r·(a − x̂·mean(a ⊙ x̂))."""

    @staticmethod
    def forward(ctx, hidden_states, weight, eps):
        width = hidden_states.shape[-1]
        rows = hidden_states.reshape(-1, width)  # [tokens, width]
        # Σx² as a squared norm: one pass, no [tokens, width] temporary
        inverse_rms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).square_().div_(width).add_(eps).rsqrt_()
        normed = rows * inverse_rms
        ctx.save_for_backward(normed, inverse_rms, weight)
        return (normed * weight).view(hidden_states.shape)

    @staticmethod
    def backward(ctx, grad_output):
        normed, inverse_rms, weight = ctx.saved_tensors
        grad_rows = grad_output.reshape(normed.shape)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.linalg.vecdot(grad_rows, normed, dim=0)
        if ctx.needs_input_grad[0]:
            scaled = grad_rows * weight  # a
            mean_product = torch.linalg.vecdot(scaled, normed).unsqueeze(-1).div_(normed.shape[-1])
            grad_input = torch.addcmul(scaled, normed, mean_product, value=-1).mul_(inverse_rms)
            grad_input = grad_input.view(grad_output.shape)
        return grad_input, grad_weight, None


class RotaryEmbedding(nn.Module):
    """RoPE tables for the rotate-half convention: `cos, sin` of shape [batch, seq, head_dim]."""

    def __init__(self, head_dim: int, rope_theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope_theta = float(rope_theta)
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(torch.float) / self.head_dim
        return 1.0 / (self.rope_theta**exponents)

    @torch.no_grad()
    def forward(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [batch, seq] → freqs: [batch, seq, head_dim / 2], computed in float32
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=like.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)  # [batch, seq, head_dim]
        return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """Rotate `x` [batch, heads, seq, head_dim] by the tables `cos, sin` [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if reference or cos.requires_grad or sin.requires_grad:
        return x * cos + rotate_half(x) * sin
    return _RotaryFunction.apply(x, cos, sin)


class _RotaryFunction(torch.autograd.Function):
    """`x·cos + rotate_half(x)·sin` without materialising rotate_half(x); for constant tables.

    With halves x = [x₁, x₂]: y₁ = x₁c₁ − x₂s₁, y₂ = x₂c₂ + x₁s₂, so ∂L/∂x₁ = g₁c₁ + g₂s₂, ∂L/∂x₂ = g₂c₂ − g₁s₁.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        rotated = x * cos
        rotated[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        rotated[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        ctx.input_shape = x.shape
        return rotated

    @staticmethod
    def backward(ctx, grad_output):
        cos, sin = ctx.saved_tensors
        half = grad_output.shape[-1] // 2
        grad_input = grad_output * cos
        grad_input[..., :half].addcmul_(grad_output[..., half:], sin[..., half:])
        grad_input[..., half:].addcmul_(grad_output[..., :half], sin[..., :half], value=-1)
        if grad_input.shape != ctx.input_shape:  # x was broadcast against larger tables
            grad_input = grad_input.sum_to_size(ctx.input_shape)
        return grad_input, None, None


class SwiGLU(nn.Module):
    """The gated MLP `W_down(SiLU(W_gate x) ⊙ W_up x)`, no biases (Qwen2 MLP; also the `mlp` mixer)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
