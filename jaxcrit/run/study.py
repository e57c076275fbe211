"""The study's stages (issue 15): the paper's claims checked on one model and its texts.

    modes       Stage 1 ranked the other way (channel <-> position) and grown;        modes.json, modes.png
                the steps where the main curve falls, analysed
    stability   Stage 1 + Stage 2 again per seed, alpha, K and text;                  stability.json, texts.png
                overlaps of the rankings and critical sets
    dtypes      the ranking's first prefixes and the critical set in each dtype       dtypes.json, dtypes.png
    learned     gates over Stage 1's top neurons (critical/learned.py), verified      learned.json
                exactly and pruned
    relations   the largest |down_proj output| and residual-stream values, and where  relations.json
                the critical set sits among them

Each is a row of stages.STAGES, enabled by its config section (study.*, learned.*). Every unit
(a Stage 1 variant, a dtype, a block of optimiser steps, a verification block) is kept in the
run's Store, so a killed study resumes where it stopped. `eval_set` names the extra neuron sets
the evaluation stage scores (evaluate.sets). jaxcrit/findings.py turns the files into
docs/findings.md.
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit import engine as E
from jaxcrit.critical import stage1, stage2
from jaxcrit.errors import JaxcritError
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import module_path
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.run.runner import Run, release_memory
from jaxcrit.report import io, plots

DROP = 0.5            # a step of the main curve lowering delta by more than this is analysed (modes)
DTYPE_PREFIXES = 32   # prefixes of the ranking scored in every dtype
KEPT = 100            # ranked neurons kept per stability variant (overlaps of the top 10 and top 100)
VARIANTS = {"seeds": "seed", "alphas": "alpha", "samples": "samples", "texts": "text"}  # study field -> kind


def _title(run: Run, what: str) -> str:
    return f"{Path(str(run.c.model)).name}: {what}"


def _curve(g: stage2.Growth) -> list[dict]:
    return g.to_pandas().to_dict("records")


def jaccard(a, b) -> float:
    """|A & B| / |A | B| of two collections of neuron keys (1 for two empty sets)."""
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return len(a & b) / len(a | b) if a | b else 1.0


def critical_keys(ranking: NeuronSet, g: stage2.Growth) -> list[tuple[str, int, int]]:
    """The distinct neurons of the first prefix reaching epsilon (none if no prefix did)."""
    return list(dict.fromkeys(ranking[:g.critical_n].keys())) if g.critical_n else []


# ----------------------------------------------------------------------------- modes

def modes(run: Run) -> dict:
    """Both ranking modes' curves (the other mode ranks Stage 1's same scores) and each step of
    the main curve where delta falls by more than DROP: the neuron added there, its own delta,
    and the delta of the ranking's first neuron together with it."""
    from jaxcrit.run import stages
    c = run.c
    other = "position" if c.stage1.ranking == "channel" else "channel"
    ranked, main = run["importance"], run["growth"]
    other_ranked = stages.importance(run, other)
    g = stage2.grow(run.engine, other_ranked, epsilon=c.stage2.epsilon, max_steps=c.stage2.max_steps,
                    full_curve=c.stage2.full_curve, memo=run.store.memo("modes"))
    steps = [int(n) for n, d0, d1 in zip(main.ns[1:], main.deltas[:-1], main.deltas[1:]) if d1 < d0 - DROP][:10]
    drops = []
    if steps:
        added, first = ranked[np.array(steps) - 1], ranked[[0] * len(steps)]
        both = lambda f: np.stack([getattr(added, f), getattr(first, f)], 1)
        alone = E.make(added.site_index(), added.layer, added.channel, cfg=run.model.cfg)
        pair = E.make(np.stack([added.site_index(), first.site_index()], 1), both("layer"), both("channel"),
                      cfg=run.model.cfg)
        d = run.store.memo("modes")("drops", lambda: np.stack([run.engine.deltas(alone), run.engine.deltas(pair)]))
        for i, n in enumerate(steps):
            drops.append({"n": n, "before": main.delta(n - 1), "after": main.delta(n), "added": added[[i]].records()[0],
                          "alone": float(d[0, i]), "with_first": float(d[1, i])})
    return {"main": c.stage1.ranking, "other": other,
            "top": {c.stage1.ranking: ranked[:20].records(), other: other_ranked[:20].records()},
            "critical_n": {c.stage1.ranking: main.critical_n, other: g.critical_n},
            "distinct_in_critical": {c.stage1.ranking: len(critical_keys(ranked, main)),
                                     other: len(critical_keys(other_ranked, g))},
            "curves": {c.stage1.ranking: _curve(main), other: _curve(g)}, "drops": drops}


