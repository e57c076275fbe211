"""Writes the config.json of a named model shape (no weights): what a dry run plans from.

    python tools/model_shape.py 72b /tmp/qwen2.5-72b-shape
    python -m jaxcrit.main --config=hf:/tmp/qwen2.5-72b-shape --config.dry_run=True --config.max_tokens=115 \\
        --config.mesh.shape='(2,4)' --config.mesh.params=fsdp --config.mesh.device_memory_gib=80

Use it to see whether a model fits a mesh, and with which chunk and batch, before downloading
its weights or renting the devices. The shapes are jaxcrit.bench.SHAPES (Qwen2.5 0.5B, 7B, 32B,
72B, and the tests' tiny one). Without a tokenizer.json the dry run plans for max_tokens tokens;
copy the real model's tokenizer.json in to plan for a text.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxcrit.bench import SHAPES
from jaxcrit.models.config import to_hf_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=SHAPES)
    ap.add_argument("directory", type=Path)
    args = ap.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    (args.directory / "config.json").write_text(json.dumps(to_hf_config(SHAPES[args.shape]), indent=1))
    print(args.directory / "config.json")


if __name__ == "__main__":
    main()
