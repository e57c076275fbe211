"""Any supported Hugging Face checkpoint (qwen2, llama, mistral, qwen3, gemma, phi3), bf16 on a GPU.

The entry point of `--config=configs/hf.py`; the config itself is jaxcrit/configs/hf.py (also
`--config=hf` from any directory or an installed wheel).
"""
from jaxcrit.configs.hf import get_config  # noqa: F401
