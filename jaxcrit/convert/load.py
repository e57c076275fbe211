"""A loaded model: config, params on a mesh, tokenizer; from any source checkpoints.resolve names
(a local checkpoint or a Hugging Face Hub id)."""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from tokenizers import Tokenizer

from jaxcrit.convert.checkpoints import resolve
from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import ModelConfig
from jaxcrit.dist import compile_cache
from jaxcrit.dist.sharding import DEFAULT_RULES, make_mesh

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
AUTO_DTYPE = "auto"   # the source's own dtype: its kind's row in checkpoints.KINDS


@dataclasses.dataclass
class Model:
    cfg: ModelConfig
    params: dict
    tokenizer: Tokenizer
    mesh: Mesh
    source: str
    bos: int | None = None          # the checkpoint's BOS token id (data/tokenize.special_ids)
    eos: tuple[int, ...] = ()       # its EOS token ids: where generation stops

    @property
    def dtype(self) -> str:
        """The dtype the params were loaded in (its DTYPES name)."""
        return str(next(iter(self.params.values())).dtype)

    def __repr__(self) -> str:
        c = self.cfg
        gb = sum(p.size * p.dtype.itemsize for p in self.params.values()) / 1e9
        return (f"Model({self.source!r}: {c.model_type}, {c.n_layers} layers, d_model {c.d_model}, d_ff {c.d_ff}, "
                f"vocab {c.vocab_size}, {self.dtype}, mesh {dict(self.mesh.shape)}, {gb:.3g} GB of params)")

    def decoder(self):
        """The Flax NNX module over these params (models/module.py): `model.decoder()(tokens)`
        gives logits [B, T, V]; `nnx.split` of it gives (graphdef, state) for custom transforms."""
        from jaxcrit.models.module import Decoder
        return Decoder(self.cfg, self.params)

    def tokens(self, text: str, max_tokens: int = 512, min_tokens: int = 2) -> np.ndarray:
        """Token ids of text, cut to max_tokens; refuses texts shorter than min_tokens."""
        return tokens(self.tokenizer, text, max_tokens, min_tokens)


def tokens(tokenizer: Tokenizer, text: str, max_tokens: int = 512, min_tokens: int = 2) -> np.ndarray:
    """[T] int32 token ids of text (special tokens as transformers adds them), cut to max_tokens."""
    from jaxcrit.convert.tokenizer import encode
    ids = encode(tokenizer, text)[:max_tokens]
    if len(ids) < min_tokens:
        raise JaxcritError(f"the text has {len(ids)} tokens; at least {min_tokens} are needed (give a longer text)")
    return np.asarray(ids, np.int32)


def default_dtype(source: str) -> str:
    """The dtype a source runs in when none is given (checkpoints.KINDS): what the CLI's dtype
    "auto" and jaxcrit.load's default both mean."""
    kind, path = resolve(str(source))
    return kind.dtype(path)


def load(name_or_path: str = "smollm2", dtype: str = AUTO_DTYPE, mesh: Mesh | None = None,
         rules=DEFAULT_RULES) -> Model:
    """An embedded model name ('smollm2'), a HF checkpoint dir, a .gguf file, a dir saved by
    jaxcrit.convert.orbax_io.save (holding jaxcrit.json), or a Hugging Face Hub id
    ('ORG/NAME[@REVISION]' or 'hf:ORG/NAME[@REVISION]', fetched into the hub cache; an existing
    local path wins); dtype "auto": the source's own (default_dtype). Turns JAX's persistent
    compilation cache on (dist/compile_cache.py) unless this process chose its setting already."""
    from jaxcrit.convert.tokenizer import load_tokenizer, special_ids
    if dtype not in (AUTO_DTYPE, *DTYPES):
        raise JaxcritError(f"dtype '{dtype}' unknown: use one of {', '.join((AUTO_DTYPE, *DTYPES))}")
    compile_cache.use_default()
    mesh = mesh or make_mesh()
    kind, path = resolve(str(name_or_path))
    dtype = kind.dtype(path) if dtype == AUTO_DTYPE else dtype
    tokenizer = load_tokenizer(path)
    bos, eos = special_ids(path)        # before the weights: a GGUF's parsed metadata is still kept
    cfg, params = kind.load(path, DTYPES[dtype], mesh, rules)
    return Model(cfg, params, tokenizer, mesh, str(name_or_path), bos, eos)
