"""llama family checkpoints (a HF dir), bf16 on a GPU.

    python -m jaxcrit.main --config=configs/llama.py:/path/to/checkpoint --workdir=runs/llama
"""
from configs.common import base


def get_config(arg=None):
    if not arg:
        raise ValueError("give the checkpoint dir: --config=configs/llama.py:/path/to/checkpoint")
    c = base(arg)
    c.dtype = "bfloat16"
    c.engine.chunk = 0
    return c
