"""The learned mask: a small collapsing set found by optimising continuous gates, then verified exactly.

Each candidate neuron i gets a gate z_i in (0, 1) from a logit theta_i: its channel's output is
scaled by 1 - z_i (z = 1 ablates it, z = 0 leaves it) through the decoder's own per-site [L, C]
masks, so a gate means exactly what an engine row with scale 1 - z means. Adam (optax) minimises

    relu(target - delta(z)) + sparsity * sum_i sigmoid(theta_i)

with delta(z) = (loss(z) - loss_clean) / ln 10: push delta to the target, then shrink the gates
not needed to stay there. z = sigmoid(theta) (temperature 0), or binary-concrete samples of it at
a temperature (sample()). Then the gates are binarised: the candidates ranked by gate, the
ranking's prefixes scored exactly through the engine (stage2.grow) up to the first reaching
epsilon, and that prefix pruned neuron by neuron on measured deltas (prune()). Candidates are
distinct neurons (one gate per channel).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcrit import engine as E
from jaxcrit.critical import stage2
from jaxcrit.errors import JaxcritError
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import width
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.progress import Memo, no_memo


def candidates(ranking: NeuronSet, n: int) -> NeuronSet:
    """The first n distinct (site, layer, channel) of a ranking (a position ranking's duplicates dropped)."""
    seen: dict[tuple, int] = {}
    for i, k in enumerate(ranking.keys()):
        if len(seen) == n:
            break
        seen.setdefault(k, i)
    idx = np.fromiter(seen.values(), int, len(seen))
    out = ranking[idx]
    return NeuronSet(out.site, out.layer, out.channel, np.full(len(out), -1, np.int64), out.score)


def gate_masks(cfg: ModelConfig, cand: NeuronSet, z: jax.Array) -> dict[str, jax.Array]:
    """Per-site [L, C] masks scaling candidate i's channel by 1 - z[i] (the decoder's mask arrays).

    Candidates must be distinct: each mask entry is set, not multiplied, so gradients flow."""
    masks = {}
    for s in dict.fromkeys(str(x) for x in cand.site):
        mine = np.flatnonzero(cand.site == s)
        masks[s] = jnp.ones((cfg.n_layers, width(cfg, s)), jnp.float32).at[
            cand.layer[mine], cand.channel[mine]].set(1.0 - z[mine], unique_indices=True)
    return masks


def gated_loss(cfg: ModelConfig, params: dict, tokens: jax.Array, cand: NeuronSet, z: jax.Array) -> jax.Array:
    """Mean token NLL (nats) of tokens [1, T] with the candidates gated by z [N]."""
    h, _ = decoder.forward(cfg, params, decoder.embed(cfg, params, tokens), masks=gate_masks(cfg, cand, z),
                           remat=True)
    return E.token_nll(cfg, params, h[:, :-1], tokens[:, 1:]).mean()


def sample(theta: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """Binary-concrete gates [N]: sigmoid((theta + logit(u)) / temperature), u ~ U(0, 1); near 0 or 1
    at low temperature, 1 with probability sigmoid(theta) as temperature -> 0; temperature 0: the
    deterministic gates sigmoid(theta)."""
    if temperature == 0:
        return jax.nn.sigmoid(theta)
    u = jax.random.uniform(key, theta.shape, jnp.float32, 1e-6, 1 - 1e-6)
    return jax.nn.sigmoid((theta + jnp.log(u) - jnp.log1p(-u)) / temperature)


def objective(cfg: ModelConfig, cand: NeuronSet, target: float, sparsity: float, temperature: float):
    """f(params, tokens [1, T], base_loss, theta [N], key) -> (relu(target - delta(z)) + sparsity *
    sum sigmoid(theta), (delta(z), sum sigmoid(theta))), z the gates sampled from theta with key."""
    def f(params, tokens, base_loss, theta, key):
        z = sample(theta, key, temperature)
        delta = (gated_loss(cfg, params, tokens, cand, z) - base_loss) / E.LN10
        size = jax.nn.sigmoid(theta).sum()
        return jax.nn.relu(target - delta) + sparsity * size, (delta, size)
    return f


@partial(jax.jit, static_argnames=("cfg", "keys", "target", "sparsity", "temperature", "lr"))
def _step(params, tokens, base_loss, theta, state, key, *, cfg: ModelConfig, keys: tuple, target: float,
          sparsity: float, temperature: float, lr: float):
    """One Adam step on the gates' logits: (theta, Adam's state, [objective, delta, sum of gates])."""
    f = objective(cfg, NeuronSet.of(list(keys)), target, sparsity, temperature)
    (value, (delta, size)), g = jax.value_and_grad(f, argnums=3, has_aux=True)(params, tokens, base_loss, theta, key)
    updates, state = optax.adam(lr).update(g, state, theta)
    return optax.apply_updates(theta, updates), state, jnp.stack([value, delta, size])


@dataclasses.dataclass
class Learned:
    """The optimised gates and their exact verification."""
    candidates: NeuronSet      # [N] gated neurons
    gates: np.ndarray          # [N] final sigmoid(theta): each neuron's probability of being ablated
    history: np.ndarray        # [steps, 3] objective, delta of the sampled gates, sum sigmoid(theta)
    ranking: NeuronSet         # candidates by z, largest first (score: z)
    growth: stage2.Growth      # exact deltas of the ranking's prefixes, up to the first reaching epsilon
    threshold_delta: float     # exact delta of the set z > 0.5 (nan: empty)
    pruned: list[dict]         # prune()'s path from the collapsing prefix (empty: no prefix collapsed)

    @property
    def n(self) -> int | None:
        return self.growth.critical_n

    def to_json(self) -> dict:
        return {"n": self.n, "set": self.ranking[:self.growth.last_n].records(),
                "above_half": int((self.gates > 0.5).sum()), "above_half_delta": self.threshold_delta,
                "curve": self.growth.to_pandas().to_dict("records"), "pruned": self.pruned,
                "history": [{"step": i + 1, "objective": float(f), "delta": float(d), "gates": float(s)}
                            for i, (f, d, s) in enumerate(self.history)],
                "gates": [{**r, "gate": float(g)} for r, g in zip(self.candidates.records(), self.gates)]}


def optimise(cfg: ModelConfig, params: dict, tokens: np.ndarray, base_loss: float, cand: NeuronSet, *,
             target: float, sparsity: float, steps: int, lr: float, init: float, temperature: float,
             seed: int, block: int = 25,
             memo_state: tuple[Callable, Callable] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Adam on the gates' logits for `steps` steps from sigmoid(theta) = init: (sigmoid(theta) [N],
    history [steps, 3]). Step k samples its gates with fold_in(key(seed), k) (sample()).

    memo_state = (get, put): the run's store, keeping theta, Adam's state and the history every
    `block` steps, so a killed run resumes after its last block with the same numbers.
    """
    if not 0 < init < 1:
        raise JaxcritError(f"learned mask: the initial gate must lie in (0, 1), got {init}")
    static = dict(cfg=cfg, keys=tuple(cand.keys()), target=float(target), sparsity=float(sparsity),
                  temperature=float(temperature), lr=float(lr))
    opt = optax.adam(lr)
    theta = jnp.full(len(cand), np.log(init / (1 - init)), jnp.float32)
    state = opt.init(theta)
    history = np.zeros((0, 3), np.float32)
    leaves, tree = jax.tree.flatten(state)
    got = memo_state[0]() if memo_state else None
    if got is not None:
        theta = jnp.asarray(got["theta"])
        state = jax.tree.unflatten(tree, [jnp.asarray(got[f"s{i}"]) for i in range(len(leaves))])
        history = got["history"]
    tok = jnp.asarray(np.asarray(tokens)[None], jnp.int32)
    base = jnp.float32(base_loss)
    rows = [history]
    while sum(len(r) for r in rows) < steps:
        for _ in range(min(block, steps - sum(len(r) for r in rows))):
            key = jax.random.fold_in(jax.random.key(seed), sum(len(r) for r in rows))
            theta, state, h = _step(params, tok, base, theta, state, key, **static)
            rows.append(np.asarray(h)[None])
        if memo_state:
            memo_state[1]({"theta": np.asarray(theta), "history": np.concatenate(rows),
                           **{f"s{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}})
    return np.asarray(jax.nn.sigmoid(theta)), np.concatenate(rows)


def verify(engine: E.Engine, cand: NeuronSet, z: np.ndarray, *, epsilon: float,
           memo: Memo = no_memo) -> tuple[NeuronSet, stage2.Growth, float]:
    """The gates binarised and scored exactly: (candidates ranked by z, the ranking's prefixes'
    deltas up to the first reaching epsilon, the delta of the set z > 0.5 (nan if empty))."""
    order = np.argsort(-z, kind="stable")
    ranking = NeuronSet(cand.site[order], cand.layer[order], cand.channel[order], cand.position[order],
                        z[order].astype(np.float32))
    growth = stage2.grow(engine, ranking, epsilon=epsilon, max_steps=len(ranking), full_curve=False,
                         desc="learned mask prefixes", memo=memo)
    k = int((z > 0.5).sum())
    above = float(memo("above-half", lambda: engine.deltas(E.prefixes(engine.cfg, ranking.site, ranking.layer,
                                                                          ranking.channel, [k])))[0]) if k else np.nan
    return ranking, growth, above



def prune(engine: E.Engine, neurons: NeuronSet, *, epsilon: float, memo: Memo = no_memo) -> list[dict]:
    """Backward elimination on measured deltas: while some neuron can go with the rest still at
    delta >= epsilon, drop the one whose removal leaves the largest delta. One record per set
    visited, the given set first: {"n", "delta", "neurons" (keys)}; the last is a set from which
    no single neuron can be removed (a local minimum of the collapsing sets)."""
    n = len(neurons)
    row = lambda live: E.make(*(np.broadcast_to(a, live.shape) for a in (neurons.site_index(), neurons.layer,
                                                                          neurons.channel)),
                              np.where(live, 0.0, 1.0), cfg=engine.cfg)   # every row holds all n entries: one program
    keep = list(range(n))
    full = memo("prune-0", lambda: engine.deltas(row(np.ones((1, n), bool))))
    path = [{"n": n, "delta": float(full[0]), "neurons": neurons.keys()}]
    while len(keep) > 1:
        live = np.zeros((len(keep), n), bool)
        for r, i in enumerate(keep):
            live[r, [j for j in keep if j != i]] = True
        d = memo(f"prune-{len(path)}", lambda: engine.deltas(row(live), desc="learned mask pruning"))
        if d.max() < epsilon:
            break
        keep = np.flatnonzero(live[int(np.argmax(d))]).tolist()
        path.append({"n": len(keep), "delta": float(d.max()), "neurons": neurons[keep].keys()})
    return path