def save_modes(run: Run, v: dict) -> None:
    io.write_json(run.workdir / "modes.json", v)
    io.write_png(run.workdir / "modes.png", plots.phase_curve(
        v["curves"][v["main"]], run.c.stage2.epsilon, {f"{v['other']} ranking": v["curves"][v["other"]]},
        _title(run, f"{v['main']} ranking (red) vs {v['other']} ranking")), close=True)


# ----------------------------------------------------------------------------- stability

def _variant(run: Run, kind: str, value) -> dict[str, np.ndarray]:
    """Stage 1 (ranked as stage1.ranking) and Stage 2 (to epsilon) with one setting changed; for a
    text, also the main critical set's delta on it. Arrays: the top KEPT neurons and the curve."""
    from jaxcrit.data.texts import STUDY_TEXTS
    c, m = run.c, run.model
    alpha = float(value) if kind == "alpha" else c.stage1.alpha
    samples = int(value) if kind == "samples" else c.stage1.samples
    seed = int(value) if kind == "seed" else c.seed
    if kind == "text":
        tokens = m.tokens(STUDY_TEXTS[value], c.max_tokens, min_tokens=10)
        engine = E.Engine(m.cfg, m.params, E.Texts.from_ids([tokens.tolist()]), chunk=c.engine.chunk,
                          progress=c.progress, **run.engine_kw())
    else:
        tokens, engine = run.tokens, run.engine
    imp = stage1.importance(m.cfg, m.params, tokens, alpha=alpha, samples=samples, seed=seed,
                            chunk=min(c.stage1.batch, samples), progress=c.progress)
    ranked = stage1.rank(imp.scores(), c.stage1.top_n, c.stage1.threshold, c.stage1.ranking == "position")
    g = stage2.grow(engine, ranked, epsilon=c.stage2.epsilon, max_steps=c.stage2.max_steps, full_curve=False,
                    desc=f"stability {kind} {value}")
    crit = run["critical"].neurons
    transfer = engine.deltas(E.make(crit.site_index()[None], crit.layer[None], crit.channel[None], cfg=m.cfg)) \
        if kind == "text" else np.full(1, np.nan)
    top = ranked[:KEPT]
    return {"site": top.site_index(), "layer": top.layer, "channel": top.channel, "score": top.score,
            "ns": g.ns, "deltas": g.deltas, "tokens": np.asarray(len(tokens)), "transfer": transfer.astype(np.float64)}


def stability(run: Run) -> dict:
    """One record per variant (study.seeds, alphas, samples, texts; a value equal to the main
    run's is the main run): its critical n and set, its top-10 and top-100 overlap and its
    critical set's Jaccard index with the main run's; for texts, the main set's delta there and
    the pairwise Jaccard matrix of the texts' critical sets (the main text first)."""
    from jaxcrit.models.sites import SITE_NAMES
    c, eps = run.c, run.c.stage2.epsilon
    ranked, main = run["importance"], run["growth"]
    main_keys, main_top = critical_keys(ranked, main), ranked.keys()
    main_value = {"seed": c.seed, "alpha": c.stage1.alpha, "samples": c.stage1.samples}
    out = []
    for field, kind in VARIANTS.items():
        for value in c.study[field]:
            if kind != "text" and float(value) == float(main_value[kind]):
                top_keys, g, tokens, transfer = main_top[:KEPT], main, len(run.tokens), None
            else:
                got = run.store.get(f"stability/{kind}-{value}")
                if got is None:
                    got = _variant(run, kind, value)
                    run.store.put(f"stability/{kind}-{value}", got)
                top_keys = [(SITE_NAMES[s], int(l), int(ch)) for s, l, ch in zip(got["site"], got["layer"],
                                                                                  got["channel"])]
                g = stage2.Growth.of(got["ns"], got["deltas"], eps)
                tokens, transfer = int(got["tokens"]), float(got["transfer"][0])
            crit = list(dict.fromkeys(top_keys[:g.critical_n])) if g.critical_n and g.critical_n <= KEPT else []
            out.append({"kind": kind, "value": value, "tokens": tokens, "critical_n": g.critical_n,
                        "delta": float(g.deltas[-1]) if len(g.deltas) else None,
                        "critical": [{"layer_name": module_path(s, l), "channel": ch} for s, l, ch in crit],
                        "top10_overlap": len(set(top_keys[:10]) & set(main_top[:10])),
                        "top100_jaccard": jaccard(top_keys[:KEPT], main_top[:KEPT]),
                        "critical_jaccard": jaccard(crit, main_keys),
                        **({"main_set_delta": transfer} if kind == "text" else {}), "_keys": crit})
    texts = [r for r in out if r["kind"] == "text"]
    labels = ["main"] + [r["value"] for r in texts]
    sets = [main_keys] + [r["_keys"] for r in texts]
    matrix = [[jaccard(a, b) for b in sets] for a in sets]
    for r in out:
        del r["_keys"]
    return {"epsilon": eps, "variants": out, "texts": {"labels": labels, "jaccard": matrix}}


