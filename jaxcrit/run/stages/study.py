"""The study's stages: the paper's claims checked on one model and its texts.

    modes       Stage 1 ranked the other way (channel <-> position) and grown;        modes.json, modes.png
                the steps where the main curve falls, analysed
    stability   Stage 1 + Stage 2 again per seed, alpha, K and text;                  stability.json, texts.png
                                                                                  (unless constant)
                overlaps of the rankings and critical sets
    dtypes      the ranking's first prefixes and the critical set in each dtype       dtypes.json, dtypes.png
    learned     gates over Stage 1's top neurons (critical/learned.py), verified      learned.json
                exactly and pruned
    relations   the largest |down_proj output| and residual-stream values, and where  relations.json
                the critical set sits among them

Each is enabled by its config section (study.*, learned.*); the measurements are
jaxcrit/critical/study.py's. Every unit (a Stage 1 variant, a dtype, a block of optimiser steps,
a verification block) is kept in the run's Store, so a killed study resumes where it stopped.
jaxcrit/findings.py turns the files into docs/findings.md.
"""
from __future__ import annotations

import numpy as np

from jaxcrit.critical import stage2
from jaxcrit.critical import study as CS
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.report import heatmaps, io, plots
from jaxcrit.run.engines import build_engine
from jaxcrit.run.runner import Run, release_memory
from jaxcrit.run.stages.ranking import importance

VARIANTS = {"seeds": "seed", "alphas": "alpha", "samples": "samples", "texts": "text"}  # study field -> kind


def modes(run: Run) -> dict:
    """Both ranking modes' curves (the other mode ranks Stage 1's same scores) and each step of
    the main curve where delta falls by more than CS.DROP (CS.drops)."""
    c = run.c
    main_mode = c.stage1.ranking
    other = "position" if main_mode == "channel" else "channel"
    ranked, main = run["importance"], run["growth"]
    other_ranked = importance(run, other)
    g = stage2.grow(run.engine, other_ranked, epsilon=c.stage2.epsilon, max_steps=c.stage2.max_steps,
                    full_curve=c.stage2.full_curve, memo=run.store.memo("modes"))
    drops = CS.drops(run.engine, ranked, main, memo=run.store.memo("modes"))
    return {"main": main_mode, "other": other,
            "top": {main_mode: ranked[:20].records(), other: other_ranked[:20].records()},
            "critical_n": {main_mode: main.critical_n, other: g.critical_n},
            "distinct_in_critical": {main_mode: len(CS.critical_keys(ranked, main)),
                                     other: len(CS.critical_keys(other_ranked, g))},
            "curves": {main_mode: main.to_pandas().to_dict("records"), other: g.to_pandas().to_dict("records")},
            "drops": drops}


def save_modes(run: Run, v: dict) -> None:
    io.write_json(run.workdir / "modes.json", v)
    io.write_png(run.workdir / "modes.png", plots.phase_curve(
        v["curves"][v["main"]], run.c.stage2.epsilon, {f"{v['other']} ranking": v["curves"][v["other"]]},
        run.title(f"delta vs number of neurons zeroed: Stage 1's scores ranked by {v['main']} and by {v['other']}"),
        label=f"{v['main']} ranking (the run's)"), close=True)


def _variant(run: Run, kind: str, value) -> dict[str, np.ndarray]:
    """CS.variant with one setting of the main run changed; a text gets an engine of its own."""
    from jaxcrit.data.texts import STUDY_TEXTS
    c, m = run.c, run.model
    if kind == "text":
        tokens = m.tokens(STUDY_TEXTS[value], c.max_tokens, min_tokens=10)
        engine = build_engine(m, [tokens], c.engine, progress=c.progress)
    else:
        tokens, engine = run.tokens, run.engine
    return CS.variant(m.cfg, m.params, engine, tokens, run["critical"].neurons if kind == "text" else None,
                      alpha=float(value) if kind == "alpha" else c.stage1.alpha,
                      samples=int(value) if kind == "samples" else c.stage1.samples,
                      seed=int(value) if kind == "seed" else c.seed, batch=c.stage1.batch, top_n=c.stage1.top_n,
                      threshold=c.stage1.threshold, position=c.stage1.ranking == "position",
                      epsilon=c.stage2.epsilon, max_steps=c.stage2.max_steps, progress=c.progress,
                      desc=f"stability {kind} {value}")


