"""The mixers: the seven of "Deconstructing Attention" (docs/method.md §3), one file each, and any other
package's, all behind one interface (`Mixer`, in `base`) and one registry (`registry`)."""

from __future__ import annotations

from .approximate import TaylorAttention
from .base import Mixer, MixerCost, MixerInputs, MixerOutput
from .fixedseqqk import FixedSequenceQK
from .mlp import TokenwiseMLP
from .nonapprox import SelfGatedPrefixSoftmax
from .registry import (
    ENTRY_POINT_GROUP,
    UnknownMixerError,
    get_mixer,
    is_builtin,
    is_registered,
    mixer_names,
    mixer_package,
    register_builtin_mixers,
    register_mixer,
)
from .rndembqk import RandomEmbeddingQK
from .standard import StandardAttention
from .staticembqk import StaticEmbeddingQK

# The built-in registration, in the paper's order (tables and studies list mixers in registration order).
_BUILTIN_CLASSES = (
    StandardAttention,
    TokenwiseMLP,
    TaylorAttention,
    SelfGatedPrefixSoftmax,
    RandomEmbeddingQK,
    FixedSequenceQK,
    StaticEmbeddingQK,
)
BUILTIN_MIXERS: tuple[str, ...] = register_builtin_mixers(_BUILTIN_CLASSES)


def build_mixer(config, layer_idx: int) -> Mixer:
    """The mixer for layer `layer_idx` (0-based) of `config.mixer_types`."""
    return get_mixer(config.mixer_types[layer_idx])(config, layer_idx)


__all__ = [
    "BUILTIN_MIXERS",
    "ENTRY_POINT_GROUP",
    "Mixer",
    "MixerCost",
    "MixerInputs",
    "MixerOutput",
    "UnknownMixerError",
    "build_mixer",
    "get_mixer",
    "is_builtin",
    "is_registered",
    "mixer_names",
    "mixer_package",
    "register_mixer",
]
