"""The pipeline as data: each stage's name, result files, and how it computes, saves and loads.

    importance  Stage 1 ranking                    importance.json, heatmap.png
    growth      Stage 2 prefixes of the ranking    curve.csv
    critical    the first prefix reaching epsilon  critical.json
    baselines   random/activation/gradient/massive baselines.json
    scan        single-neuron deltas               scan.csv, scan.png
    greedy      greedy growth on measured deltas   greedy.json
    map         every neuron screened, top verified map.csv, map.json, map.png
    evaluation  perplexity before/after masking    evaluation.json
    generations prompts continued, clean vs masked  generations.json
    tasks       lm-eval scores, clean vs masked    tasks.json (and the tasks it built: tasks/)
    modes, stability, dtypes, learned, relations: the study's stages (jaxcrit/run/study.py)
    report      the summary of all of the above    curve.png, summary.md

A stage reads earlier stages' values as run[name]; the functions named *_of take their input
explicitly, so the Python API (jaxcrit/api.py) runs the same code on inputs a user gives.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ml_collections import ConfigDict

from jaxcrit import engine as E
from jaxcrit.run import study
from jaxcrit.critical import baselines as B
from jaxcrit.critical import maps
from jaxcrit.critical import screens as SC
from jaxcrit.critical import scan as S
from jaxcrit.critical import stage1, stage2
from jaxcrit.evaluate.perplexity import evaluate
from jaxcrit.errors import JaxcritError
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.run.runner import Run
from jaxcrit.report import io, plots, summary


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    files: tuple[str, ...]                      # result files it writes in the workdir
    compute: Callable[[Run], Any]
    save: Callable[[Run, Any], None]
    load: Callable[[Run], Any]
    enabled: Callable[[ConfigDict], bool] = lambda c: True
    cached: bool = True                         # False: recomputed on every run (the report)
    programs: tuple[Callable, ...] = ()         # jitted functions only this stage uses: the CLI drops them after it


def _title(run: Run, what: str) -> str:
    return f"{Path(str(run.c.model)).name}: {what}"


# ----------------------------------------------------------------------------- Stage 1

def importance_scores(run: Run) -> stage1.Importance:
    """Stage 1's mean |A_clean - A_noisy|; the running sums are kept after every batch of noisy
    passes (a finished run's sums are found there again)."""
    c, m = run.c.stage1, run.model
    got = run.store.get("stage1")
    state = stage1.Importance({k: v for k, v in got.items() if k != "_k"}, int(got["_k"])) if got else None
    if state is not None and state.k < c.samples:
        run.say(f"stage 1: resuming after {state.k} of {c.samples} noisy passes")
    keep = (lambda s: run.store.put("stage1", {**s.sums, "_k": np.asarray(s.k)})) if run.workdir else None
    return stage1.importance(m.cfg, m.params, run.tokens, alpha=c.alpha, samples=c.samples, seed=run.c.seed,
                             chunk=c.batch, state=state, on_chunk=keep, progress=run.c.progress)


def importance(run: Run, ranking: str | None = None) -> NeuronSet:
    """Stage 1's ranking (stage1.ranking, or the mode given)."""
    c = run.c.stage1
    ranked = stage1.rank(importance_scores(run).scores(), c.top_n, c.threshold,
                         (ranking or c.ranking) == "position")
    if not len(ranked):
        raise JaxcritError(f"stage 1 ranked no neuron: no importance score is above stage1.threshold "
                           f"({c.threshold}); lower stage1.threshold or raise stage1.alpha")
    return ranked


def save_importance(run: Run, ranking: NeuronSet) -> None:
    c = run.c.stage1
    io.write_json(run.workdir / "importance.json",
                  {"ranking": c.ranking, "alpha": c.alpha, "samples": c.samples, "tokens": int(len(run.tokens)),
                   "neurons": ranking.records(reference=True)})
    io.write_png(run.workdir / "heatmap.png", plots.site_heatmap(
        ranking[:100].records(), run.model.cfg.n_layers, SITE_NAMES, _title(run, "top-100 neurons")), close=True)


def load_importance(run: Run) -> NeuronSet:
    return NeuronSet.from_records(io.read_json(run.workdir / "importance.json")["neurons"])


# ----------------------------------------------------------------------------- Stage 2

def growth_of(run: Run, ranking: NeuronSet) -> stage2.Growth:
    """Prefixes of a ranking scored until delta >= stage2.epsilon (every n with full_curve)."""
    c = run.c.stage2
    return stage2.grow(run.engine, ranking, epsilon=c.epsilon, max_steps=c.max_steps, full_curve=c.full_curve,
                       memo=run.store.memo("growth"))


def save_growth(run: Run, g: stage2.Growth) -> None:
    io.write_csv(run.workdir / "curve.csv", g.to_pandas().to_dict("records"), ["n", "delta"])


def load_growth(run: Run) -> stage2.Growth:
    import pandas as pd
    df = pd.read_csv(run.workdir / "curve.csv")
    ns, deltas = df["n"].to_numpy(int), df["delta"].to_numpy(np.float32)
    return stage2.Growth.of(ns, deltas, run.c.stage2.epsilon)


@dataclasses.dataclass
class Critical:
    """The critical set: the first n neurons of the ranking reaching epsilon (or all scored)."""
    neurons: NeuronSet
    n: int | None          # None: no prefix reached epsilon; neurons is then the largest prefix scored
    epsilon: float
    delta: float
    base_loss: float       # mean NLL of the text, nats/token

    @property
    def loss(self) -> float:
        return self.base_loss + self.delta * E.LN10

    def to_json(self) -> dict:
        return {"n": self.n, "epsilon": self.epsilon, "delta": self.delta, "base_loss": self.base_loss,
                "loss": self.loss, "neurons": self.neurons.records()}


def critical(run: Run) -> Critical:
    g = run["growth"]
    return Critical(run["importance"][:g.last_n], g.critical_n, run.c.stage2.epsilon, g.delta(g.last_n),
                    run.engine.base_loss)


def load_critical(run: Run) -> Critical:
    d = io.read_json(run.workdir / "critical.json")
    return Critical(NeuronSet.from_records(d["neurons"]), d["n"], d["epsilon"], d["delta"], d["base_loss"])


# ----------------------------------------------------------------------------- baselines

def baselines(run: Run) -> dict[str, list[stage2.Growth]]:
    """Each baseline's ranking (random: seeded repeats) grown at baselines.ns. The prefixes of
    all baselines and repeats are scored together in engine-sized batches; each repeat's
    deltas are kept as soon as its batch is done."""
    c, m = run.c.baselines, run.model
    ns = np.asarray(c.ns, int)
    units = {(name, r): B.ranking(name, m.cfg, m.params, run.tokens, int(ns.max()), run.c.seed + r)
             for name in c.names for r in range(c.random_repeats if name == "random" else 1)}
    sizes = {k: ns[ns <= len(rk)] for k, rk in units.items()}
    deltas = score_packed(run, "baselines", {
        f"{name}-{r}": (lambda rk=rk, n=sizes[(name, r)]: E.prefixes(m.cfg, rk.site, rk.layer, rk.channel, n))
        for (name, r), rk in units.items()})
    out: dict[str, list[stage2.Growth]] = {}
    for (name, r), n in sizes.items():
        d = deltas[f"{name}-{r}"]
        out.setdefault(name, []).append(stage2.Growth.of(n, d, run.c.stage2.epsilon))
    return out


def score_packed(run: Run, prefix: str, units: dict[str, Callable[[], E.Ablations]]) -> dict[str, np.ndarray]:
    """Deltas of each unit's rows. Units are packed in order into batches of about one engine
    chunk (a unit is never split), so small units do not each pay for a padded chunk; each
    batch's deltas are kept as one piece of resume state. The plan depends on the units alone,
    so a resumed run scores the missing batches with the same rows (and the same rounding)."""
    built = [(k, units[k]()) for k in units]
    batches: list[list[tuple[str, E.Ablations]]] = [[]]
    for k, abl in built:          # fill each batch up to one chunk; a unit larger than that goes alone
        if batches[-1] and sum(a.rows for _, a in batches[-1]) + abl.rows > run.engine.chunk:
            batches.append([])
        batches[-1].append((k, abl))
    out = {}
    for i, batch in enumerate(batches):
        done = run.store.memo(prefix)(f"batch-{i}", lambda: run.engine.deltas(
            _concat([a for _, a in batch]), desc=f"{prefix} {', '.join(k for k, _ in batch)}"))
        out.update(zip((k for k, _ in batch), np.split(done, np.cumsum([a.rows for _, a in batch])[:-1])))
    return out


def _concat(parts: list[E.Ablations]) -> E.Ablations:
    """Rows of several batches in one; shorter rows padded with inactive entries (scale 1, value 0)."""
    K = max(p.site.shape[1] for p in parts)
    cols = {f: np.concatenate([np.pad(getattr(p, f), ((0, 0), (0, K - p.site.shape[1])), constant_values=v)
                               for p in parts]) for f, v in E.INACTIVE.items()}
    return E.Ablations(**cols)


def save_baselines(run: Run, value: dict[str, list[stage2.Growth]]) -> None:
    io.write_json(run.workdir / "baselines.json",
                  {name: [g.to_pandas().to_dict("records") for g in gs] for name, gs in value.items()})


def load_baselines(run: Run) -> dict[str, list[stage2.Growth]]:
    eps = run.c.stage2.epsilon
    out = {}
    for name, curves in io.read_json(run.workdir / "baselines.json").items():
        out[name] = []
        for curve in curves:
            n = np.array([r["n"] for r in curve], int)
            d = np.array([r["delta"] for r in curve], np.float32)
            out[name].append(stage2.Growth.of(n, d, eps))
    return out


# ----------------------------------------------------------------------------- scan and greedy

SCAN_COLUMNS = ["site", "layer", "channel", "delta"]


def scan_targets(run: Run) -> NeuronSet:
    """The neurons the scan covers: scan.sites x scan.layers (default: the critical set's layers,
    at most scan.max_layers) x scan.channels (default: all), or with scan.top the channels of
    each site and layer that Stage 1 ranks highest."""
    c, cfg = run.c.scan, run.model.cfg
    layers = list(c.layers) or list(dict.fromkeys(int(x) for x in run["critical"].neurons.layer))
    if not c.layers and c.max_layers:
        layers = layers[:c.max_layers]
    if not c.top:
        return S.neurons(cfg, c.sites, layers, list(c.channels) or None)
    ranking = run["importance"]
    parts = []
    for site in c.sites:
        for layer in sorted(layers, reverse=True):
            mine = ranking[(ranking.site == site) & (ranking.layer == layer)]
            channels = list(dict.fromkeys(int(x) for x in mine.channel))[:c.top]
            parts.append(S.neurons(cfg, [site], [layer], channels))
    return NeuronSet.make(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("site", "layer", "channel")))


