"""Text summaries of a run: a Markdown report and a short terminal table.

Perplexities are carried and printed in log10 space (PPL = 10^x), formatted from the log10
value itself, so 10^3000 prints as "10^3000.00 (1.00e3000)" without ever computing it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from jaxcrit.models.sites import neuron_name, parse_module_path

LN10 = math.log(10.0)   # nats per log10 unit: delta = log10(PPL_masked / PPL_base) = (loss - base) / LN10


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _finite_or_label(x: Any, inf: str, neg_inf: str) -> float | str:
    """x as a finite float, or the label to print instead: n/a, NaN, or the given infinities."""
    v = _num(x)
    if v is None:
        return "n/a"
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return inf if v > 0 else neg_inf
    return v


def fmt_ppl_log10(x: Any, digits: int = 2) -> str:
    """'10^6.25 (1.76e6)' from a log10 perplexity; small ones as '10^1.26 (18.20)'."""
    v = _finite_or_label(x, "10^inf (inf)", "10^-inf (0)")
    if isinstance(v, str):
        return v
    e = math.floor(v)
    m = 10.0 ** (v - e)  # in [1, 10)
    ms = f"{m:.{digits}f}"
    if float(ms) >= 10.0:  # rounding carried over, e.g. 9.999 -> 10.00
        e += 1
        ms = f"{1.0:.{digits}f}"
    if 0 <= e < 4:
        plain = f"{10.0 ** v:.{digits}f}"
    else:
        plain = f"{ms}e{e}"
    return f"10^{v:.{digits}f} ({plain})"


def _fmt(x: Any, spec: str = ".3g") -> str:
    v = _finite_or_label(x, "inf", "-inf")
    return v if isinstance(v, str) else format(v, spec)


def fmt_seconds(s: Any) -> str:
    """'12.34 s', '3 min 20 s' or '2 h 5 min' from seconds."""
    v = _num(s)
    if v is None or not math.isfinite(v):
        return _fmt(v)
    if v < 60:
        return f"{v:.2f} s"
    if v < 3600:
        return f"{int(v // 60)} min {v % 60:.0f} s"
    return f"{int(v // 3600)} h {int(v % 3600 // 60)} min"


def _md_cell(s: Any) -> str:
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _snippet(text: Any, width: int = 60) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= width else t[: width - 1] + "…"


def neuron_path(nr: Mapping[str, Any]) -> str:
    """A result record's neuron as sites.neuron_name writes it, 'model.layers.11.mlp.down_proj[507]'
    (from its site and layer, else its layer_name; no channel: the whole site)."""
    site, layer = (nr["site"], int(nr["layer"])) if "site" in nr and "layer" in nr else \
        parse_module_path(str(nr["layer_name"]))
    return neuron_name(site, layer, None if nr.get("channel") is None else int(nr["channel"]))


def _log10s(result: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(base, masked) log10 perplexities from mean NLLs in nats; masked from delta if no loss."""
    bl = _num(result.get("base_loss"))
    base = bl / LN10 if bl is not None else None
    crit = result.get("critical") or {}
    ml = _num(crit.get("loss"))
    if ml is not None:
        masked = ml / LN10
    else:
        d = _num(crit.get("delta"))
        masked = base + d if (base is not None and d is not None) else None
    return base, masked


def md_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> list[str]:
    """A Markdown table's lines; align holds one letter per column, "r" for right-aligned."""
    align = align or "l" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
           "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return out


