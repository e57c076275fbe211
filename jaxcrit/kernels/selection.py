"""Which implementation runs each hot spot of the engine's programs: one table of names, one choice.

The hot spots and their implementations (CHOICES; the first of each is XLA's, exact and everywhere):
  attention  xla: einsum with an f32 softmax (decoder.attend); cudnn: cuDNN's fused flash
             attention (kernels/cudnn.py; GPUs, bf16/fp16), which never writes the [T, T] scores.
  mlp        xla: gate and up as two GEMMs, then act·mul; pallas: the fused gate|up GEMM with
             SiLU·mul in its epilogue (kernels/fused_mlp.py; one Hopper GPU, bf16/fp16, a SiLU
             MLP) in the layers no row of a chunk edits, where nothing needs gate or up themselves.
  norms      plain: each RMSNorm writes a normed copy of the residual for the GEMMs after it;
             folded: in the layers no row of a chunk edits, both RMSNorms folded into those GEMMs
             (decoder.folded): they read the residual and each row's 1/rms scales their outputs,
             which rounds otherwise than the norm (bf16: losses move by its rounding).
  loss       xla: the vocabulary-chunked einsum and logsumexp (engine/loss.py); pallas: the fused
             exp-sum kernel (kernels/fused_loss.py; GPUs, bf16/fp16): its Hopper form on sm_90
             where its tiles divide each device's vocabulary and the hidden size, else its Triton form.
`select` turns a config's names ("auto" or one of CHOICES) into `Kernels`. "auto" picks the fused
implementation where it applies (norms: folded exactly where the MLP is fused), so everything is
XLA's off GPUs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxcrit.dist.sharding import spec
from jaxcrit.errors import JaxcritError
from jaxcrit.kernels import cudnn, fused_loss, fused_mlp, hopper
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig

# hot spot -> its implementations' names, XLA's first; a config names one of these or "auto"
CHOICES: dict[str, tuple[str, ...]] = {
    "attention": ("xla", "cudnn"),
    "mlp": ("xla", "pallas"),
    "norms": ("plain", "folded"),
    "loss": ("xla", "pallas"),
}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The implementation chosen at each hot spot (CHOICES' names) and the fused kernels' tiles.
    Hashable and compared by value: the engine's programs take it as a static argument."""
    attention: str = "xla"
    mlp: str = "xla"
    norms: str = "plain"
    loss: str = "xla"
    mlp_tiles: hopper.Tiles = fused_mlp.TILES
    loss_tiles: fused_loss.Tiles | hopper.Tiles = fused_loss.TILES

    def names(self) -> dict[str, str]:
        """{hot spot: the name chosen}: what reports record."""
        return {spot: getattr(self, spot) for spot in CHOICES}

    @property
    def layer(self) -> decoder.LayerKernels:
        """The decoder's layers' implementations: attention, the fused MLP or None, folded norms."""
        return decoder.LayerKernels(cudnn.attention if self.attention == "cudnn" else decoder.attend,
                                    fused_mlp.swiglu_for(self.mlp_tiles) if self.mlp == "pallas" else None,
                                    self.norms == "folded")

    @property
    def expsum(self) -> Callable[..., jax.Array] | None:
        """The loss's fused exp-sum on a mesh, expsum(hs [R, B, T, D], w [V, D], shift [B, T], mesh)
        -> sum_v exp(hs . w_v - shift) [R, B, T] (fused_loss.expsum_sharded); None: XLA's form."""
        return functools.partial(fused_loss.expsum_sharded, tiles=self.loss_tiles) if self.loss == "pallas" else None


def loss_tiles(d_model: int, vocab: int) -> fused_loss.Tiles | hopper.Tiles:
    """The fused loss's kernel for a device's `vocab` columns: the Hopper kernel's tiles on an
    sm_90 GPU (with jax's Pallas Mosaic GPU) where they divide the vocabulary and d_model, else
    the Triton kernel's."""
    if hopper.on_hopper() and fused_loss.fits(d_model, vocab, fused_loss.HOPPER):
        return fused_loss.HOPPER
    return fused_loss.TILES


def select(cfg: ModelConfig, dtype, mesh: Mesh, *, attention: str = "auto", mlp: str = "auto",
           norms: str = "auto", loss: str = "auto", backend: str | None = None,
           mlp_tiles: hopper.Tiles = fused_mlp.TILES) -> Kernels:
    """The implementations for params of this dtype on this backend (default: jax's) and mesh.
    Raises JaxcritError on an unknown name or a fused kernel asked for where it does not apply."""
    half_gpu = (backend or jax.default_backend()) == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    vocab_axis = spec(("vocab",), (cfg.vocab_size,), mesh)[0]   # the loss kernel runs on each device's columns
    vocab = cfg.vocab_size // (mesh.shape[vocab_axis] if vocab_axis else 1)
    head = loss_tiles(cfg.d_model, vocab)
    applies = {   # hot spot: whether its fused implementation applies here, and what it needs
        "attention": (half_gpu, "GPUs and dtype bfloat16 or float16"),
        "mlp": (half_gpu and mesh.size == 1 and hopper.on_hopper()
                and fused_mlp.fits(cfg.family.act, cfg.d_model, cfg.d_ff, mlp_tiles),
                f"one Hopper GPU, dtype bfloat16 or float16, a SiLU MLP, d_model a multiple of "
                f"{mlp_tiles.tk} and d_ff of {mlp_tiles.tn // 2}"),
        "loss": (half_gpu and fused_loss.fits(cfg.d_model, vocab, head),
                 f"GPUs, dtype bfloat16 or float16 and d_model a multiple of {fused_loss.TILES.bk}"),
        "norms": (True, ""),
    }
    asked = {"attention": attention, "mlp": mlp, "norms": norms, "loss": loss}
    chosen = {}
    for spot, (xla, fused) in CHOICES.items():
        ok, needs = applies[spot]
        name = asked[spot]
        if name == "auto":
            name = (fused if chosen["mlp"] == "pallas" else xla) if spot == "norms" else (fused if ok else xla)
        if name not in (xla, fused):
            raise JaxcritError(f"engine.{spot} '{name}' unknown: use auto, {xla} or {fused}")
        if name == fused and not ok:
            raise JaxcritError(f"engine.{spot} {fused} needs {needs}; use auto or {xla}")
        chosen[spot] = name
    return Kernels(**chosen, mlp_tiles=mlp_tiles, loss_tiles=head)
