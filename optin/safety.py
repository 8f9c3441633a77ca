"""Model folders are data, never code: refuse folders that ask to run their own Python.

A Hugging Face folder asks for "remote code" with an ``auto_map`` entry in one of its JSON configs
(``config.json``, ``tokenizer_config.json``, ``preprocessor_config.json``, ...): transformers would then
import a ``.py`` module shipped beside the weights (after a ``[y/N]`` prompt, or at once with
``trust_remote_code=True``). optin refuses such a folder before any library reads it, and every adapter
also passes ``trust_remote_code=False`` (``NO_REMOTE_CODE``) so that nothing can prompt or run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import OptinError

# Keyword arguments for every transformers ``from_pretrained`` call: never run code from a folder or hub repo.
NO_REMOTE_CODE: dict[str, Any] = {"trust_remote_code": False}

# The configs transformers reads from a folder (the others hold weights or vocabularies, never ``auto_map``).
CONFIG_NAMES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                "image_processor_config.json", "video_preprocessor_config.json", "feature_extractor_config.json")
MAX_CONFIG_BYTES = 50_000_000  # a config larger than this is not a config: do not read it whole


def remote_code_request(folder: str | Path) -> str | None:
    """Where ``folder`` asks to run its own code (``"tokenizer_config.json: auto_map {...}"``), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for name in CONFIG_NAMES:
        path = folder / name
        try:
            if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
                continue
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # unreadable configs are the loader's problem; they cannot name code either
        if isinstance(data, dict) and data.get("auto_map"):
            shown = json.dumps(data["auto_map"])
            return f"{name}: auto_map {shown if len(shown) <= 120 else shown[:117] + '...'}"
    return None


def refuse_remote_code(folder: str | Path) -> None:
    """An OptinError when ``folder`` asks to run its own Python code; nothing is imported or executed."""
    where = remote_code_request(folder)
    if where is not None:
        raise OptinError(f"model folder {str(folder)!r} asks to run its own Python code ({where}); optin never runs "
                         "code from a model folder: use a model of a standard architecture, or delete the 'auto_map' "
                         "entry if the folder does not need it")
