"""Named presets: YAML files beside this module, one per preset (`cpu-tiny`, `paper-70m`, …).

Each file has a `model:` section of `AttnLabConfig` fields. Keys are checked where they are used:
`AttnLabConfig` rejects unknown model options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent
PAPER_PRESETS = ("paper-70m", "paper-160m", "paper-500m", "qwen3-1.7b")


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The parsed preset `name`; `ValueError` naming the valid presets if there is none."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(preset_names())}")
    with path.open() as handle:
        preset = yaml.safe_load(handle) or {}
    if not isinstance(preset, dict) or not isinstance(preset.get("model"), dict):
        raise ValueError(f"preset file {path.name} must contain a 'model:' mapping")
    return preset


def model_options(name: str) -> dict[str, Any]:
    """The `AttnLabConfig` keyword arguments of preset `name`."""
    return dict(load_preset(name)["model"])