def save_stability(run: Run, v: dict) -> None:
    io.write_json(run.workdir / "stability.json", v)
    io.write_png(run.workdir / "texts.png", plots.overlap_matrix(
        np.array(v["texts"]["jaccard"], float), v["texts"]["labels"],
        _title(run, f"Jaccard index of the texts' critical sets (epsilon {v['epsilon']:g})")), close=True)


# ----------------------------------------------------------------------------- dtypes

def dtypes(run: Run) -> dict:
    """The base loss and the deltas of the main ranking's first DTYPE_PREFIXES prefixes (and the
    critical set) with params and activations in each of study.dtypes."""
    from jaxcrit.convert.load import load
    c, main = run.c, run["growth"]
    ranked = run["importance"]
    ns = np.unique(np.concatenate([main.ns[:DTYPE_PREFIXES], [main.last_n]])).astype(int)
    out = {}
    for dt in c.study.dtypes:
        def measure(dt=dt) -> np.ndarray:
            m = run.model if dt == c.dtype else load(c.model, dt, run.model.mesh)
            eng = run.engine if dt == c.dtype else E.Engine(
                m.cfg, m.params, E.Texts.from_ids([run.tokens.tolist()]), chunk=c.engine.chunk, progress=c.progress,
                **run.engine_kw())
            d = eng.deltas(E.prefixes(m.cfg, ranked.site, ranked.layer, ranked.channel, ns), desc=f"dtype {dt}")
            res = np.concatenate([[eng.base_loss], d]).astype(np.float64)
            del m, eng
            release_memory()
            return res
        got = run.store.memo("dtypes")(dt, measure)
        out[dt] = {"base_loss": float(got[0]), "base_ppl_log10": float(got[0] / E.LN10),
                   "critical_n": main.critical_n, "critical_delta": float(got[1:][list(ns).index(main.last_n)]),
                   "curve": [{"n": int(n), "delta": float(d)} for n, d in zip(ns, got[1:])]}
    return out


def save_dtypes(run: Run, v: dict) -> None:
    io.write_json(run.workdir / "dtypes.json", v)
    first, *rest = v
    io.write_png(run.workdir / "dtypes.png", plots.phase_curve(
        v[first]["curve"], run.c.stage2.epsilon, {dt: v[dt]["curve"] for dt in rest},
        _title(run, f"the ranking's prefixes in {first} (red) and {', '.join(rest)}")), close=True)


# ----------------------------------------------------------------------------- learned mask

def learned(run: Run) -> dict:
    """critical/learned.py on learned.candidates of Stage 1's ranking, pushing delta to
    stage2.epsilon + learned.margin; verified through the engine and pruned."""
    from jaxcrit.critical import learned as LM
    c, m, eps = run.c.learned, run.model, run.c.stage2.epsilon
    cand = LM.candidates(run["importance"], c.candidates)
    z, history = LM.optimise(m.cfg, m.params, run.tokens, run.engine.base_loss, cand, target=eps + c.margin,
                             sparsity=c.sparsity, steps=c.steps, lr=c.lr, init=c.init, temperature=c.temperature,
                             seed=run.c.seed, memo_state=(lambda: run.store.get("learned/gates"),
                                                          lambda a: run.store.put("learned/gates", a)))
    memo = run.store.memo("learned")
    ranking, growth, above = LM.verify(run.engine, cand, z, epsilon=eps, memo=memo)
    pruned = LM.prune(run.engine, ranking[:growth.critical_n], epsilon=eps, memo=memo) if growth.critical_n else []
    return {"epsilon": eps, "target": eps + c.margin,
            **LM.Learned(cand, z, history, ranking, growth, above, pruned).to_json()}