def scan_of(run: Run, targets: NeuronSet) -> NeuronSet:
    """Single-neuron deltas (as scores) of the targets, in resumable blocks of 8 engine chunks."""
    return S.scan(run.engine, targets, block=run.engine.chunk * 8, memo=run.store.memo("scan"))


def save_scan(run: Run, scanned: NeuronSet) -> None:
    rows = [{"site": r["site"], "layer": r["layer"], "channel": r["channel"], "delta": r["score"]}
            for r in scanned.records()]
    io.write_csv(run.workdir / "scan.csv", rows, SCAN_COLUMNS)
    io.write_png(run.workdir / "scan.png", plots.scan_distribution(rows, run.model.cfg.n_layers,
                                                                   _title(run, "single-neuron scan")), close=True)


def load_scan(run: Run) -> NeuronSet:
    import pandas as pd
    df = pd.read_csv(run.workdir / "scan.csv")
    return NeuronSet.make(df["site"], df["layer"], df["channel"], score=df["delta"].to_numpy(np.float32))


def greedy(run: Run) -> list[dict]:
    c = run.c.scan
    return S.greedy(run.engine, S.top(run["scan"], c.greedy_pool), steps=c.greedy_steps,
                    epsilon=run.c.stage2.epsilon, memo=run.store.memo("greedy"))


