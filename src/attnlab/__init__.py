"""attnlab: take attention apart, one principle at a time ("Deconstructing Attention", arXiv 2510.11602).

Importing attnlab registers `AttnLabConfig` / `AttnLabForCausalLM` with transformers' Auto classes, and the
seven built-in mixers with attnlab's mixer registry. Your own mixer: subclass `attnlab.Mixer` and register it
with `attnlab.register_mixer` (or an `attnlab.mixers` entry point; see `attnlab.mixers.registry`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import PLACEMENTS, AttnLabConfig, resolve_layer_pattern
from .mixers import (
    BUILTIN_MIXERS,
    Mixer,
    MixerCost,
    MixerInputs,
    MixerOutput,
    get_mixer,
    mixer_names,
    register_mixer,
)
from .model import AttnLabForCausalLM, AttnLabModel

__version__ = "0.1.0"

AutoConfig.register(AttnLabConfig.model_type, AttnLabConfig, exist_ok=True)
AutoModel.register(AttnLabConfig, AttnLabModel, exist_ok=True)
AutoModelForCausalLM.register(AttnLabConfig, AttnLabForCausalLM, exist_ok=True)

__all__ = [
    "BUILTIN_MIXERS",
    "PLACEMENTS",
    "AttnLabConfig",
    "AttnLabForCausalLM",
    "AttnLabModel",
    "Mixer",
    "MixerCost",
    "MixerInputs",
    "MixerOutput",
    "get_mixer",
    "mixer_names",
    "register_mixer",
    "resolve_layer_pattern",
]
