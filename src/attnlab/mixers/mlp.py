"""`mlp`: no token mixing at all (spec §3).

The mixer is a gated MLP `W_down(SiLU(W_gate x) ⊙ W_up x)` without biases, whose width
`m = round(P_attn / (3·d))` gives it the standard mixer's parameter count (`config.mlp_mixer_size`).
Each position is transformed on its own, so there is no mixing matrix (`weights` is None).
"""

from __future__ import annotations

import torch

from ..modules import SwiGLU
from .base import Mixer, MixerInputs, MixerOutput


class TokenwiseMLP(Mixer):
    name = "mlp"
    has_mixing_matrix = False

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.token_mlp = SwiGLU(config.hidden_size, config.mlp_mixer_size)

    def forward(self, x: torch.Tensor, inputs: MixerInputs) -> MixerOutput:
        return MixerOutput(self.token_mlp(x))
