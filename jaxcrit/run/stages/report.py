"""The report: the summary of every stage that ran, as summary.md, curve.png and the terminal table."""
from __future__ import annotations

import numpy as np

from jaxcrit.critical import scan as S
from jaxcrit.report import io, plots, summary
from jaxcrit.run.runner import Run


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
        result["curve"], result["epsilon"], result["baseline_curves"],
        run.title(plots.curve_title(result["curve"], result["epsilon"])),
        result["critical"]["n"]), close=True)
    io.write_text(run.workdir / "summary.md", summary.summary_markdown(result))