# ----------------------------------------------------------------------------- whole-model map

def map_of(run: Run) -> maps.Map:
    """Every neuron's screens (map.screens), the candidates verified through the engine round by
    round until the stopping rule, and the audit sample (critical/maps.py). Each screen and each
    round is one unit of resume state."""
    c, m = run.c.map, run.model
    memo = run.store.memo("map")
    grads = functools.cache(lambda: SC.gradient_screens(m.cfg, m.params, run.tokens))
    source = {"first_order": lambda: grads()["first_order"], "magnitude": lambda: grads()["magnitude"],
              "importance": lambda: SC.from_ranking(m.cfg, run["importance"])}
    values = {name: memo(f"screen-{name}", lambda name=name: SC.flat(source[name]())) for name in c.screens}
    everyone = SC.universe(m.cfg)

    def measure(key: str, idx: np.ndarray) -> np.ndarray:
        part = everyone[idx]
        return memo(key, lambda: run.engine.deltas(E.make(part.site, part.layer, part.channel, cfg=m.cfg),
                                                   desc=f"map {key}", sites=SITE_NAMES))   # one program
    block = maps.round_block(c.block, run.engine.chunk, len(values), c.top_k)
    return maps.build(everyone, values, measure, top_k=c.top_k, block=block, max_rounds=c.max_rounds, audit=c.audit,
                      seed=run.c.seed)


