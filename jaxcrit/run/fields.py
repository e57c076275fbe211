"""Every config field, declared once: its section, name, default, the values it takes and what it turns.

jaxcrit/configs/common.py builds the ConfigDict every config starts from out of SECTIONS
(`defaults`), jaxcrit/run/validate.py checks each field against its rule, the runner leaves the
fields that change no result out of a run's identity (IGNORED_FOR_IDENTITY), and `help_text`
lists them all. A field's rule (jaxcrit/run/rules.py) is its type and allowed values at once.
Allowed names that another module owns (dtypes, baselines, screens, sites, params layouts, kernels,
study texts, evaluation sets) are that module's own table.
"""
from __future__ import annotations

import difflib
import textwrap
from typing import Any, Iterable, NamedTuple

from ml_collections import ConfigDict

from jaxcrit.convert.load import AUTO_DTYPE, DTYPES
from jaxcrit.critical.baselines import BASELINES
from jaxcrit.critical.screens import SCREENS
from jaxcrit.data.texts import BOOKENDS, STUDY_TEXTS
from jaxcrit.dist import compile_cache
from jaxcrit.dist.sharding import LAYOUTS
from jaxcrit.kernels.selection import CHOICES
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.run.rules import Choice, Each, Flag, Int, Names, Num, Pred, Rule, distinct, is_int


class Field(NamedTuple):
    name: str
    default: Any
    rule: Rule
    doc: str            # what it turns
    result: bool = True  # False: changes no result, so a workdir of another value is the same run


class Section(NamedTuple):
    name: str           # "" for the top level
    doc: str
    fields: tuple[Field, ...]


def _set_names(v: Any) -> bool:
    from jaxcrit.run.stages.evaluation import valid_set_name   # the stages import the runner, which reads this module
    return distinct(v) and all(isinstance(x, str) and valid_set_name(x) for x in v)


def _mesh_shape(v: Any) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2 and all(is_int(x) and x >= -1 and x != 0 for x in v)
            and list(v).count(-1) <= 1)


def _coordinator(v: Any) -> bool:
    return v == "" or (isinstance(v, str) and v.rpartition(":")[2].isdigit())


