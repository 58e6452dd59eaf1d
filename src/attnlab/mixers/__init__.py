"""The seven mixers of "Deconstructing Attention" (spec §3), one file each, chosen through `MIXERS`."""

from __future__ import annotations

from ..config import MIXER_NAMES
from .approximate import TaylorAttention
from .base import Mixer, MixerCost, MixerInputs, MixerOutput
from .fixedseqqk import FixedSequenceQK
from .mlp import TokenwiseMLP
from .nonapprox import SelfGatedPrefixSoftmax
from .rndembqk import RandomEmbeddingQK
from .standard import StandardAttention
from .staticembqk import StaticEmbeddingQK

MIXERS: dict[str, type[Mixer]] = {
    cls.name: cls
    for cls in (
        StandardAttention,
        TokenwiseMLP,
        TaylorAttention,
        SelfGatedPrefixSoftmax,
        RandomEmbeddingQK,
        FixedSequenceQK,
        StaticEmbeddingQK,
    )
}
assert tuple(MIXERS) == MIXER_NAMES, "the registry and config.MIXER_NAMES must list the same mixers"


def build_mixer(config, layer_idx: int) -> Mixer:
    """The mixer for layer `layer_idx` (0-based) of `config.mixer_types`."""
    name = config.mixer_types[layer_idx]
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(MIXERS)}")
    return MIXERS[name](config, layer_idx)


def mixer_cost(
    config, layer_idx: int, batch: int, seq_len: int, dtype_bytes: int = 2, cached: bool = True
) -> MixerCost:
    """The analytic cost of layer `layer_idx` of `config` (`Mixer.cost` of its mixer; no model is built)."""
    return MIXERS[config.mixer_types[layer_idx]].cost(config, batch, seq_len, dtype_bytes, cached)


__all__ = ["MIXERS", "Mixer", "MixerCost", "MixerInputs", "MixerOutput", "build_mixer", "mixer_cost"]
