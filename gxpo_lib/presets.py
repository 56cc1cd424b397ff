"""Presets: named run settings stored as YAML files in ``presets/``; explicit parameters override them.

    config = resolve_config("smoke", {"algorithm": "grpo", "steps": 40})
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from .trainer import TrainConfig

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


def list_presets(directory: Path | str = PRESET_DIR) -> list[str]:
    """Names of the preset files (without .yaml)."""
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def load_preset(name: str, directory: Path | str = PRESET_DIR) -> dict[str, Any]:
    """The settings a preset file holds; an unknown preset or setting raises ValueError."""
    path = Path(directory) / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"preset={name!r} is invalid: allowed one of {list_presets(directory)}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"preset={name!r}: {path} must hold a mapping of setting: value")
    TrainConfig.from_dict(values)  # unknown names fail here, naming the file's bad key
    return values


def resolve_config(preset: str | None, overrides: dict[str, Any] | None = None,
                   directory: Path | str = PRESET_DIR) -> TrainConfig:
    """Defaults < preset < explicit overrides; the result is validated before anything is loaded.

    Override values that are None mean "not given" (the notebook's parameters cell uses None that way).
    """
    values = load_preset(preset, directory) if preset else {}
    values |= {k: v for k, v in (overrides or {}).items() if v is not None}
    config = TrainConfig.from_dict(values)
    _check_types(config)
    return config.validate()


def _check_types(config: TrainConfig) -> None:
    """A value of the wrong type (e.g. steps="10" from a command line) fails with the setting named."""
    for field in dataclasses.fields(TrainConfig):
        value, default = getattr(config, field.name), field.default
        if value is None or default is None or isinstance(default, tuple):
            continue  # optional settings and lists are checked by TrainConfig.validate
        if isinstance(default, bool):
            ok, allowed = isinstance(value, bool), "true or false"
        elif isinstance(default, (int, float)):
            ok, allowed = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            ok, allowed = isinstance(value, str), "a string"
        if not ok:
            raise ValueError(f"{field.name}={value!r} is invalid: allowed {allowed}")
