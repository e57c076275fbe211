"""The pipeline as data: each stage's name, result files, and how it computes, saves and loads.

    importance  Stage 1 ranking                    importance.json, heatmap.png       ranking.py
    growth      Stage 2 prefixes of the ranking    curve.csv                          ranking.py
    critical    the first prefix reaching epsilon  critical.json                      ranking.py
    baselines   random/activation/gradient/massive baselines.json                     baselines.py
    scan        single-neuron deltas               scan.csv, scan.png                 scan.py
    greedy      greedy growth on measured deltas   greedy.json                        scan.py
    map         every neuron screened, top verified map.csv, map.json, map.png        whole_map.py
    evaluation  perplexity before/after masking    evaluation.json                    evaluation.py
    generations prompts continued, clean vs masked  generations.json                  evaluation.py
    tasks       lm-eval scores, clean vs masked    tasks.json (and the tasks it built: tasks/)
    modes, stability, dtypes, learned, relations: the study's stages                  study.py
    report      the summary of all of the above    curve.png, summary.md              report.py

A stage reads earlier stages' values as run[name]; the functions named *_of take their input
explicitly, so the Python API (jaxcrit/api.py) runs the same code on inputs a user gives. The
runner (jaxcrit/run/runner.py) is handed this table by its callers.
"""
from __future__ import annotations

from typing import Any, Callable

from jaxcrit.critical import baselines as B
from jaxcrit.critical import screens as SC
from jaxcrit.critical import stage1
from jaxcrit.report import io
from jaxcrit.run.runner import Run, Stage
from jaxcrit.run.stages import baselines, evaluation, ranking, report, scan, study, whole_map


def _json_stage(name: str, compute: Callable[[Run], Any], **kw: Any) -> Stage:
    """A stage whose value is its one result file, <name>.json."""
    path = f"{name}.json"
    return Stage(name, (path,), compute, lambda run, v: io.write_json(run.workdir / path, v), _load_json(path), **kw)


def _load_json(path: str) -> Callable[[Run], Any]:
    return lambda run: io.read_json(run.workdir / path)


STAGES: dict[str, Stage] = {st.name: st for st in (
    Stage("importance", ("importance.json", "heatmap.png"), ranking.importance, ranking.save_importance,
          ranking.load_importance, programs=stage1.PROGRAMS),
    Stage("growth", ("curve.csv",), lambda run: ranking.growth_of(run, run["importance"]), ranking.save_growth,
          ranking.load_growth),
    Stage("critical", ("critical.json",), ranking.critical, ranking.save_critical, ranking.load_critical),
    Stage("baselines", ("baselines.json",), baselines.baselines, baselines.save_baselines, baselines.load_baselines,
          enabled=lambda c: bool(c.baselines.names), programs=B.PROGRAMS),
    Stage("scan", ("scan.csv", "scan.png"), lambda run: scan.scan_of(run, scan.scan_targets(run)), scan.save_scan,
          scan.load_scan, enabled=lambda c: bool(c.scan.sites)),
    _json_stage("greedy", scan.greedy, enabled=lambda c: bool(c.scan.sites) and c.scan.greedy_steps > 0),
    Stage("map", ("map.csv", "map.json", "map.png"), whole_map.map_of, whole_map.save_map, whole_map.load_map,
          enabled=lambda c: c.map.enabled, programs=SC.PROGRAMS),
    _json_stage("evaluation", evaluation.evaluation),
    _json_stage("generations", evaluation.generations, enabled=lambda c: c.generate.enabled),
    _json_stage("tasks", evaluation.task_scores, enabled=lambda c: c.tasks.enabled),
    Stage("modes", ("modes.json", "modes.png"), study.modes, study.save_modes, _load_json("modes.json"),
          enabled=lambda c: c.study.other_ranking),
    Stage("stability", ("stability.json",), study.stability, study.save_stability,
          _load_json("stability.json"), enabled=lambda c: any(c.study[f] for f in study.VARIANTS)),
    Stage("dtypes", ("dtypes.json", "dtypes.png"), study.dtypes, study.save_dtypes, _load_json("dtypes.json"),
          enabled=lambda c: bool(c.study.dtypes)),
    _json_stage("learned", study.learned, enabled=lambda c: c.learned.candidates > 0),
    _json_stage("relations", study.relations, enabled=lambda c: c.study.massive > 0),
    Stage("report", ("curve.png", "summary.md"), report.report, report.save_report, report.report, cached=False),
)}
