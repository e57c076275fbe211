"""Loading a checkpoint's tokenizer and encoding text with its special tokens, as transformers does."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from jaxcrit.convert.gguf_tokenizer import gguf_tokenizer
from jaxcrit.errors import JaxcritError


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a HF checkpoint dir (its tokenizer.json) or of a .gguf file.

    A dir's tokenizer.json is used as is: transformers v5 ignores tokenizer_config.json's
    add_bos_token/add_eos_token when tokenizer.json exists, so its post-processor decides BOS/EOS.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return gguf_tokenizer(p)
    if not p.is_dir():
        raise JaxcritError(f"{p}: no such tokenizer directory or .gguf file")
    f = p / "tokenizer.json"
    if not f.is_file():
        raise JaxcritError(f"{f}: missing; the checkpoint needs a fast tokenizer file "
                           "(write one with transformers' tokenizer.save_pretrained)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise JaxcritError(f"{f}: not a valid tokenizers file ({e})") from None


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of text with the checkpoint's special tokens (BOS/EOS) added, as transformers adds them."""
    return tok.encode(text, add_special_tokens=True).ids


def special_ids(path: str | Path) -> tuple[int | None, tuple[int, ...]]:
    """(BOS id or None, EOS ids) a checkpoint names: a .gguf file's tokenizer.ggml.*_token_id, a
    directory's generation_config.json, else its config.json; () when it names no EOS."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from jaxcrit.convert.gguf_io import field, open_gguf
        reader = open_gguf(p)
        meta = {k: field(reader, f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id")}
    else:
        meta = {}
        for name in ("config.json", "generation_config.json"):
            if (p / name).is_file():
                meta.update({k: v for k, v in json.loads((p / name).read_text()).items() if v is not None})
    eos = meta.get("eos_token_id")
    eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    bos = meta.get("bos_token_id")
    return (None if bos is None else int(bos)), eos
