"""gemma family checkpoints (a HF dir), bf16 on a GPU.

    python -m jaxcrit.main --config=configs/gemma.py:/path/to/checkpoint --workdir=runs/gemma
"""
from configs.common import checkpoint


def get_config(arg=None):
    return checkpoint(arg, "gemma")
