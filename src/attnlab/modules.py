"""Building blocks shared by the decoder and the mixers: RMSNorm, rotary embeddings, the SwiGLU MLP.

Each matches transformers' Qwen2 numerically (same float32 upcasts), which is what lets an all-standard
attnlab model reproduce `Qwen2ForCausalLM` logits.
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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [batch, heads, seq, head_dim] by the tables `cos, sin` [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    """The gated MLP `W_down(SiLU(W_gate x) ⊙ W_up x)`, no biases (Qwen2 MLP; also the `mlp` mixer)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
