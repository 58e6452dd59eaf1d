"""`mlp`: no token mixing at all (docs/method.md §3).

The mixer is a gated MLP `W_down(SiLU(W_gate x) ⊙ W_up x)` without biases, whose width
`m = round(P_attn / (3·d))` gives it the standard mixer's parameter count (`config.mlp_mixer_size`).
Each position is transformed on its own, so there is no mixing matrix (`weights` is None).

Analytic cost (`cost`): 6·B·L·d·m prefill, 6·B·d·m per decoded token, no cache. With m ≈ 4d/3 that is
≈ 8BLd², the standard mixer's projections; docs/method.md §8's 6BLd² is the figure without W_o.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DummyLayer

from ..modules import SwiGLU
from .base import Mixer, MixerCost, MixerInputs, MixerOutput


class TokenwiseMLP(Mixer):
    name = "mlp"
    has_mixing_matrix = False

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.token_mlp = SwiGLU(config.hidden_size, config.mlp_mixer_size)

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        return MixerOutput(self.token_mlp(x))

    @classmethod
    def cache_layer(cls, config, layer_idx):
        """Nothing to keep: each position is mixed on its own (transformers' `DummyLayer`)."""
        return DummyLayer()

    @classmethod
    def cost(cls, config, batch, seq_len, dtype_bytes=2, cached=True):
        """W_gate, W_up (d → m) and W_down (m → d) per token; nothing cached (module docstring)."""
        per_token = 6 * config.hidden_size * config.mlp_mixer_size
        return MixerCost(
            prefill_flops=batch * seq_len * per_token, decode_flops_per_token=batch * per_token, cache_bytes=0
        )
