"""What masking a set does beyond the text it was found on: perplexity of other texts, generations,
task scores; and the named sets (evaluate.sets) they mask beside the critical set."""
from __future__ import annotations

import re
from pathlib import Path

from jaxcrit.critical import stage2
from jaxcrit.errors import JaxcritError
from jaxcrit.evaluate.perplexity import evaluate, evaluate_sets
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.run.runner import Run

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


def evaluated_sets(run: Run) -> dict[str, NeuronSet]:
    """The sets the evaluation and the task scores mask: the critical set, then evaluate.sets."""
    return {"critical": run["critical"].neurons, **{name: eval_set(run, name) for name in run.c.evaluate.sets}}


def evaluation(run: Run) -> dict:
    """The critical set evaluated on evaluate.file's rows (or the config text), and with it the
    sets evaluate.sets names, all in one pass over the texts: evaluation.json's "texts" and
    "overall" are the critical set's, "sets" holds each set's overall and per-text PPL."""
    from jaxcrit.data.texts import read_paragraphs
    c = run.c.evaluate
    texts = read_paragraphs(c.file, limit=c.limit) if c.file else [run.c.text]
    sets = evaluated_sets(run)
    seqs = [run.model.tokens(t, run.c.max_tokens) for t in texts]
    ev = evaluate_sets(run.model.cfg, run.model.params, seqs, sets, batch=c.batch,
                       memo=run.store.memo("evaluation"), **run.engine_options())
    rows = [{"text": t, "tokens": n, "base_ppl_log10": b, "masked_ppl_log10": m}
            for t, n, b, m in zip(texts, ev["tokens"], ev["base"], ev["sets"]["critical"])]
    o = ev["overall"]
    return {"texts": rows, "overall": {"base_ppl_log10": o["base"], "masked_ppl_log10": o["critical"],
                                       "tokens": o["tokens"]},
            "sets": {k: {"n": len(v), "neurons": v.records(), "overall_ppl_log10": o[k], "ppl_log10": ev["sets"][k]}
                     for k, v in sets.items()}}


def evaluate_texts(run: Run, neurons: NeuronSet, texts: list[str]) -> dict:
    """Perplexity of texts before and after masking neurons, in resumable blocks of evaluate.batch."""
    seqs = [run.model.tokens(t, run.c.max_tokens) for t in texts]
    return evaluate(run.model.cfg, run.model.params, seqs, texts, neurons, batch=run.c.evaluate.batch,
                    memo=run.store.memo("evaluation"), **run.engine_options())


def generations(run: Run) -> dict:
    """generate.prompts continued by the clean model and with the critical set zeroed (one batch;
    jaxcrit/evaluate/generation.py)."""
    from jaxcrit.evaluate import generation as G
    c = run.c.generate
    sampling = G.Sampling(c.temperature, c.top_k, c.top_p, run.c.seed)
    return G.base_vs_masked(run.model, list(c.prompts), run["critical"].neurons, max_new_tokens=c.max_new_tokens,
                            sampling=sampling, max_tokens=run.c.max_tokens)


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
