"""YAML run configurations: every CLI flag can be set in a file passed with ``--config``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import OptinError


def read_config(path: str | Path, known: list[str]) -> dict[str, Any]:
    """Flags from a YAML mapping (``budget: 0.6``, ``calib-size: 128``, ``options: {neuron_group: 8}``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise OptinError(f"config {str(path)!r} is not valid YAML: {yaml_problem(exc)}; fix that line "
                         "(keys are flags, e.g. `budget: 0.5`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OptinError(f"cannot read config {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise OptinError(f"config {str(path)!r} must be a YAML mapping of flag: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise OptinError(f"unknown key {key!r} in config {str(path)!r}; known keys: "
                             f"{', '.join(sorted(k.replace('_', '-') for k in known))}")
        out[name] = value
    return out


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one short phrase with its line and column (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value parsed as YAML (numbers, booleans, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise OptinError(f"plugin options are KEY=VALUE, got {text!r} (e.g. --set neuron_group=8)")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise OptinError(f"cannot parse the value of option {key!r}: {yaml_problem(exc)}; quote text values "
                         "(--set 'key=\"text\"') or write numbers, booleans or [lists]") from None
