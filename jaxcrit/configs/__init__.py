"""Configs shipped inside the package, so a run works from any directory and from an installed
wheel: `--config=smollm2`, `--config=hf:/path/to/checkpoint` or `--config=hf:ORG/NAME[@REVISION]`
(a Hugging Face Hub id), `--config=qwen:/path` (a name here), or a path to any config file (`--config=configs/smollm2.py`, the repo's entry points)."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("smollm2", "hf", "qwen", "study")


def path(name: str) -> Path:
    """The file of a packaged config."""
    return HERE / f"{name}.py"