def save_map(run: Run, mp: maps.Map) -> None:
    df = mp.table()
    io.write_csv(run.workdir / "map.csv", df.to_dict("records"), list(df.columns))
    io.write_json(run.workdir / "map.json", mp.summary())
    cfg, everyone = run.model.cfg, mp.neurons
    best = np.full((cfg.n_layers, len(SITE_NAMES)), np.nan)
    done = mp.how != maps.NOT
    np.fmax.at(best, (everyone.layer[done], everyone.site_index()[done]), mp.delta[done])
    io.write_png(run.workdir / "map.png", plots.max_heatmap(best, SITE_NAMES, _title(run, "whole-model map")),
                 close=True)


def load_map(run: Run) -> maps.Map:
    import pandas as pd
    df = pd.read_csv(run.workdir / "map.csv", keep_default_na=False, na_values=["nan"])
    meta = io.read_json(run.workdir / "map.json")
    return maps.Map(NeuronSet.make(df["site"], df["layer"], df["channel"]),
                    {name: df[name].to_numpy(np.float32) for name in run.c.map.screens},
                    df["delta"].to_numpy(np.float32), df["verified"].map(maps.HOW.index).to_numpy(np.int8),
                    meta["rounds"], meta["stopped"], meta["top_k"], meta["block"])


# ----------------------------------------------------------------------------- evaluation

def evaluation(run: Run) -> dict:
    """The critical set evaluated on evaluate.file's rows (or the config text), and with it the
    sets evaluate.sets names (study.eval_set), all in one pass over the texts: evaluation.json's
    "texts" and "overall" are the critical set's, "sets" holds each set's overall and per-text PPL."""
    from jaxcrit.evaluate.perplexity import evaluate_sets
    from jaxcrit.data.texts import read_paragraphs
    c = run.c.evaluate
    texts = read_paragraphs(c.file, limit=c.limit) if c.file else [run.c.text]
    sets = evaluated_sets(run)
    seqs = [run.model.tokens(t, run.c.max_tokens) for t in texts]
    ev = evaluate_sets(run.model.cfg, run.model.params, seqs, sets, batch=c.batch,
                       memo=run.store.memo("evaluation"), **run.engine_kw())
    rows = [{"text": t, "tokens": n, "base_ppl_log10": b, "masked_ppl_log10": m}
            for t, n, b, m in zip(texts, ev["tokens"], ev["base"], ev["sets"]["critical"])]
    o = ev["overall"]
    return {"texts": rows, "overall": {"base_ppl_log10": o["base"], "masked_ppl_log10": o["critical"],
                                       "tokens": o["tokens"]},
            "sets": {k: {"n": len(v), "neurons": v.records(), "overall_ppl_log10": o[k], "ppl_log10": ev["sets"][k]}
                     for k, v in sets.items()}}


