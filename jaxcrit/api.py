"""The notebook API: load a model, then importance -> grow -> scan -> evaluate, as in the CLI."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from tokenizers import Tokenizer

from jaxcrit import engine as E
from jaxcrit.critical import scan as scan_mod
from jaxcrit.critical import stage1, stage2
from jaxcrit.critical.evaluate import evaluate as _evaluate
from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.decoder import Decoder
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.sharding import DEFAULT_RULES, make_mesh

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@dataclasses.dataclass
class Model:
    cfg: ModelConfig
    params: dict
    tokenizer: Tokenizer
    mesh: Mesh
    source: str

    def decoder(self) -> Decoder:
        """The Flax NNX module over these params: `model.decoder()(tokens)` gives logits [B, T, V];
        `nnx.split` of it gives (graphdef, state) for custom transforms."""
        return Decoder(self.cfg, self.params)

    def tokens(self, text: str, max_tokens: int = 512, min_tokens: int = 2) -> np.ndarray:
        """Token ids of text, cut to max_tokens; refuses texts shorter than min_tokens."""
        from jaxcrit.data.tokenize import encode
        ids = encode(self.tokenizer, text)[:max_tokens]
        if len(ids) < min_tokens:
            raise JaxcritError(f"the text has {len(ids)} tokens; at least {min_tokens} are needed "
                               "(give a longer text)")
        return np.asarray(ids, np.int32)


def load(name_or_path: str = "smollm2", dtype: str = "float32", mesh: Mesh | None = None,
         rules=DEFAULT_RULES) -> Model:
    """An embedded model name ('smollm2'), a HF checkpoint dir, a .gguf file, or a dir saved by
    jaxcrit.convert.orbax_io.save (holding jaxcrit.json)."""
    from jaxcrit.convert import embedded, hf, orbax_io
    from jaxcrit.data.tokenize import load_tokenizer
    if dtype not in DTYPES:
        raise JaxcritError(f"dtype '{dtype}' unknown: use one of {', '.join(DTYPES)}")
    mesh = mesh or make_mesh()
    src = str(name_or_path)
    path = embedded.embedded_path(src) if src in embedded.EMBEDDED else Path(src)
    if path.suffix == ".gguf" or (path.is_file() and path.suffix != ".json"):
        from jaxcrit.convert.gguf_io import load_gguf
        cfg, params = load_gguf(path, DTYPES[dtype], mesh, rules)
        return Model(cfg, params, load_tokenizer(path), mesh, src)
    if (path / "jaxcrit.json").exists():
        cfg, params = orbax_io.restore(path, mesh, rules)
        return Model(cfg, params, load_tokenizer(path), mesh, src)
    cfg, params = hf.load_hf(path, DTYPES[dtype], mesh, rules)
    return Model(cfg, params, load_tokenizer(path), mesh, src)


def engine_for(model: Model, texts: Sequence[str] | str, max_tokens: int = 512, **kw) -> E.Engine:
    """An Engine scoring ablations on these texts."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    return E.Engine(model.cfg, model.params, E.Texts.from_ids([model.tokens(t, max_tokens) for t in texts]),
                    mesh=model.mesh, **kw)


def importance(model: Model, text: str, *, alpha: float = 5.0, samples: int = 100, seed: int = 42,
               top_n: int = 10000, threshold: float = 1e-6, per_position: bool = False,
               max_tokens: int = 512, batch: int = 8) -> stage1.Ranking:
    """Stage 1: the ranked neurons of one text."""
    tok = model.tokens(text, max_tokens, min_tokens=10)
    imp = stage1.importance(model.cfg, model.params, tok, alpha=alpha, samples=samples, seed=seed, chunk=batch)
    return stage1.rank(imp.scores(), top_n, threshold, per_position)


def grow(model: Model, ranking: stage1.Ranking, text: str, *, epsilon: float = 1.0, max_steps: int = 1000,
         full_curve: bool = False, max_tokens: int = 512, **engine_kw) -> stage2.Growth:
    """Stage 2: the first prefix of the ranking whose masking raises log10 PPL by epsilon."""
    return stage2.grow(engine_for(model, text, max_tokens, **engine_kw), ranking, epsilon=epsilon,
                       max_steps=max_steps, full_curve=full_curve)


def scan(model: Model, text: str, sites: Sequence[str] = ("down_proj",), layers: Sequence[int] | None = None,
         channels: Sequence[int] | None = None, max_tokens: int = 512, **engine_kw) -> list[dict]:
    """Single-neuron deltas of the given sites, layers and channels (default: all of them)."""
    eng = engine_for(model, text, max_tokens, **engine_kw)
    abl = scan_mod.scan_rows(model.cfg, sites, range(model.cfg.n_layers) if layers is None else layers, channels)
    return scan_mod.scan_records(abl, scan_mod.scan(eng, abl, block=max(abl.rows, 1)))


def evaluate(model: Model, neurons: Sequence[tuple[str, int, int]], texts: Sequence[str],
             max_tokens: int = 512, **engine_kw) -> dict:
    """Perplexity (log10) of texts before/after zeroing neurons [(site, layer, channel), ...]."""
    s, l, c = zip(*neurons)
    abl = E.make(np.array(s)[None], np.array(l)[None], np.array(c)[None], cfg=model.cfg)
    seqs = [model.tokens(t, max_tokens) for t in texts]
    return _evaluate(model.cfg, model.params, seqs, list(texts), abl, **engine_kw)


__all__ = ["Model", "load", "engine_for", "importance", "grow", "scan", "evaluate", "SITE_NAMES"]