def _prompts(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and len(v) > 0 and all(isinstance(x, str) and x for x in v)


ANY_STR = Pred(lambda v: isinstance(v, str), "a string")
WHEN = ("auto", "always", "never")
KERNEL = "; auto: the fused one where it applies (jaxcrit/kernels/selection.py says what each is and needs)"

SECTIONS: tuple[Section, ...] = (
    Section("", "the run", (
        Field("model", "smollm2", Pred(lambda v: isinstance(v, str) and bool(v),
                                       "an embedded name, a checkpoint dir, a file or a Hub id"),
              "embedded name (smollm2), HF checkpoint dir, .gguf file, converted dir, or Hugging Face Hub id "
              "ORG/NAME[@REVISION] (an existing local path wins)"),
        Field("dtype", AUTO_DTYPE, Choice((AUTO_DTYPE, *DTYPES)),
              "params and activations (norms, softmax and loss run in float32); auto: the source's own "
              "(jaxcrit/convert/checkpoints.py KINDS: float32 for GGUF files and the embedded model, bfloat16 "
              "for HF checkpoint dirs, a converted dir's saved dtype)"),
        Field("text", BOOKENDS, ANY_STR, "the text Stage 1 perturbs and Stage 2 scores (at least 10 tokens)"),
        Field("max_tokens", 512, Int(10), "texts are cut to this many tokens"),
        Field("seed", 42, Int(0), "noise and random-baseline seed"),
        Field("overwrite", False, Flag(), "reuse a workdir that holds results of a different config", result=False),
        Field("progress", True, Flag(), "progress bars on stderr", result=False),
        Field("dry_run", False, Flag(), "print the memory plan (compiled from shapes, no weight read) and stop"),
        Field("plan", "auto", Choice(WHEN),
              "memory plan before loading, refusing a run that would not fit (auto: on GPU and TPU)"),
        Field("compile_cache", compile_cache.AUTO, ANY_STR,
              "JAX's persistent compilation cache: a directory, '' (off) or auto ($JAX_COMPILATION_CACHE_DIR, "
              "else $XDG_CACHE_HOME/jaxcrit/jax, else ~/.cache/jaxcrit/jax)", result=False),
    )),
    Section("stage1", "Stage 1: neurons ranked by how far their activation moves under noise on the input embeddings", (
        Field("alpha", 5.0, Num("> 0"), "noise scale on the input embeddings"),
        Field("samples", 100, Int(1), "K, the noisy passes"),
        Field("batch", 10, Int(1), "noisy passes per compiled batch (one forward of batch + 1 sequences; "
                                   "a divisor of samples wastes none)"),
        Field("top_n", 10000, Int(1), "ranked entries kept"),
        Field("threshold", 1e-6, Num(), "scores <= this are dropped"),
        Field("ranking", "channel", Choice(("channel", "position")),
              "channel: (site, layer, channel), max over positions; position: the reference's list"),
    )),
    Section("stage2", "Stage 2: growing prefixes of the ranking zeroed until the model collapses", (
        Field("epsilon", 1.0, Num("> 0"), "collapse threshold on delta = log10(PPL_masked / PPL_base)"),
        Field("max_steps", 1000, Int(1), "largest prefix n tried"),
        Field("full_curve", False, Flag(), "evaluate every n up to max_steps instead of stopping at epsilon"),
    )),
    Section("baselines", "other rankings, grown like Stage 2", (
        Field("names", ("random", "activation", "gradient", "massive"), Names(BASELINES),
              "baselines grown like Stage 2 (empty: none)"),
        Field("random_repeats", 10, Int(1), "seeded repeats of the random baseline"),
        Field("ns", (1, 3, 10, 30, 100, 300, 1000), Each(Int(1), "integers", nonempty=True),
              "set sizes the baselines are scored at"),
    )),
    Section("scan", "single neurons zeroed one at a time, and a greedy search over the best", (
        Field("sites", ("down_proj",), Names(SITE_NAMES, "sites"), "sites scanned neuron by neuron (empty: no scan)"),
        Field("layers", (), Each(Int(0), "layer indices"), "layers scanned; empty: the layers of the critical set"),
        Field("max_layers", 0, Int(0), "with layers empty, scan at most this many of them (0: all)"),
        Field("channels", (), Each(Int(0), "channel indices"),
              "channels scanned at each site and layer; empty: every channel"),
        Field("top", 0, Int(0), "> 0: only the `top` channels of each site and layer that Stage 1 ranks highest"),
        Field("greedy_steps", 8, Int(0), "greedy search on measured deltas: at most this many steps (0: off)"),
        Field("greedy_pool", 32, Int(1), "candidates of the greedy search: the scan's top single neurons"),
    )),
    Section("map", "the whole-model map: every neuron screened, the screens' best verified exactly", (
        Field("enabled", True, Flag(), "the whole-model map stage"),
        Field("screens", ("first_order", "magnitude", "importance"), Names(SCREENS, "screens", nonempty=True),
              "screens whose rankings give the candidates"),
        Field("top_k", 10, Int(1), "the exact top-k the stopping rule watches (and summary.md lists)"),
        Field("block", 0, Int(0), "candidates taken from each screen per round (one resumable unit); "
                                  "0: max(top_k, engine.chunk / screens)"),
        Field("max_rounds", 50, Int(0), "stop after this many rounds even if the rule has not (0: no limit)"),
        Field("audit", 128, Int(0), "seeded random unverified neurons verified to measure misses and screen error"),
    )),
    Section("evaluate", "perplexity on texts before and after masking", (
        Field("file", "", Pred(lambda v: isinstance(v, str), "a path, hf-dataset:ORG/NAME/path[@REVISION] or ''"),
              "text file evaluated before/after masking (rows > 50 chars): a path, or a Hub dataset's file "
              "hf-dataset:ORG/NAME/path/in/repo[@REVISION]; empty: the text only"),
        Field("limit", 0, Int(0), "evaluate only the first N rows of the file (0: all)"),
        Field("batch", 8, Int(1), "texts per resumable evaluation block"),
        Field("sets", (), Pred(_set_names, "distinct names among greedy, learned, prefix@E (E a number)"),
              "neuron sets scored next to the critical set: greedy, learned, prefix@E (the ranking's first "
              "prefix reaching delta E)"),
    )),
    Section("generate", "what the model says with the critical set masked (jaxcrit/evaluate/generation.py)", (
        Field("enabled", True, Flag(), "the generations stage: prompts continued by the clean and the masked model"),
        Field("prompts", ("The capital of France is", "Water boils at a temperature of",
                          "Once upon a time, there was a"),
              Pred(_prompts, "a non-empty tuple of non-empty strings"), "the prompts (one batch)"),
        Field("max_new_tokens", 24, Int(1),
              "tokens generated per prompt (fewer when the model's EOS token comes first)"),
        Field("temperature", 0.0, Num(">= 0"), "0: greedy; > 0: sampled (seeded by `seed`) at this temperature"),
        Field("top_k", 0, Int(0), "sampling: keep the k most likely tokens (0: all)"),
        Field("top_p", 1.0, Num("(0, 1]"), "sampling: keep the smallest set of tokens with this much probability "
                                           "(1: all)"),
    )),
    Section("engine", "how ablations run: chunks, compiled programs, kernels", (
        Field("chunk", 64, Int(0), "ablations per compiled call; 0: the largest that fits free device memory"),
        Field("vocab_chunk", 16384, Int(1), "vocabulary columns per loss step"),
        Field("prefix_sharing", True, Flag(), "run layers below a chunk's first perturbed layer once, clean"),
        Field("sites", (), Names(SITE_NAMES, "sites"),
              "sites every compiled program holds masks for (all nine: one program for every stage)"),
        Field("attention", "auto", Choice(("auto", *CHOICES["attention"])), f"attention's implementation{KERNEL}"),
        Field("mlp", "auto", Choice(("auto", *CHOICES["mlp"])), f"the MLP's implementation{KERNEL}"),
        Field("norms", "auto", Choice(("auto", *CHOICES["norms"])),
              f"RMSNorms as their own step (plain) or folded into the GEMMs after them{KERNEL}"),
        Field("loss", "auto", Choice(("auto", *CHOICES["loss"])), f"the loss's implementation{KERNEL}"),
        Field("ahead", "auto", Choice(WHEN), "build the engine and compile Stage 2 in a thread while Stage 1 runs "
                                             "(auto: GPU/TPU, one process, chunk given)", result=False),
    )),
    Section("study", "the study (jaxcrit/run/stages/study.py; configs/study.py turns it on)", (
        Field("other_ranking", False, Flag(),
              "rank Stage 1's scores the other way too (channel <-> position) and grow that curve"),
        Field("seeds", (), Each(Int(0), "seeds"),
              "Stage 1 + Stage 2 again with each seed (stability; the main seed is the main run)"),
        Field("alphas", (), Each(Num("> 0"), "numbers"), "... with each stage1.alpha"),
        Field("samples", (), Each(Int(1), "integers"), "... with each stage1.samples (K)"),
        Field("texts", (), Names(STUDY_TEXTS), "... on each text of jaxcrit.data.texts.STUDY_TEXTS (by name)"),
        Field("dtypes", (), Names(DTYPES), "the ranking's prefixes and the critical set scored in each dtype"),
        Field("massive", 0, Int(0),
              "list the N largest |down_proj output| channels and where the critical set ranks (0: off)"),
    )),
    Section("tasks", "lm-eval scores, clean and with each set of the evaluation masked, on tasks built from "
                     "evaluate.file (jaxcrit/evaluate/tasks.py; needs jaxcrit[eval])", (
        Field("enabled", False, Flag(), "the tasks stage"),
        Field("limit", 100, Int(1), "items per task (fewer where the corpus gives fewer)"),
        Field("batch", 16, Int(1), "sequences per compiled call of the lm-eval model"),
    )),
    Section("learned", "a mask learned by gradient descent on gates over Stage 1's best neurons", (
        Field("candidates", 0, Int(0), "gate the first N distinct neurons of Stage 1's ranking (0: no learned mask)"),
        Field("steps", 200, Int(1), "Adam steps on the gates"),
        Field("lr", 0.1, Num("> 0"), "Adam's learning rate (on the gates' logits)"),
        Field("sparsity", 0.01, Num(">= 0"), "penalty per unit of gate (a gate is the share of a channel removed)"),
        Field("margin", 1.0, Num(">= 0"), "the gates push delta to stage2.epsilon + margin"),
        Field("init", 0.95, Num("(0, 1)"), "every gate's starting value"),
        Field("temperature", 0.0, Num(">= 0"),
              "> 0: binary-concrete gates sampled at this temperature; 0: deterministic sigmoid gates"),
    )),
    Section("mesh", "devices and processes", (
        Field("shape", (-1, 1), Pred(_mesh_shape, "(data, model), positive integers, one of them may be -1"),
              "(data, model) device mesh; -1 takes the remaining devices"),
        Field("params", "replicated", Choice(LAYOUTS),
              "params over 'data': replicated (a whole copy per data row), fsdp (split over 'data' too)"),
        Field("device_memory_gib", 0.0, Num(">= 0"), "memory of one device for the plan, GiB; 0: what the device "
                                                     "reports (CPU: free host memory)"),
        Field("distributed", False, Flag(),
              "several processes: jax.distributed.initialize() from the cluster (SLURM, TPU, k8s)"),
        Field("coordinator", "", Pred(_coordinator, "'' or HOST:PORT"),
              "several processes, explicitly: HOST:PORT of process 0 ('': not this way)"),
        Field("num_processes", 1, Int(1), "with coordinator: how many processes"),
        Field("process_id", 0, Int(0), "with coordinator: this process's index (0 writes the files)"),
        Field("peer_timeout", 60, Int(1),
              "several processes: seconds without a sign of life from another before the run ends"),
    )),
)


def _key(section: Section, f: Field) -> str:
    return f"{section.name}.{f.name}" if section.name else f.name


FIELDS: dict[str, Field] = {_key(s, f): f for s in SECTIONS for f in s.fields}   # dotted key -> field
IGNORED_FOR_IDENTITY: tuple[str, ...] = tuple(k for k, f in FIELDS.items() if not f.result)


def defaults() -> ConfigDict:
    """The ConfigDict of every field at its default, a ConfigDict per section."""
    c = ConfigDict()
    for s in SECTIONS:
        into = c
        if s.name:
            c[s.name] = ConfigDict()
            into = c[s.name]
        for f in s.fields:
            into[f.name] = f.default
    return c


def flat(c: ConfigDict) -> dict[str, Any]:
    """A config's fields by dotted key."""
    def walk(d: dict, prefix: str) -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    return walk(c.to_dict(), "")


def did_you_mean(name: str, choices: Iterable[str] | None = None) -> str:
    """' (did you mean 'x'?)' for the choice closest to a misspelt name, or '' when none is close
    (difflib's ratio >= 0.75, ml_collections' own measure). Without choices, name is a dotted
    config key and each unknown part is replaced by the closest name at its level (a section, or
    a field of the section before it)."""
    def closest(part: str, names: Iterable[str]) -> str | None:
        found = difflib.get_close_matches(part, list(names), 1, 0.75)
        return found[0] if found else None

    if choices is not None:
        hint = closest(name, choices)
    else:
        levels = {"": {s.name for s in SECTIONS if s.name} | {f.name for s in SECTIONS if not s.name for f in s.fields},
                  **{s.name: {f.name for f in s.fields} for s in SECTIONS if s.name}}
        parts: list[str] = []
        for part in name.split("."):
            names = levels.get(".".join(parts), set())
            part = part if part in names else closest(part, names)
            if part is None:
                break
            parts.append(part)
        hint = ".".join(parts) if ".".join(parts) in FIELDS else None
    return f" (did you mean '{hint}'?)" if hint else ""


def unknown_field(key: str) -> str:
    """The error line for a config field that is not declared, naming the closest declared one."""
    return f"unknown config field '{key}'{did_you_mean(key)}; `python -m jaxcrit.main --help` lists the fields"


def _shown(v: Any, width: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= width else r[:width - 3] + "..."


def config_text(c: ConfigDict) -> str:
    """Every field of a config as `key = value` lines, section by section (what --print_config prints;
    each line is also a valid --config.<key>=<value> override in Python syntax)."""
    given = flat(c)
    return "\n\n".join("\n".join(f"{_key(s, f)} = {given[_key(s, f)]!r}" for f in s.fields) for s in SECTIONS)


def help_text(width: int = 100) -> str:
    """Every field with its default, what it takes and what it turns, section by section
    (what `--help` prints)."""
    def wrap(text: str, indent: int) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=" " * indent, subsequent_indent=" " * (indent + 4),
                             break_on_hyphens=False)

    out = ["Config fields (--config.<field>=<value> sets one), by section:", ""]
    for s in SECTIONS:
        out += wrap(f"{s.name or 'top level'}: {s.doc}", 0)
        for f in s.fields:
            out += [f"  {_key(s, f)} = {_shown(f.default)}", *wrap(f.doc, 6), *wrap(f"must be {f.rule.what()}", 6)]
            out += [] if f.result else wrap("changes no result (a workdir run with another value resumes)", 6)
        out.append("")
    return "\n".join(out)
