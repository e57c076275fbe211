"""llama family checkpoints (a HF dir), bf16 on a GPU.

    python -m jaxcrit.main --config=configs/llama.py:/path/to/checkpoint --workdir=runs/llama
"""
from configs.common import checkpoint


def get_config(arg=None):
    return checkpoint(arg, "llama")