def evaluated_sets(run: Run) -> dict[str, NeuronSet]:
    """The sets the evaluation and the task scores mask: the critical set, then evaluate.sets."""
    from jaxcrit.run.study import eval_set
    return {"critical": run["critical"].neurons, **{name: eval_set(run, name) for name in run.c.evaluate.sets}}


def evaluate_texts(run: Run, neurons: NeuronSet, texts: list[str]) -> dict:
    """Perplexity of texts before and after masking neurons, in resumable blocks of evaluate.batch."""
    seqs = [run.model.tokens(t, run.c.max_tokens) for t in texts]
    return evaluate(run.model.cfg, run.model.params, seqs, texts, neurons, batch=run.c.evaluate.batch,
                    memo=run.store.memo("evaluation"), **run.engine_kw())


# ----------------------------------------------------------------------------- generations

def generations(run: Run) -> dict:
    """generate.prompts continued by the clean model and with the critical set zeroed (one batch;
    jaxcrit/evaluate/generation.py)."""
    from jaxcrit.evaluate import generation as G
    c = run.c.generate
    sampling = G.Sampling(c.temperature, c.top_k, c.top_p, run.c.seed)
    return G.base_vs_masked(run.model, list(c.prompts), run["critical"].neurons, max_new_tokens=c.max_new_tokens,
                            sampling=sampling, max_tokens=run.c.max_tokens)


# ----------------------------------------------------------------------------- task scores

def task_scores(run: Run) -> dict:
    """The tasks of jaxcrit/evaluate/tasks.py built from evaluate.file (into the workdir's tasks/) and
    scored through lm-eval (jaxcrit/evaluate/lmeval.py) by the clean model ("base") and with each
    evaluated set zeroed; a set holding the same neurons as an earlier one is scored once and
    names it in "same_as". tasks.json."""
    import tempfile

    from jaxcrit.evaluate import lmeval
    from jaxcrit.evaluate import tasks as T
    c = run.c
    with tempfile.TemporaryDirectory(prefix="jaxcrit-tasks-") as tmp:
        folder = run.workdir / "tasks" if run.workdir else Path(tmp)
        built = T.write(c.evaluate.file, folder, c.tasks.limit, c.seed)
        names = [t["lm_eval"] for t in built.values()]
        sets: dict[str, dict] = {}
        for name, neurons in {"base": None, **evaluated_sets(run)}.items():
            key = sorted(neurons.keys()) if neurons is not None else []
            same = next((k for k, v in sets.items() if v["key"] == key), None)
            got = sets[same]["scores"] if same else lmeval.scores(
                lmeval.JaxcritLM(run.model, neurons=neurons, batch_size=c.tasks.batch), folder, names)
            sets[name] = {"key": key, "same_as": same, "scores": got}
    by_name = {t["lm_eval"]: k for k, t in built.items()}
    return {"corpus": c.evaluate.file, "seed": c.seed, "tasks": built,
            "sets": {k: {"n": len(v["key"]), "same_as": v["same_as"],
                         "scores": {by_name[t]: m for t, m in v["scores"].items()}} for k, v in sets.items()}}


# ----------------------------------------------------------------------------- report

def report(run: Run) -> dict:
    """The summary of every stage that ran (the dict summary.md and the terminal table render)."""
    crit, base, scanned, greedy_path, ev = (run[k] for k in ("critical", "baselines", "scan", "greedy",
                                                              "evaluation"))
    out = {
        "model": str(run.c.model), "text_tokens": int(len(run.tokens)), "base_loss": crit.base_loss,
        "epsilon": crit.epsilon,
        "critical": {"n": crit.n, "delta": crit.delta, "loss": crit.loss, "neurons": crit.neurons.records()},
        "curve": run["growth"].to_pandas().to_dict("records"),
        "baselines": {k: {"n_max": int(v[0].ns[-1]), "delta_at_n_max": float(np.mean([g.deltas[-1] for g in v]))}
                      for k, v in (base or {}).items() if v and len(v[0].ns)},
        "baseline_curves": {k: [g.to_pandas().to_dict("records") for g in v] for k, v in (base or {}).items()},
        "evaluation": ev["texts"][:20],
        "timings": dict(run.timings),
    }
    if scanned is not None:
        out["scan"] = {"rows": len(scanned), "top": [
            {"site": r["site"], "layer": r["layer"], "channel": r["channel"], "delta": r["score"]}
            for r in S.top(scanned, 5).records()]}
    if greedy_path:
        out["greedy"] = greedy_path
    if run["map"] is not None:
        out["map"] = run["map"].summary()
    if run["generations"] is not None:
        out["generations"] = run["generations"]
    return out


