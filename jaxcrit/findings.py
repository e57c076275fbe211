"""docs/findings.md from a study's workdir: the paper's claims answered with the study's numbers.

    python -m jaxcrit.findings --workdir=runs/study --out=docs/findings.md

Reads only the result files the study wrote (jaxcrit/run/stages/) and copies its
plots next to the page (docs/findings/), so every number on the page comes from the command the
page names. A question whose stage did not run says so.
"""
from __future__ import annotations

import argparse
import functools
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxcrit.critical.stage2 import Growth
from jaxcrit.errors import JaxcritError, exit_code
from jaxcrit.report import io
from jaxcrit.models.sites import neuron_name
from jaxcrit.report.summary import LN10, fmt_ppl_log10, fmt_seconds, md_table, neuron_path

EPSILONS = (1.0, 3.0)   # the thresholds question (1) asks about
PLOTS = ("curve.png", "heatmap.png", "map.png", "scan.png", "modes.png", "texts.png", "dtypes.png")
OUTER = 3              # "outer layers": the first and the last OUTER layers
CURVE_AT = (1, 2, 3, 5, 8, 10, 14, 20, 30, 50, 100, 200)


class Results:
    """A workdir's result files, read on first use; a missing file reads as None."""

    def __init__(self, workdir: Path):
        self.wd = Path(workdir)
        if not (self.wd / "config.json").is_file():
            raise JaxcritError(f"{self.wd} holds no run (no config.json); give the study's --workdir")
        self._cache: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._cache:
            p = self.wd / name
            if not p.is_file():
                self._cache[name] = None
            elif name.endswith(".json"):
                self._cache[name] = io.read_json(p)
            else:
                import pandas as pd
                self._cache[name] = pd.read_csv(p)
        return self._cache[name]

    @property
    def config(self) -> dict:
        return self["config.json"]

    def curve(self) -> Growth | None:
        df = self["curve.csv"]
        return None if df is None else Growth.of(df["n"].to_numpy(int), df["delta"].to_numpy(float),
                                                 self.config["stage2"]["epsilon"])


def command(r: Results) -> str:
    """The command that reproduces the workdir: configs/study.py with its corpus, plus every field
    that differs from that config."""
    from jaxcrit.configs.study import get_config
    from jaxcrit.main import field_flags
    from jaxcrit.run.runner import identity
    corpus = r.config["evaluate"]["file"]
    return " ".join(["python -m jaxcrit.main", f"--config=configs/study.py{':' + corpus if corpus else ''}",
                     *field_flags(r.config, identity(get_config(corpus or None))), f"--workdir={r.wd}"])


def _n(x) -> str:
    return "none" if x is None else str(x)