def summary_markdown(result: Mapping[str, Any]) -> str:
    """Markdown report: base/masked perplexity, critical neurons, baselines, scan, map, eval,
    generations, timings."""
    crit = result.get("critical") or {}
    eps = _num(result.get("epsilon"))
    base, masked = _log10s(result)
    n = crit.get("n")
    neurons = list(crit.get("neurons") or [])
    L: list[str] = []
    L.append(f"# Critical neurons: {result.get('model', '?')}")
    L.append("")
    L.append(f"- Test text: {result.get('text_tokens', '?')} tokens")
    L.append(f"- Base loss: {_fmt(result.get('base_loss'), '.4f')} nats/token; "
             f"base perplexity **{fmt_ppl_log10(base)}**")
    if n is not None:
        L.append(f"- Critical set: **{n} neuron{'s' if n != 1 else ''}** reach "
                 f"Δ = {_fmt(crit.get('delta'), '.3f')} ≥ ε = {_fmt(eps, 'g')}")
    else:
        L.append(f"- Critical set: **none found** (no prefix reached ε = {_fmt(eps, 'g')}; "
                 f"last Δ = {_fmt(crit.get('delta'), '.3f')} with {len(neurons)} neurons)")
    L.append(f"- Masked perplexity: **{fmt_ppl_log10(masked)}** "
             f"(loss {_fmt(crit.get('loss'), '.4f')} nats/token)")
    L.append("")
    L.append("Δ = log10(PPL_masked / PPL_base); perplexities are written as 10^x (PPL = 10^x).")
    L.append("")

    L.append("## Critical neurons")
    L.append("")
    if neurons:
        rows = [[i, f"`{neuron_path(nr)}`", nr.get("site", "?"), nr.get("layer", "?"),
                 _fmt(nr.get("score"), ".4g")] for i, nr in enumerate(neurons, 1)]
        L += md_table(["#", "neuron", "site", "layer", "score"], rows, "rllrr")
    else:
        L.append("(none)")
    L.append("")

    bls = result.get("baselines") or {}
    if bls:
        L.append("## Baselines")
        L.append("")
        rows = []
        for name, b in bls.items():
            d = _num((b or {}).get("delta_at_n_max"))
            ppl = fmt_ppl_log10(base + d) if (base is not None and d is not None) else "n/a"
            rows.append([name, (b or {}).get("n_max", "?"), _fmt(d, ".3f"), ppl])
        L += md_table(["baseline", "neurons masked", "Δ", "perplexity"], rows, "lrrl")
        L.append("")

    scan = result.get("scan") or {}
    if scan:
        L.append("## Single-neuron scan")
        L.append("")
        L.append(f"{scan.get('rows', '?')} neurons scanned one at a time.")
        top = list(scan.get("top") or [])
        if top:
            L.append("")
            rows = [[i, f"`{neuron_path(t)}`", _fmt(t.get("delta"), ".4g")] for i, t in enumerate(top, 1)]
            L += md_table(["#", "neuron", "Δ"], rows, "rlr")
        L.append("")

    mp = result.get("map") or {}
    if mp:
        L += _map_markdown(mp)

    ev = result.get("evaluation") or []
    if ev:
        L.append("## Evaluation")
        L.append("")
        rows = []
        for e in ev:
            b, m = _num(e.get("base_ppl_log10")), _num(e.get("masked_ppl_log10"))
            d = _fmt(m - b, ".3f") if (b is not None and m is not None) else "n/a"
            rows.append([_snippet(e.get("text", "")), e.get("tokens", "?"), fmt_ppl_log10(b),
                         fmt_ppl_log10(m), d])
        L += md_table(["text", "tokens", "base PPL", "masked PPL", "Δ"], rows, "lrllr")
        L.append("")

    gen = result.get("generations") or {}
    if gen.get("prompts"):
        L += _generations_markdown(gen)

    tm = result.get("timings") or {}
    if tm:
        L.append("## Timings")
        L.append("")
        rows = [[k, fmt_seconds(v)] for k, v in tm.items()]
        tot = sum(v for v in (_num(x) for x in tm.values()) if v is not None and math.isfinite(v))
        rows.append(["**total**", fmt_seconds(tot)])
        L += md_table(["stage", "time"], rows, "lr")
        L.append("")
    return "\n".join(L).rstrip() + "\n"


def _map_markdown(mp: Mapping[str, Any]) -> list[str]:
    """The whole-model map: the exact top-k (screen values beside it, marked as estimates) and
    what the audit sample says the stopping rule may have missed."""
    aud = mp.get("audit") or {}
    screens = list(aud.get("screens") or {})
    L = ["## Whole-model map", "",
         f"{mp.get('neurons', '?')} neurons screened ({', '.join(screens)}); {mp.get('verified', '?')} verified "
         f"exactly in {mp.get('rounds', '?')} rounds of {mp.get('block', '?')} per screen, stopped by "
         f"{mp.get('stopped', '?')} ({mp.get('rule', '')}); {mp.get('audited', '?')} more verified as a random audit.",
         ""]
    top = list(mp.get("top") or [])
    if top:
        rows = [[i, f"`{neuron_path(t)}`", _fmt(t.get("delta"), ".4g"),
                 *(_fmt(t.get(s), ".3g") for s in screens), t.get("verified", "?")] for i, t in enumerate(top, 1)]
        L += md_table(["#", "neuron", "Δ (exact)", *(f"{s} (screen)" for s in screens), "verified by"], rows,
                      "rlr" + "r" * len(screens) + "l")
        L.append("")
    if aud.get("sample"):
        L.append(f"Audit: {aud['sample']} random unverified neurons; {aud.get('missed', '?')} beat the "
                 f"k-th verified Δ ({_fmt(aud.get('kth_delta'), '.4g')}), about {_fmt(aud.get('missed_estimate'), '.3g')} "
                 "over all unverified neurons.")
        L.append("")
    rows = [[s, _fmt(v.get("recall"), ".2f"), _fmt(v.get("spearman"), ".2f"),
             _fmt(v.get("abs_error_median"), ".3g"), _fmt(v.get("abs_error_max"), ".3g")]
            for s, v in (aud.get("screens") or {}).items()]
    if rows:
        L += md_table(["screen", "top-k recall", "Spearman (audit)", "median |err| (audit)", "max |err| (audit)"],
                      rows, "lrrrr")
        L.append("")
    return L


