"""phi3 family checkpoints (a HF dir), bf16 on a GPU.

    python -m jaxcrit.main --config=configs/phi3.py:/path/to/checkpoint --workdir=runs/phi3
"""
from configs.common import checkpoint


def get_config(arg=None):
    return checkpoint(arg, "phi3")