def save_report(run: Run, result: dict) -> None:
    io.write_png(run.workdir / "curve.png", plots.phase_curve(
        result["curve"], result["epsilon"], result["baseline_curves"], _title(run, "phase transition"),
        result["critical"]["n"]), close=True)
    io.write_text(run.workdir / "summary.md", summary.summary_markdown(result))


STAGES: dict[str, Stage] = {st.name: st for st in (
    Stage("importance", ("importance.json", "heatmap.png"), importance, save_importance, load_importance,
          programs=stage1.PROGRAMS),
    Stage("growth", ("curve.csv",), lambda run: growth_of(run, run["importance"]), save_growth, load_growth),
    Stage("critical", ("critical.json",), critical,
          lambda run, v: io.write_json(run.workdir / "critical.json", v.to_json()), load_critical),
    Stage("baselines", ("baselines.json",), baselines, save_baselines, load_baselines,
          enabled=lambda c: bool(c.baselines.names), programs=B.PROGRAMS),
    Stage("scan", ("scan.csv", "scan.png"), lambda run: scan_of(run, scan_targets(run)), save_scan, load_scan,
          enabled=lambda c: bool(c.scan.sites)),
    Stage("greedy", ("greedy.json",), greedy, lambda run, v: io.write_json(run.workdir / "greedy.json", v),
          lambda run: io.read_json(run.workdir / "greedy.json"),
          enabled=lambda c: bool(c.scan.sites) and c.scan.greedy_steps > 0),
    Stage("map", ("map.csv", "map.json", "map.png"), map_of, save_map, load_map, enabled=lambda c: c.map.enabled,
          programs=SC.PROGRAMS),
    Stage("evaluation", ("evaluation.json",), evaluation,
          lambda run, v: io.write_json(run.workdir / "evaluation.json", v),
          lambda run: io.read_json(run.workdir / "evaluation.json")),
    Stage("generations", ("generations.json",), generations,
          lambda run, v: io.write_json(run.workdir / "generations.json", v),
          lambda run: io.read_json(run.workdir / "generations.json"), enabled=lambda c: c.generate.enabled),
    Stage("tasks", ("tasks.json",), task_scores, lambda run, v: io.write_json(run.workdir / "tasks.json", v),
          lambda run: io.read_json(run.workdir / "tasks.json"), enabled=lambda c: c.tasks.enabled),
    # --- issue 15: the study's stages (jaxcrit/run/study.py)
    Stage("modes", ("modes.json", "modes.png"), study.modes, study.save_modes,
          lambda run: io.read_json(run.workdir / "modes.json"), enabled=lambda c: c.study.other_ranking),
    Stage("stability", ("stability.json", "texts.png"), study.stability, study.save_stability,
          lambda run: io.read_json(run.workdir / "stability.json"),
          enabled=lambda c: any(c.study[f] for f in study.VARIANTS)),
    Stage("dtypes", ("dtypes.json", "dtypes.png"), study.dtypes, study.save_dtypes,
          lambda run: io.read_json(run.workdir / "dtypes.json"), enabled=lambda c: bool(c.study.dtypes)),
    Stage("learned", ("learned.json",), study.learned, lambda run, v: io.write_json(run.workdir / "learned.json", v),
          lambda run: io.read_json(run.workdir / "learned.json"), enabled=lambda c: c.learned.candidates > 0),
    Stage("relations", ("relations.json",), study.relations,
          lambda run, v: io.write_json(run.workdir / "relations.json", v),
          lambda run: io.read_json(run.workdir / "relations.json"), enabled=lambda c: c.study.massive > 0),
    # --- end issue 15
    Stage("report", ("curve.png", "summary.md"), report, save_report, lambda run: report(run), cached=False),
)}
