"""Any supported Hugging Face checkpoint (qwen2, llama, mistral, qwen3, gemma, phi3), bf16 on a GPU:
a local dir, or a Hub id fetched into the hub cache (an existing local path wins).

    python -m jaxcrit.main --config=hf:/path/to/checkpoint --workdir=runs/x
    python -m jaxcrit.main --config=hf:Qwen/Qwen2.5-0.5B-Instruct@main --workdir=runs/x
"""
from jaxcrit.configs.common import checkpoint


def get_config(arg=None):
    return checkpoint(arg, "hf")