# ----------------------------------------------------------------------------- relations

@partial(jax.jit, static_argnames=("cfg",))
def _magnitudes(cfg: ModelConfig, params, tokens):
    """|down_proj output| [L, T, C] and |residual stream| entering each layer and leaving the last [L + 1, T, D]."""
    _, ys = decoder.forward(cfg, params, decoder.embed(cfg, params, tokens), capture=("down_proj", decoder.RESID))
    return jnp.abs(ys["down_proj"][:, 0]).astype(jnp.float32), jnp.abs(ys[decoder.RESID][:, 0]).astype(jnp.float32)


def relations(run: Run) -> dict:
    """The study.massive largest down_proj output channels by max |A| over positions (with the
    position and token of the max), each critical neuron's rank among all down_proj channels, and
    per layer the largest |residual| value (the massive activations of Sun et al. 2024)."""
    m = run.model
    down, resid = (np.asarray(x) for x in _magnitudes(m.cfg, m.params, jnp.asarray(run.tokens[None])))
    L, T, C = down.shape
    peak, where = down.max(1), down.argmax(1)                                # [L, C]
    order = np.argsort(-peak.ravel(), kind="stable")
    rank = np.empty(L * C, int)
    rank[order] = np.arange(1, L * C + 1)
    token = lambda t: m.tokenizer.decode([int(run.tokens[t])])

    def row(l: int, ch: int) -> dict:
        t = int(where[l, ch])
        return {"layer_name": module_path("down_proj", l), "layer": l, "channel": ch, "max_abs": float(peak[l, ch]),
                "position": t, "token": token(t), "rank": int(rank[l * C + ch]), "median_abs": float(np.median(down[l, :, ch]))}

    crit = run["critical"].neurons
    res = []
    for l in range(resid.shape[0]):
        t, d = np.unravel_index(int(resid[l].argmax()), resid[l].shape)
        res.append({"entering_layer": l, "max_abs": float(resid[l, t, d]), "position": int(t), "token": token(t),
                    "dim": int(d), "median_abs": float(np.median(resid[l]))})
    return {"down_proj_channels": L * C, "top": [row(int(i) // C, int(i) % C) for i in order[:run.c.study.massive]],
            "critical": [row(int(l), int(ch)) if s == "down_proj" else {"layer_name": module_path(s, int(l)),
                                                                          "channel": int(ch), "rank": None}
                         for s, l, ch in crit.keys()],
            "residual": res}


# ----------------------------------------------------------------------------- evaluation sets

PREFIX = re.compile(r"prefix@(\d+(\.\d*)?)$")


def valid_set_name(name: str) -> bool:
    return name in ("greedy", "learned") or bool(PREFIX.match(name))


def eval_set(run: Run, name: str) -> NeuronSet:
    """A named neuron set of this run: greedy (the greedy search's path), learned (the pruned
    learned set, or its collapsing prefix), prefix@E (the ranking's first prefix reaching delta E
    on the Stage 2 curve; the whole curve's ranking when none does)."""
    if name == "greedy":
        path = run["greedy"] or []
        return NeuronSet.make([r["site"] for r in path], [r["layer"] for r in path], [r["channel"] for r in path])
    if name == "learned":
        got = run["learned"]
        if got is None:
            raise JaxcritError("evaluate.sets names 'learned' but the learned mask is off (learned.candidates = 0)")
        keys = got["pruned"][-1]["neurons"] if got["pruned"] else [(r["site"], r["layer"], r["channel"])
                                                                    for r in got["set"]]
        return NeuronSet.of([tuple(k) for k in keys])
    g = run["growth"]
    hit = stage2.Growth.of(g.ns, g.deltas, float(PREFIX.match(name).group(1)))
    return run["importance"][:hit.last_n]