def stability(run: Run) -> dict:
    """One record per variant (study.seeds, alphas, samples, texts; a value equal to the main
    run's is the main run): its critical n and set and its overlaps with the main run
    (CS.compare); for texts, the main set's delta there and the pairwise Jaccard matrix of the
    texts' critical sets (the main text first)."""
    c, eps = run.c, run.c.stage2.epsilon
    ranked, main = run["importance"], run["growth"]
    main_keys, main_top = CS.critical_keys(ranked, main), ranked.keys()
    main_value = {"seed": c.seed, "alpha": c.stage1.alpha, "samples": c.stage1.samples}
    out, text_sets = [], [main_keys]
    for field, kind in VARIANTS.items():
        for value in c.study[field]:
            if kind != "text" and float(value) == float(main_value[kind]):
                top_keys, g, tokens, transfer = main_top[:CS.KEPT], main, len(run.tokens), None
            else:
                got = run.store.get(f"stability/{kind}-{value}")
                if got is None:
                    got = _variant(run, kind, value)
                    run.store.put(f"stability/{kind}-{value}", got)
                top_keys = [(SITE_NAMES[s], int(l), int(ch)) for s, l, ch in zip(got["site"], got["layer"],
                                                                                  got["channel"])]
                g = stage2.Growth.of(got["ns"], got["deltas"], eps)
                tokens, transfer = int(got["tokens"]), float(got["transfer"][0])
            record, crit = CS.compare(top_keys, g, main_top, main_keys)
            out.append({"kind": kind, "value": value, "tokens": tokens, **record,
                        **({"main_set_delta": transfer} if kind == "text" else {})})
            if kind == "text":
                text_sets.append(crit)
    labels = ["main"] + [r["value"] for r in out if r["kind"] == "text"]
    matrix = [[CS.jaccard(a, b) for b in text_sets] for a in text_sets]
    return {"epsilon": eps, "variants": out, "texts": {"labels": labels, "jaccard": matrix}}


def save_stability(run: Run, v: dict) -> None:
    """stability.json, and texts.png unless every pair of texts has the same overlap (one colour
    would say nothing: stability.json's texts.plot says why it is missing)."""
    jaccard = np.array(v["texts"]["jaccard"], float)
    same = heatmaps.constant(jaccard)
    v["texts"]["plot"] = ("texts.png" if same is None else
                          f"not drawn: every pair of the {len(jaccard)} texts' critical sets has Jaccard index {same:.2f}")
    io.write_json(run.workdir / "stability.json", v)
    (run.workdir / "texts.png").unlink(missing_ok=True)
    if same is None:
        io.write_png(run.workdir / "texts.png", heatmaps.overlap_matrix(
            jaccard, v["texts"]["labels"],
            run.title(f"Jaccard index of the texts' critical sets (epsilon {v['epsilon']:g})")), close=True)


def dtypes(run: Run) -> dict:
    """The base loss and the deltas of the main ranking's first CS.DTYPE_PREFIXES prefixes (and
    the critical set) with params and activations in each of study.dtypes."""
    from jaxcrit.convert.load import load
    c, main, ranked = run.c, run["growth"], run["importance"]
    ns = CS.dtype_prefixes(main)
    out = {}
    for dt in c.study.dtypes:
        def measure(dt=dt) -> np.ndarray:
            m = run.model if dt == c.dtype else load(c.model, dt, run.model.mesh)
            eng = run.engine if dt == c.dtype else build_engine(m, [run.tokens], c.engine, progress=c.progress)
            res = CS.prefix_losses(eng, ranked, ns, desc=f"dtype {dt}")
            del m, eng
            release_memory()
            return res
        out[dt] = CS.dtype_record(run.store.memo("dtypes")(dt, measure), main, ns)
    return out


def save_dtypes(run: Run, v: dict) -> None:
    io.write_json(run.workdir / "dtypes.json", v)
    first, *rest = v
    io.write_png(run.workdir / "dtypes.png", plots.phase_curve(
        v[first]["curve"], run.c.stage2.epsilon, {dt: v[dt]["curve"] for dt in rest},
        run.title(f"delta vs number of neurons zeroed, the ranking's prefixes in {', '.join(v)}"), label=first),
        close=True)


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


def relations(run: Run) -> dict:
    """CS.relations on the config text: the study.massive largest down_proj output channels, where
    the critical set ranks among them, and the largest residual-stream values."""
    m = run.model
    return CS.relations(m.cfg, m.params, run.tokens, run["critical"].neurons, run.c.study.massive, m.tokenizer.decode)
