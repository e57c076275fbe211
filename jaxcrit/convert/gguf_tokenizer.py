"""A `tokenizers.Tokenizer` from a GGUF's metadata, equal to the one transformers builds from it.

A GGUF carries no tokenizer.json, only llama.cpp's vocabulary, merges, token types and flags.
transformers (integrations/gguf/gguf_tokenizer_mapping.py) turns a byte-level BPE ("gpt2") file
into a GPT-2 style tokenizer: ByteLevel pre-tokenizer (or a regex split picked by
`tokenizer.ggml.pre`), ByteLevel decoder, control tokens as special added tokens, and BOS/EOS from
`tokenizer.ggml.add_bos_token`/`add_eos_token`. That is reproduced here without transformers.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from jaxcrit.convert.gguf_io import field, open_gguf
from jaxcrit.errors import JaxcritError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> split regex (transformers' GGUF_PRE_TOKENIZER_SPLITS); others: GPT-2's ByteLevel.
SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    "tekken": _TEKKEN,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def template(tok: Tokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool,
             where: str) -> processors.TemplateProcessing:
    """BOS/EOS insertion equal to transformers' `update_post_processor` for these flags."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    specials = []
    for t, on in ((bos, add_bos), (eos, add_eos)):
        if on:
            tid = tok.token_to_id(t)
            if tid is None:
                raise JaxcritError(f"{where}: special token {t!r} is not in the vocabulary")
            specials.append((t, tid))
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer described by a GGUF file (byte-level BPE only)."""
    where = str(path)
    reader = open_gguf(path)
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise JaxcritError(f"{where}: GGUF tokenizer '{kind}' is not supported (only byte-level BPE, 'gpt2'); "
                           "use the HF checkpoint's tokenizer.json with load_tokenizer(directory)")
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise JaxcritError(f"{where}: GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = field(reader, "tokenizer.ggml.token_type") or []

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = SPLITS.get(field(reader, "tokenizer.ggml.pre"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()

    # Control tokens spelled outside the byte alphabet are llama.cpp mislabels; transformers skips them.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                            if ty == CONTROL and set(t) <= alphabet])
    known = tok.get_vocab()
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                    if ty == USER_DEFINED and t in known])

    def special(key: str) -> str | None:
        tid = field(reader, f"tokenizer.ggml.{key}")
        return None if tid is None else tokens[tid]

    named = [special(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")]
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    tok.add_special_tokens([AddedToken(t, special=True) for t in named if t is not None and t not in added])
    tok.post_processor = template(tok, named[0], named[1], bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
                                  bool(field(reader, "tokenizer.ggml.add_eos_token", False)), where)
    return tok