def _generations_markdown(gen: Mapping[str, Any]) -> list[str]:
    """Each prompt's continuation by the clean model and with the critical set zeroed."""
    smp = gen.get("sampling") or {}
    how = ("greedy" if not _num(smp.get("temperature")) else
           f"sampled at temperature {_fmt(smp.get('temperature'), 'g')}, top-k {smp.get('top_k', '?')}, "
           f"top-p {_fmt(smp.get('top_p'), 'g')}, seed {smp.get('seed', '?')}")
    L = ["## Generations", "",
         f"Up to {gen.get('max_new_tokens', '?')} new tokens per prompt ({how}), by the clean model and with the "
         f"{gen.get('neurons', '?')} critical neuron{'s' if gen.get('neurons') != 1 else ''} zeroed; "
         "log p: the continuation's log-probability under the model that wrote it.", ""]
    rows = [[_snippet(g.get("prompt", ""), 40), _snippet(g.get("base", ""), 80), _snippet(g.get("masked", ""), 80),
             "same" if g.get("diverge_at") is None else g.get("diverge_at"),
             f"{_fmt(g.get('base_logprob'), '.1f')} / {_fmt(g.get('masked_logprob'), '.1f')}"]
            for g in gen["prompts"]]
    L += md_table(["prompt", "clean", "masked", "differs from token", "log p clean / masked"], rows, "lllrr")
    L.append("")
    return L


def _align(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    out = []
    for r in rows:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
    return out


def terminal_table(result: Mapping[str, Any], max_lines: int = 20, width: int = 100) -> str:
    """A short plain-text summary (at most `max_lines` lines) for the end of a CLI run."""
    crit = result.get("critical") or {}
    base, masked = _log10s(result)
    n = crit.get("n")
    neurons = list(crit.get("neurons") or [])

    head = [["model", str(result.get("model", "?"))],
            ["text tokens", str(result.get("text_tokens", "?"))],
            ["base PPL", fmt_ppl_log10(base)],
            ["masked PPL", f"{fmt_ppl_log10(masked)}   delta {_fmt(crit.get('delta'), '.3f')}"
                           f" (eps {_fmt(result.get('epsilon'), 'g')})"],
            ["critical n", str(n) if n is not None else f"none (after {len(neurons)})"]]
    tail: list[list[str]] = []
    bls = result.get("baselines") or {}
    if bls:
        tail.append(["baselines", "; ".join(
            f"{k}: n={b.get('n_max', '?')} delta {_fmt(b.get('delta_at_n_max'), '.2f')}"
            for k, b in ((k, b or {}) for k, b in bls.items()))])
    scan = result.get("scan") or {}
    if scan:
        top = list(scan.get("top") or [])[:3]
        tail.append(["scan", f"{scan.get('rows', '?')} rows; top " + ", ".join(
            f"{neuron_path(t)} {_fmt(t.get('delta'), '.2f')}"
            for t in top)])
    ev = result.get("evaluation") or []
    if ev:
        ds = [m - b for b, m in ((_num(e.get("base_ppl_log10")), _num(e.get("masked_ppl_log10")))
                                 for e in ev) if b is not None and m is not None]
        fin = [d for d in ds if math.isfinite(d)]
        tail.append(["evaluation", f"{len(ev)} texts, mean delta "
                     f"{_fmt(sum(fin) / len(fin), '.2f') if fin else 'n/a'}"])
    tm = result.get("timings") or {}
    if tm:
        vals = {k: _num(v) for k, v in tm.items()}
        tot = sum(v for v in vals.values() if v is not None and math.isfinite(v))
        tail.append(["time", f"{fmt_seconds(tot)} (" + ", ".join(
            f"{k} {_fmt(v, '.1f')}s" for k, v in vals.items()) + ")"])

    lines = _align(head + tail)
    head_lines, tail_lines = lines[: len(head)], lines[len(head):]
    room = max_lines - len(head_lines) - len(tail_lines)
    nl: list[str] = []
    if neurons and room >= 2:
        shown = neurons if len(neurons) <= room - 1 else neurons[: max(room - 2, 0)]
        rows = [["#", "neuron (module[channel])", "score"]]
        rows += [[str(i), neuron_path(nr), _fmt(nr.get("score"), ".3g")]
                 for i, nr in enumerate(shown, 1)]
        nl = ["  " + s for s in _align(rows, right={0, 2})]
        if len(shown) < len(neurons):
            nl.append(f"  ... and {len(neurons) - len(shown)} more")
    out = head_lines + nl + tail_lines
    out = [s if len(s) <= width else s[: width - 3] + "..." for s in out]
    return "\n".join(out[:max_lines])
