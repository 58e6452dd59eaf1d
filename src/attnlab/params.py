"""Parameter counts of every variant, uniform and hybrid, built on the meta device (no memory used)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import AttnLabConfig
from .mixers import mixer_names
from .model import AttnLabForCausalLM


def count_parameters(config: AttnLabConfig) -> int:
    """Trainable parameters of `AttnLabForCausalLM(config)`; tied embeddings count once; buffers do not count."""
    with torch.device("meta"):
        model = AttnLabForCausalLM(config)
    return sum(parameter.numel() for parameter in model.parameters())


@dataclass
class VariantCount:
    mixer: str
    uniform: int
    hybrid: int


def variant_counts(model_options: dict[str, Any]) -> list[VariantCount]:
    """Parameter counts of `uniform:<mixer>` and `hybrid:<mixer>` for every registered mixer."""
    options = {key: value for key, value in model_options.items() if key not in ("layers", "mixer_types")}
    return [
        VariantCount(
            mixer=mixer,
            uniform=count_parameters(AttnLabConfig(**options, layers=f"uniform:{mixer}")),
            hybrid=count_parameters(AttnLabConfig(**options, layers=f"hybrid:{mixer}")),
        )
        for mixer in mixer_names()
    ]


def format_table(title: str, counts: list[VariantCount]) -> str:
    """A Markdown table: parameters of each variant and its difference from the standard model."""
    standard = next(count.uniform for count in counts if count.mixer == "standard")
    lines = [
        f"### {title}",
        "",
        "| mixer | uniform | Δ vs standard | hybrid | Δ vs standard |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for count in counts:
        lines.append(
            f"| {count.mixer} | {_millions(count.uniform)} | {_percent(count.uniform, standard)} "
            f"| {_millions(count.hybrid)} | {_percent(count.hybrid, standard)} |"
        )
    return "\n".join(lines)


def _millions(count: int) -> str:
    return f"{count / 1e6:,.3f}M"


def _percent(count: int, reference: int) -> str:
    return f"{100 * (count - reference) / reference:+.3f}%"
