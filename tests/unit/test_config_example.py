"""config.example.toml documents every key: it must load, and name every section and key the
settings model has (a key added to the code but not to the example is a documentation bug)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from pydantic import BaseModel

from gateway.settings import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _keys(ann, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def _flat(data: dict[str, object], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in data.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def test_the_example_config_loads() -> None:
    old = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("GATEWAY_")}
    try:
        settings = load_settings(str(EXAMPLE))
    finally:
        os.environ.update(old)
    assert settings.smtp.domains  # a real, validated Settings object


def test_the_example_documents_every_key() -> None:
    documented = _flat(tomllib.loads(EXAMPLE.read_text()))
    missing = sorted(_keys(Settings) - documented)
    assert not missing, f"keys missing from config.example.toml: {missing}"