def _f(x, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ppl(log10: float | None) -> str:
    return "n/a" if log10 is None else fmt_ppl_log10(log10)


def _text(r: Results) -> str:
    from jaxcrit.data.texts import BOOKENDS
    return "the default text (the Bookends paragraph)" if r.config["text"] == BOOKENDS else "the config text"


def _neurons(records: list[dict], at_most: int = 8) -> str:
    names = [f"`{neuron_path(x)}`" for x in records[:at_most]]
    return ", ".join(names) + (f" and {len(records) - at_most} more" if len(records) > at_most else "")


# ----------------------------------------------------------------------------- the questions

def answers(title: str, file: str, missing: str) -> Callable[[Callable[[Results, Any], list[str]]],
                                                         Callable[[Results], list[str]]]:
    """A question's section read from one result file: its heading, then body(r, the file's content),
    or the line `missing` where the stage that writes the file did not run."""
    def wrap(body: Callable[[Results, Any], list[str]]) -> Callable[[Results], list[str]]:
        @functools.wraps(body)
        def section(r: Results) -> list[str]:
            data = r[file]
            return [f"## {title}", ""] + (body(r, data) if data else [missing, ""])
        return section
    return wrap

def q1_size(r: Results) -> list[str]:
    g, imp, crit = r.curve(), r["importance.json"], r["critical.json"]
    out = ["## (1) How many neurons collapse the model", ""]
    if g is None:
        return out + ["Stage 2 did not run.", ""]
    base = crit["base_loss"] / LN10
    rows = []
    for eps in EPSILONS:
        hit = Growth.of(g.ns, g.deltas, eps).critical_n
        d = g.delta(hit) if hit else None
        rows.append([f"{eps:g}", _n(hit), _ppl(base), _ppl(base + d) if d is not None else "n/a", _f(d),
                     _neurons(imp["neurons"][:hit]) if hit else "no prefix up to n = " + str(int(g.ns[-1]))])
    out += [f"Stage 1 ranking: {imp['ranking']} mode, alpha {imp['alpha']:g}, K = {imp['samples']}, "
            f"{imp['tokens']} tokens of {_text(r)}. Stage 2 grows prefixes of that "
            "ranking; n is the first prefix whose delta = log10(PPL_masked / PPL_base) reaches epsilon.", ""]
    out += md_table(["epsilon", "n", "PPL before", "PPL after", "delta", "neurons"], rows, "rrllrl") + [""]
    ev = r["evaluation.json"]
    if ev and "sets" in ev:
        corpus = r.config["evaluate"]["file"]
        where = (f"the first {len(ev['texts'])} WikiText test paragraphs (`{corpus}`, rows longer than 50 "
                 f"characters, each cut to {r.config['max_tokens']} tokens; {ev['overall']['tokens']} predicted "
                 "tokens; token-weighted as the reference)") if corpus else "the default text"
        base_c = ev["overall"]["base_ppl_log10"]
        rows = [[k, v["n"], _ppl(base_c), _ppl(v["overall_ppl_log10"]), _f(v["overall_ppl_log10"] - base_c)]
                for k, v in ev["sets"].items()]
        out += [f"The same sets on {where}:", ""]
        out += md_table(["set", "neurons", "PPL before", "PPL after", "delta"], rows, "lrllr") + [""]
        out += ["`critical` is the epsilon-1 set above, `prefix@3` the epsilon-3 prefix, `greedy` the greedy "
                "search's set and `learned` the learned mask's (question 4).", ""]
    return out


def q2_where(r: Results) -> list[str]:
    out = ["## (2) Where they sit: outer layers and down_proj?", ""]
    crit = r["critical.json"]
    mp, scan = r["map.json"], r["scan.csv"]
    imp = r["importance.json"]
    if imp:
        from collections import Counter
        top = imp["neurons"][:100]
        sites = Counter(x["site"] for x in top)
        layers = Counter(x["layer"] for x in top)
        out += [f"Stage 1's top 100: by site {dict(sites.most_common())}; by layer "
                f"{dict(sorted(layers.items()))} (`heatmap.png`).", ""]
    rel = r["relations.json"]
    L = len(rel["residual"]) - 1 if rel else None
    outer = (lambda l: l < OUTER or l >= L - OUTER) if L else None
    if crit and crit["neurons"]:
        out += ["Critical set: " + ", ".join(f"layer {x['layer']}{f' of {L}' if L else ''} {x['site']}"
                                             for x in crit["neurons"][:10]) + ".", ""]
    if L:
        out += [f"\"Outer\" below means the first or last {OUTER} of the model's {L} layers."]
        if imp:
            n_out = sum(outer(x["layer"]) for x in imp["neurons"][:100])
            out += [f"Of Stage 1's top 100, {n_out} sit in outer layers."]
        if crit and crit["neurons"]:
            out += [f"Of the critical set's {len(crit['neurons'])}, {sum(outer(x['layer']) for x in crit['neurons'])} "
                    "sit in outer layers."]
        if mp:
            out += [f"Of the map's exact top {len(mp['top'])}, {sum(outer(x['layer']) for x in mp['top'])} sit in outer "
                    f"layers and {sum(x['site'] == 'down_proj' for x in mp['top'])} are down_proj channels."]
        out += [""]
    if mp:
        rows = [[i + 1, f"`{neuron_path(t)}`", _f(t["delta"])] for i, t in enumerate(mp["top"])]
        out += [f"The whole-model map screened all {mp['neurons']:,} neurons (screens: "
                f"{', '.join(r.config['map']['screens'])}), verified {mp['verified']} exactly in {mp['rounds']} rounds and audited {mp['audited']} "
                f"random others ({mp['audit'].get('missed', 'n/a')} of them beat the exact top-{mp['top_k']}). "
                "The largest exact single-neuron deltas anywhere in the model (`map.png`):", ""]
        out += md_table(["#", "neuron", "delta"], rows, "rlr") + [""]
    else:
        out += ["The whole-model map did not run.", ""]
    if scan is not None:
        per_layer = scan.groupby("layer")["delta"].max()
        best = per_layer.sort_values(ascending=False).head(5)
        out += ["Down_proj scan (Stage 1's best channels of every scanned layer): the layers with the largest "
                "single-neuron delta are " + ", ".join(f"{int(l)} ({d:.2f})" for l, d in best.items())
                + " (`scan.png`).", ""]
    return out


def q3_transition(r: Results) -> list[str]:
    out = ["## (3) A sharp phase transition?", ""]
    g = r.curve()
    if g is None:
        return out + ["Stage 2 did not run.", ""]
    at = [n for n in CURVE_AT if n in set(g.ns.tolist())]
    out += md_table(["n"] + [str(n) for n in at], [["delta"] + [_f(g.delta(n), ".2f") for n in at]],
                    "r" * (len(at) + 1)) + [""]
    falls = int((np.diff(g.deltas) < 0).sum())
    out += [f"The ranked curve (`curve.png`, with the baselines) over n = 1..{int(g.ns[-1])}: delta falls at "
            f"{falls} of {len(g.ns) - 1} steps; its maximum is {g.deltas.max():.2f} at n = {int(g.ns[g.deltas.argmax()])}.", ""]
    modes = r["modes.json"]
    if modes:
        first = g.delta(1) if 1 in set(g.ns.tolist()) else None
        undo = 0
        for drop in modes["drops"]:
            a = drop["added"]
            undo += first is not None and drop["with_first"] < first - 0.5
            out.append(f"- n = {drop['n'] - 1} -> {drop['n']}: delta {drop['before']:.2f} -> {drop['after']:.2f} when "
                       f"`{neuron_path(a)}` joins. Alone it gives delta {drop['alone']:.2f}; with the ranking's first "
                       f"neuron alone (delta {_f(first, '.2f')}), {drop['with_first']:.2f}.")
        if modes["drops"]:
            out += ["", f"A prefix is not a monotone family of effects. At {undo} of these {len(modes['drops'])} falls "
                    "the joining neuron, paired with the first neuron alone, already lowers the first neuron's delta "
                    "by more than 0.5: zeroing both is milder than zeroing the first alone. At the others the fall "
                    "needs the other members of the prefix too.", ""]
        else:
            out += ["No step of the curve lowers delta by more than 0.5.", ""]
        other = modes["other"]
        out += [f"Position ranking (the reference's list, `modes.png`): critical n {_n(modes['critical_n'][other])} "
                f"({modes['distinct_in_critical'][other]} distinct channels) against "
                f"{_n(modes['critical_n'][modes['main']])} in the {modes['main']} ranking.", ""]
    return out


def q4_smallest(r: Results) -> list[str]:
    out = ["## (4) Is the paper's prefix near the smallest collapsing set?", ""]
    eps = r.config["stage2"]["epsilon"]
    g, greedy, lm = r.curve(), r["greedy.json"], r["learned.json"]
    rows = []
    if g is not None:
        rows.append(["Stage 1 prefix", _n(g.critical_n), _f(g.delta(g.critical_n)) if g.critical_n else "n/a",
                     _neurons(r["importance.json"]["neurons"][:g.critical_n or 0])])
    if greedy:
        hit = greedy[-1]["delta"] >= eps
        rows.append(["greedy on measured deltas", len(greedy) if hit else f"> {len(greedy)}", _f(greedy[-1]["delta"]),
                     _neurons(greedy)])
    if lm:
        rows.append(["learned mask, prefix of the gate ranking", _n(lm["n"]),
                     _f(lm["curve"][-1]["delta"]) if lm["curve"] else "n/a", _neurons(lm["set"])])
        if lm["pruned"]:
            last = lm["pruned"][-1]
            rows.append(["learned mask, pruned", last["n"], _f(last["delta"]),
                         ", ".join(f"`{neuron_name(s, l, c)}`" for s, l, c in last["neurons"][:8])])
    out += [f"At epsilon {eps:g}, each set verified through the engine (exact deltas):", ""]
    out += md_table(["search", "n", "delta", "set"], rows, "lrrl") + [""]
    if lm:
        h = lm["history"]
        out += [f"The learned mask gated Stage 1's first {len(lm['gates'])} distinct neurons for {len(h)} Adam steps "
                f"(target delta {lm['target']:g}); at the end {lm['above_half']} gates were above 0.5 (that set's "
                f"exact delta {_f(lm['above_half_delta'])}) and the gates summed to {h[-1]['gates']:.1f}. "
                "Its prefix is ranked by gate value; pruning drops neurons one at a time while the rest still "
                "reach epsilon.", ""]
    return out


@answers("(5) fp32 / bf16 / fp16", "dtypes.json", "The dtype sweep did not run.")
def q5_dtypes(r: Results, d: dict) -> list[str]:
    rows = [[dt, _ppl(v["base_ppl_log10"]), _n(v["critical_n"]), _f(v["critical_delta"]),
             _f(max(c["delta"] for c in v["curve"]), ".2f")] for dt, v in d.items()]
    out = md_table(["dtype", "base PPL", "critical n (main dtype)", "its delta", "max delta over the prefixes"],
                    rows, "lrrrr") + [""]
    out += [f"Params and activations in each dtype (norms, softmax and loss in f32), the main ranking's first "
            f"{len(next(iter(d.values()))['curve'])} prefixes scored again (`dtypes.png`).", ""]
    return out


@answers("(6) Largest activations, super weights and massive activations", "relations.json",
         "The activation listing did not run.")
def q6_relations(r: Results, rel: dict) -> list[str]:
    rows = [[i + 1, f"`{neuron_path(t)}`", _f(t["max_abs"], ".1f"), t["position"], f"`{t['token']}`",
             _f(t["median_abs"], ".2f")] for i, t in enumerate(rel["top"][:10])]
    out = [f"The largest |down_proj output| channels of the default text (max over positions; "
            f"{rel['down_proj_channels']:,} channels):", ""]
    out += md_table(["#", "channel", "max abs", "position", "token", "median abs"], rows, "rlrrlr") + [""]
    for c in rel["critical"][:10]:
        if c.get("rank"):
            out.append(f"- critical `{neuron_path(c)}`: rank {c['rank']} of {rel['down_proj_channels']:,} by max "
                       f"|output| ({c['max_abs']:.1f} at position {c['position']}, token `{c['token']}`; median "
                       f"{c['median_abs']:.2f}).")
        else:
            out.append(f"- critical `{neuron_path(c)}`: not a down_proj channel.")
    res = rel["residual"]
    big = max(res, key=lambda x: x["max_abs"])
    dims = sorted({x["dim"] for x in res})
    out += ["", f"Residual stream: the largest |value| is {big['max_abs']:.1f} entering layer {big['entering_layer']} "
            f"(dimension {big['dim']}, position {big['position']}, token `{big['token']}`, against a median of "
            f"{big['median_abs']:.2f}); the per-layer maxima sit in dimensions {dims}.", ""]
    base = r["baselines.json"]
    if not base:
        out += ["The baselines did not run.", ""]
    elif "massive" in base:
        m = base["massive"][0]
        out += ["The massive-activation baseline (channels ranked by max |down_proj output|) grown like Stage 2: "
                + ", ".join(f"n = {x['n']}: delta {x['delta']:.2f}" for x in m) + ".", ""]
    out += ["Published: super weights sit in early down_proj layers (Llama-7B layer 2, Mistral-7B and Llama-3-8B "
            "layer 1, SmolLM2-1.7B layer 1 row 749; Yu et al. 2024) and massive activations in a few fixed residual "
            "dimensions at the first tokens (Sun et al. 2024). Nothing is published for SmolLM2-135M.", ""]
    return out


@answers("(7) Stability across seeds, alpha, K and texts", "stability.json", "The stability study did not run.")
def q7_stability(r: Results, st: dict) -> list[str]:
    rows = [[v["kind"], v["value"], v["tokens"], _n(v["critical_n"]),
             ", ".join(f"`{neuron_path(x)}`" for x in v["critical"][:4]) or "-",
             v["top10_overlap"], _f(v["top100_jaccard"], ".2f"), _f(v["critical_jaccard"], ".2f"),
             _f(v.get("main_set_delta"), ".2f") if v["kind"] == "text" else ""] for v in st["variants"]]
    out = [f"Each row runs Stage 1 and Stage 2 (to epsilon {st['epsilon']:g}) again with one setting changed; overlaps "
            "are with the main run (seed, alpha, K of the config, the default text).", ""]
    out += md_table(["varied", "value", "tokens", "critical n", "critical set", "top-10 shared", "top-100 Jaccard",
                     "critical Jaccard", "main set's delta here"], rows, "llrrlrrrr") + [""]
    plot = st["texts"].get("plot", "texts.png")
    out += ["Pairwise Jaccard index of the texts' critical sets: `texts.png`" + ("" if plot == "texts.png" else
                                                                                  f" {plot}") + ".", ""]
    return out


def q8_generations(r: Results) -> list[str]:
    out = ["## (8) Base vs masked generations and task scores", ""]
    g = r["generations.json"]
    if not g:
        out += ["The generations stage did not run.", ""]
    else:
        out += [f"Greedy continuations ({g['max_new_tokens']} new tokens) of each prompt by the clean model and with "
                f"the critical set ({g['neurons']} neuron(s)) zeroed (`generations.json`):", ""]
        rows = [[f"`{p['prompt']}`", p["base"].replace("\n", " ").replace("|", "/"),
                 p["masked"].replace("\n", " ").replace("|", "/"), _n(p["diverge_at"]),
                 _f(p["base_logprob"], ".1f"), _f(p["masked_logprob"], ".1f")] for p in g["prompts"]]
        out += md_table(["prompt", "clean", "masked", "first differing token", "clean log p", "masked log p"],
                        rows, "lllrrr") + [""]
    return out + task_scores(r)


def task_scores(r: Results) -> list[str]:
    """The tasks stage's table: each task's metrics for the clean model and each masked set (sets
    holding the same neurons share a column), with stderr and chance."""
    t = r["tasks.json"]
    if not t:
        return ["The task scores stage did not run (`tasks.enabled`; it needs `pip install 'jaxcrit[eval]'`).", ""]
    columns = [k for k, v in t["sets"].items() if v["same_as"] is None]
    names = {k: " = ".join([k] + [o for o, v in t["sets"].items() if v["same_as"] == k]) for k in columns}
    cell = lambda m: f"{m['value']:.3f} ± {m['stderr']:.3f}"
    rows = [[task, metric, _f(chance), *(cell(t["sets"][k]["scores"][task][metric]) for k in columns)]
            for task, meta in t["tasks"].items() for metric, chance in meta["chance"].items()]
    sizes = ", ".join(f"{k} {t['sets'][k]['n']} neuron(s)" for k in columns if k != "base")
    out = [f"Task scores through lm-evaluation-harness (the `jaxcrit` model of `jaxcrit/evaluate/lmeval.py`), clean (`base`) "
           f"and with each set zeroed ({sizes}); mean ± standard error over the items (`tasks.json`):", ""]
    out += md_table(["task", "metric", "chance", *(names[k] for k in columns)], rows, "llr" + "r" * len(columns))
    out += ["", f"The study built the tasks from the corpus (`{t['corpus']}`, seed {t['seed']}) and wrote their "
            "items and lm-eval YAMLs to the workdir's `tasks/` (`jaxcrit/evaluate/tasks.py`); nothing was downloaded:", ""]
    return out + [f"- `{k}` ({meta['items']} items), {meta['what']}." for k, meta in t["tasks"].items()] + [""]


def render(r: Results, plot_dir: str) -> str:
    """The page's markdown; plots are referenced under plot_dir (relative to the page)."""
    timings = r["state/timings.json"] or {}
    man = r["manifest.json"] or {}
    devices = man.get("devices", {})
    total = sum(timings.values())
    lines = ["# Findings on SmolLM2-135M-Instruct" if r.config["model"] == "smollm2" else
             f"# Findings on {r.config['model']}", "",
             "Produced by the study run and this page's generator; every number below comes from the files they write:",
             "", "```bash", command(r), f"python -m jaxcrit.findings --workdir={r.wd} --out=docs/findings.md", "```", "",
             f"Run time: {fmt_seconds(total)} summed over the stages (`state/timings.json`; "
             + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in timings.items()) + "), on "
             f"{devices.get('count', '?')} {devices.get('platform', '?')} device(s), {r.config['dtype']}, jaxcrit commit "
             f"{(man.get('git_commit') or 'unknown')[:10]}.", ""]
    for q in (q1_size, q2_where, q3_transition, q4_smallest, q5_dtypes, q6_relations, q7_stability):
        lines += q(r)
    lines += q8_generations(r)
    shown = [p for p in PLOTS if (r.wd / p).is_file()]
    if shown:
        lines += ["## Plots", ""] + [f"![{p}]({plot_dir}/{p})" for p in shown] + [""]
    return "\n".join(lines)


def write(workdir: Path, out: Path) -> Path:
    """Renders the page to out and copies the plots to out's folder / findings/."""
    r = Results(workdir)
    plots = out.parent / "findings"
    plots.mkdir(parents=True, exist_ok=True)
    for p in PLOTS:
        if (r.wd / p).is_file():
            shutil.copyfile(r.wd / p, plots / p)
    io.write_text(out, render(r, "findings"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxcrit.findings", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="the study's workdir")
    ap.add_argument("--out", default="docs/findings.md", help="the page to write (plots go to its folder/findings/)")
    a = ap.parse_args(argv)
    return exit_code(lambda: print(write(Path(a.workdir), Path(a.out))))


if __name__ == "__main__":
    sys.exit(main())
