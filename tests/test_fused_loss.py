"""The fused exp-sum kernel (Pallas, run here in interpret mode) against a plain computation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit.models.fused_loss import shifted_expsum


def test_shifted_expsum_matches_plain_sum():
    # rows not a multiple of the 128-row tile, vocabulary not a multiple of the 256-column tile
    k1, k2 = jax.random.split(jax.random.key(0))
    h = jax.random.normal(k1, (200, 128)).astype(jnp.bfloat16)
    w = (0.1 * jax.random.normal(k2, (700, 128))).astype(jnp.bfloat16)
    shift = jnp.linspace(0.0, 4.0, 200, dtype=jnp.float32)
    z = np.asarray(jnp.einsum("nd,vd->nv", h, w, preferred_element_type=jnp.float32), np.float64)
    ref = np.exp(z - np.asarray(shift, np.float64)[:, None]).sum(-1)
    out = np.asarray(shifted_expsum(h, w, shift, interpret=True))
    np.testing.assert_allclose(out, ref, rtol=1e-5)
