"""`AttnLabConfig`: a Qwen2.5/Qwen3 decoder config plus one mixer name per layer.

The per-layer mixer list lives in `config.mixer_types` (transformers 5 reserves `layer_types` for its own
attention kinds). Every shorthand a user may write in `layers` is expanded and validated in exactly one
place, `resolve_layer_pattern`, and the resolved list is what gets saved with the model.
"""

from __future__ import annotations

import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig
from transformers.generation import GenerationConfig

from .cache import CACHE_NAME
from .mixers import Mixer, get_mixer, is_builtin, is_registered, mixer_names, mixer_package

# Placements of paper Table 11 (docs/method.md §7). Each maps a depth to the 1-based layer numbers that KEEP
# standard attention; the others use the variant. `hybrid` is the paper's main hybrid (= `even`).
PLACEMENTS: dict[str, Any] = {
    "even": lambda n: {i for i in range(1, n + 1) if i % 2 == 0},
    "odd": lambda n: {i for i in range(1, n + 1) if i % 2 == 1},
    "top": lambda n: set(range(1, n // 2 + 1)),  # lower half standard, variant on top
    "bottom": lambda n: set(range(n // 2 + 1, n + 1)),  # upper half standard, variant at the bottom
    # middle: the outer quarters keep standard (24 layers: 1-6 and 19-24), the variant fills the middle half
    "middle": lambda n: set(range(1, n // 4 + 1)) | set(range(n - n // 4 + 1, n + 1)),
    "quarter": lambda n: {i for i in range(1, n + 1) if i % 4 == 0},  # the paper's "25%": every 4th layer
    "first": lambda n: {1},
    "last": lambda n: {n},
    "bilateral": lambda n: {1, n},
}
PLACEMENTS["hybrid"] = PLACEMENTS["even"]

# Keys that transformers itself passes to a config's constructor (BC and loading machinery). Anything
# else that is not a field of `AttnLabConfig` is a typo and is rejected.
_HF_INTERNAL_KWARGS = {
    "torch_dtype",
    "name_or_path",
    "_name_or_path",
    "_commit_hash",
    "num_labels",
    "output_attentions",
    "attn_implementation",
    "experts_implementation",
    "_attn_implementation_internal",
    "_experts_implementation_internal",
    "per_layer_config",
    "model_type",
    "layer_types",
}


def resolve_layer_pattern(layers: str | list[str] | tuple[str, ...] | None, num_hidden_layers: int) -> list[str]:
    """Expand a layer pattern into one mixer name per layer.

    Accepted forms (layers are numbered from 1, as in the paper):
      - `None` → every layer `standard`;
      - an explicit list, or a comma-separated string, of `num_hidden_layers` mixer names;
      - `uniform:<mixer>` → every layer uses the mixer;
      - `hybrid:<mixer>` → the paper's hybrid: odd-numbered layers use the mixer, even-numbered keep standard;
      - `<placement>:<mixer>` with a placement of paper Table 11 (`even, odd, top, middle, bottom, quarter,
        first, last, bilateral`) naming the layers that keep standard attention, scaled to any depth.

    Raises `ValueError` with a message that says how to fix the pattern.
    """
    if not isinstance(num_hidden_layers, int) or num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be a positive integer, got {num_hidden_layers!r}")
    n = num_hidden_layers
    if layers is None:
        return ["standard"] * n
    if isinstance(layers, str):
        text = layers.strip()
        if ":" in text:
            form, _, mixer = (part.strip() for part in text.partition(":"))
            _check_mixer_name(mixer, where=f"layer pattern {layers!r}")
            if form == "uniform":
                return [mixer] * n
            if form not in PLACEMENTS:
                forms = ", ".join(["uniform", *PLACEMENTS])
                raise ValueError(f"unknown layer pattern form {form!r} in {layers!r}; use one of: {forms}")
            keep_standard = PLACEMENTS[form](n)
            return ["standard" if i in keep_standard else mixer for i in range(1, n + 1)]
        names = [name.strip() for name in text.split(",") if name.strip()]
    elif isinstance(layers, (list, tuple)):
        names = [str(name).strip() for name in layers]
    else:
        raise ValueError(f"layers must be a string or a list of mixer names, got {type(layers).__name__}")
    for i, name in enumerate(names, start=1):  # a wrong name first: "names 1 mixers" would hide it
        _check_mixer_name(name, where=f"layer {i}" if len(names) > 1 else f"layer pattern {layers!r}")
    if len(names) != n:
        raise ValueError(
            f"the layer list names {len(names)} mixers but the model has num_hidden_layers={n}; "
            f"give exactly one mixer per layer, or use a pattern such as 'uniform:<mixer>' or 'hybrid:<mixer>'"
        )
    return names


def _check_mixer_name(name: str, where: str) -> None:
    if not is_registered(name):
        raise ValueError(
            f"unknown mixer {name!r} in {where}; registered mixers: {', '.join(mixer_names())} "
            "(or a pattern such as 'uniform:<mixer>' or 'hybrid:<mixer>'; a mixer from another package "
            "needs that package installed: see attnlab.register_mixer)"
        )


@strict
class AttnLabConfig(PretrainedConfig):
    """Configuration of an attnlab decoder (Qwen2.5 backbone, docs/method.md §2; Qwen3 QK-norm optional).

    Besides the Qwen2 fields:
      layers: a layer pattern (see `resolve_layer_pattern`), resolved into `mixer_types`.
      qk_norm: Qwen3-style per-head RMSNorm on q and k before RoPE.
      attention_bias: biases on the q/k/v projections (Qwen2: True; Qwen3: False).
      skip_nonstandard: run with every non-standard layer removed, attention and MLP both (paper "skip").
      shadow_seq_len: L_max, the length of the fixed shadow sequence of `rndembqk`/`fixedseqqk`
        (defaults to `max_position_embeddings`).
      shadow_noise_seed: seed of the N(0, 1) shadow input of `rndembqk` (docs/method.md §3, σ = 1).
      fixed_sequence_seed / fixed_sequence_source: where the token ids of the `fixedseqqk` shadow input
        came from. A model created without a corpus gets `fixed_sequence_source="random-ids"`: ids drawn
        uniformly from the vocabulary with `fixed_sequence_seed`; the training command replaces them with
        the first L_max tokens of the training corpus and records the corpus here.
      mixer_implementation: "fast" (training paths) or "reference" (explicit L×L float32 paths).
      mixer_options: per-mixer settings, {mixer name: {option: value}}, for mixers that take any (a
        registered mixer reads its own with `Mixer.options(config)`; the built-in seven take none).
      mixer_packages: filled in, not set: for each mixer of `mixer_types` that is not built in, the package
        (or module) that registered it, so that loading the model where it is missing says what to install.
    """

    model_type = "attnlab"
    keys_to_ignore_at_inference = [CACHE_NAME]

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float | int = 1_000_000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    qk_norm: bool = False
    use_cache: bool = False
    layers: list[str] | str | None = None
    mixer_types: list[str] | None = None
    skip_nonstandard: bool = False
    shadow_seq_len: int | None = None
    shadow_noise_seed: int = 0
    fixed_sequence_seed: int = 0
    fixed_sequence_source: str = "random-ids"
    mixer_implementation: str = "fast"
    mixer_options: dict[str, dict[str, Any]] | None = None
    mixer_packages: dict[str, str] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        generation_keys = set(GenerationConfig._get_default_generation_params())
        unknown = sorted(set(kwargs) - _HF_INTERNAL_KWARGS - generation_keys)
        if unknown:
            raise ValueError(
                f"unknown AttnLabConfig option(s): {', '.join(unknown)}; "
                f"valid attnlab options: {', '.join(sorted(AttnLabConfig.__annotations__))}"
            )
        kwargs.pop("model_type", None)
        kwargs.pop("layer_types", None)  # reserved by transformers; our per-layer list is `mixer_types`
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check_shapes()
        self._check_mixer_packages()
        if self.mixer_options is not None and not all(
            isinstance(name, str) and isinstance(options, dict) for name, options in self.mixer_options.items()
        ):
            raise ValueError(
                f"mixer_options must map mixer names to option dicts, e.g. {{'slidingwindow': {{'window': 64}}}}, "
                f"got {self.mixer_options!r}"
            )
        resolved = resolve_layer_pattern(self.layers, self.num_hidden_layers)
        if self.mixer_types is not None and self.layers is not None and list(self.mixer_types) != resolved:
            raise ValueError(
                f"layers={self.layers!r} resolves to {resolved} but mixer_types={self.mixer_types} was also "
                "given; pass only one of them"
            )
        if self.mixer_types is not None and self.layers is None:
            resolved = resolve_layer_pattern(list(self.mixer_types), self.num_hidden_layers)
        self.mixer_types = resolved
        self.mixer_packages = {name: mixer_package(name) for name in sorted(set(resolved)) if not is_builtin(name)}
        if self.shadow_seq_len is None:
            self.shadow_seq_len = self.max_position_embeddings
        if self.mixer_implementation not in ("fast", "reference"):
            raise ValueError(f"mixer_implementation must be 'fast' or 'reference', got {self.mixer_implementation!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (the SwiGLU MLP of Qwen2/Qwen3), got {self.hidden_act!r}")
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """transformers' `from_dict`, except that overrides of attnlab fields (`from_pretrained(path,
        layers=...)`) go through the constructor and its checks; transformers would set them afterwards,
        unchecked. A given `mixer_types` replaces the saved pattern; an overridden `layers` or
        `num_hidden_layers` re-resolves the pattern, and the saved `mixer_types` give way to it (a model
        saved with a list and no pattern keeps its list, checked against the new depth)."""
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in cls.__annotations__}
        config_dict = {**config_dict, **overrides}
        if {"layers", "mixer_types"} & overrides.keys():
            config_dict.pop("mixer_packages", None)  # the saved mixers' packages may no longer be needed
        if "mixer_types" in overrides and "layers" not in overrides:
            config_dict["layers"] = None  # the given list replaces the saved pattern
        elif (
            "mixer_types" not in overrides
            and {"layers", "num_hidden_layers"} & overrides.keys()
            and config_dict.get("layers")
        ):
            config_dict.pop("mixer_types", None)  # re-resolved from the pattern
        return super().from_dict(config_dict, **kwargs)

    def _check_mixer_packages(self) -> None:
        """A saved model whose mixer's package is missing: one line saying what to install."""
        for name, package in (self.mixer_packages or {}).items():
            if not is_registered(name):
                raise ValueError(
                    f"this model uses the mixer {name!r} from {package!r}, which is not registered here; install "
                    f"that package (pip install {package}) or import the module that registers the mixer"
                )

    def mixer_class(self, layer_idx: int) -> type[Mixer]:
        """The registered `Mixer` class of layer `layer_idx` (0-based)."""
        return get_mixer(self.mixer_types[layer_idx])

    def _check_shapes(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} does not divide hidden_size={self.hidden_size}; "
                "choose a head count that divides the width (or set head_dim explicitly)"
            )
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads} (grouped-query attention shares each K/V head among a whole group)"
            )
        if self.head_dim_resolved % 2 != 0:
            raise ValueError(f"the head dimension must be even for RoPE, got {self.head_dim_resolved}")

    @property
    def head_dim_resolved(self) -> int:
        """The per-head width `d_h`: `head_dim` if set, else `hidden_size // num_attention_heads`."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def mlp_mixer_size(self) -> int:
        """Intermediate width `m` of the `mlp` mixer: `round(P_attn / (3·d))` (docs/method.md §3, pinned).

        `P_attn` counts everything the standard mixer owns: W_q, W_k, W_v, W_o, the q/k/v biases when
        `attention_bias`, and the QK-norm weights when `qk_norm`.
        """
        d, d_h = self.hidden_size, self.head_dim_resolved
        q_width, kv_width = self.num_attention_heads * d_h, self.num_key_value_heads * d_h
        params = d * q_width + 2 * d * kv_width + q_width * d
        if self.attention_bias:
            params += q_width + 2 * kv_width
        if self.qk_norm:
            params += 2 * d_h
        return max(1, math.floor(params / (3 * d) + 0.5))
