"""Any supported Hugging Face checkpoint dir (qwen2, llama, mistral, qwen3, gemma, phi3), bf16 on a GPU.

    python -m jaxcrit.main --config=configs/hf.py:/path/to/checkpoint --workdir=runs/x
"""
from jaxcrit.configs.common import checkpoint


def get_config(arg=None):
    return checkpoint(arg, "hf")
