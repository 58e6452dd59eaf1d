"""attnlab: take attention apart, one principle at a time ("Deconstructing Attention", arXiv 2510.11602).

Importing attnlab registers `AttnLabConfig` / `AttnLabForCausalLM` with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import MIXER_NAMES, PLACEMENTS, AttnLabConfig, resolve_layer_pattern
from .mixers import MIXERS
from .model import AttnLabForCausalLM, AttnLabModel

__version__ = "0.1.0"

AutoConfig.register(AttnLabConfig.model_type, AttnLabConfig, exist_ok=True)
AutoModel.register(AttnLabConfig, AttnLabModel, exist_ok=True)
AutoModelForCausalLM.register(AttnLabConfig, AttnLabForCausalLM, exist_ok=True)

__all__ = [
    "MIXERS",
    "MIXER_NAMES",
    "PLACEMENTS",
    "AttnLabConfig",
    "AttnLabForCausalLM",
    "AttnLabModel",
    "resolve_layer_pattern",
]
