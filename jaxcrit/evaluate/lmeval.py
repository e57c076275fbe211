"""jaxcrit as an lm-evaluation-harness model: downstream task scores with a neuron set masked.

    pip install 'jaxcrit[eval]'
    python -m jaxcrit.evaluate.lmeval run --model jaxcrit --tasks arc_easy --limit 100 \\
        --model_args model=smollm2,neurons=runs/smollm2/critical.json

`python -m jaxcrit.evaluate.lmeval` is lm-eval's own command line with the model "jaxcrit" registered;
in Python, `import jaxcrit.evaluate.lmeval` registers it for `lm_eval.simple_evaluate(model="jaxcrit",
model_args={...}, tasks=[...])`. Only this module imports lm_eval; nothing on jaxcrit's main
path does. jaxcrit never imports torch (simple_evaluate seeds torch where it is installed).

Model args (`--model_args k=v,k=v`, or a dict from Python):
  model         an embedded name (smollm2), a HF checkpoint dir, a .gguf file or a converted dir;
                from Python also a loaded jaxcrit.Model
  dtype         auto (default: the source's own, as jaxcrit.load) | float32 | bfloat16 | float16
  neurons       the neurons zeroed: a JSON file with a "neurons" list (critical.json,
                importance.json, ...), or HF module paths with channels joined by '+'
                (model.layers.11.mlp.down_proj[507]+model.layers.3.mlp.down_proj[2]); from Python
                also a NeuronSet, DataFrame or (site, layer, channel) tuples. Default: none
  batch_size    sequences per compiled call (default 8)
  max_length    context length in tokens (default: max_position_embeddings, at most 2048)
  max_gen_toks  generation length when a task gives none (default 256)
  seed          the sampling seed of generation tasks that sample (default 0)

Requests: loglikelihood and loglikelihood_rolling are scored by generation.token_logprobs (the
decoder's forward with the engine's masks, the loss in vocabulary chunks; rolling windows cut as
lm-eval's HF model cuts them); generate_until runs generation.generate_ids (KV cache, the same
masks), stopping at the model's EOS tokens or once an `until` string appears, then cut at it.

`scores` is what the study's tasks stage calls: simple_evaluate on task YAMLs in a folder
(jaxcrit/evaluate/tasks.py writes them), each metric with its standard error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from jaxcrit.convert.load import AUTO_DTYPE
from jaxcrit.evaluate import generation as G
from jaxcrit.errors import JaxcritError, exit_code
from jaxcrit.models.neurons import NeuronSet

SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p")


def neurons_arg(x: Any) -> NeuronSet | None:
    """The neuron set of the `neurons` model arg (see the module docstring); None for none."""
    if x is None or (isinstance(x, str) and not x.strip()):
        return None
    if not isinstance(x, str):
        return NeuronSet.of(x)
    p = Path(x)
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise JaxcritError(f"neurons: {p}: no such file")
        d = json.loads(p.read_text())
        if not isinstance(d, dict) or "neurons" not in d:
            raise JaxcritError(f"neurons: {p} holds no \"neurons\" list (critical.json and importance.json do)")
        return NeuronSet.from_records(d["neurons"])
    return NeuronSet.of(x.split("+"))


@register_model("jaxcrit")
class JaxcritLM(TemplateLM):
    """A jaxcrit model with a neuron set zeroed, as lm-eval sees a model."""

    def __init__(self, model: Any = "smollm2", dtype: str = AUTO_DTYPE, neurons: Any = None, batch_size: Any = 8,
                 max_length: Any = None, max_gen_toks: Any = 256, seed: Any = 0, device: Any = None,
                 max_batch_size: Any = None):
        """device and max_batch_size are what lm-eval passes every model; jaxcrit places the model
        on its own device mesh and takes batch_size as given."""
        super().__init__()
        from jaxcrit.convert.load import Model, load
        self.m = model if isinstance(model, Model) else load(str(model), str(dtype))
        self.neurons = neurons_arg(neurons)
        self.ablation = G.ablation(self.m.cfg, self.neurons)    # checks every index against the model
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise JaxcritError(f"batch_size must be an integer >= 1 (got {batch_size!r})")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length) if max_length else min(self.m.cfg.max_position_embeddings, 2048)
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        if not self.m.eos:
            raise JaxcritError(f"{self.m.source} names no EOS token (config.json / generation_config.json "
                               "eos_token_id, or the GGUF's tokenizer.ggml.eos_token_id)")

    # ------------------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.m.eos[0]

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS when the model has one (as lm-eval's HF model)."""
        return self.eot_token_id if self.m.bos is None else self.m.bos

    @property
    def tokenizer_name(self) -> str:
        return str(self.m.source)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids; special tokens as transformers adds them unless the string starts with BOS."""
        if add_special_tokens is None:
            add_special_tokens = self.m.bos is None or not string.startswith(self.tok_decode([self.m.bos], False))
        ids = self.m.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.m.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) of each continuation given its context, the context cut
        from the left to max_length tokens of input (as lm-eval's HF model cuts it)."""
        seqs = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        scores = G.token_logprobs(self.m.cfg, self.m.params, seqs, self.ablation, batch=self.batch_size)
        out = []
        for (key, _, cont), (lp, greedy) in zip(requests, scores):
            res = (float(lp[-len(cont):].sum()), bool(greedy[-len(cont):].all()))
            out.append(res)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p of each whole string, in disjoint windows of max_length tokens after the prefix token."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------- generation

    def _sampling(self, gen_kwargs: dict) -> tuple[G.Sampling, list[str], int]:
        """(Sampling, until strings, max new tokens) of a request's generation arguments."""
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kw.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_new = kw.pop("max_gen_toks")
        unknown = sorted(set(kw) - set(SAMPLING_KWARGS))
        if unknown:
            raise JaxcritError(f"generation arguments {unknown} are not supported; jaxcrit takes until, max_gen_toks "
                               f"and {', '.join(SAMPLING_KWARGS)}")
        t = kw.get("temperature")
        temperature = (1.0 if t is None else float(t)) if kw.get("do_sample") else 0.0
        return G.Sampling(temperature, int(kw.get("top_k") or 0), float(kw.get("top_p") or 1.0), self.seed), until, max_new

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, batched by equal generation arguments, longest first."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for idx in groups.values():
            gen_kwargs = requests[idx[0]].args[1]
            sampling, until, max_new = self._sampling(gen_kwargs)
            room = self.max_length - max_new
            if room < 1:
                raise JaxcritError(f"max_gen_toks {max_new} leaves no room for a context in max_length {self.max_length}")
            ctx = {i: self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in idx}
            order = sorted(idx, key=lambda i: -len(ctx[i]))
            stop = [u for u in until if u]
            for lo in range(0, len(order), self.batch_size):
                part = order[lo:lo + self.batch_size]
                conts = G.generate_ids(self.m.cfg, self.m.params, [ctx[i] for i in part], self.ablation,
                                       max_new_tokens=max_new, sampling=sampling, stop_ids=self.m.eos,
                                       finished=lambda r, toks: any(u in self.tok_decode(toks) for u in stop))
                for i, c in zip(part, conts):
                    out[i] = postprocess_generated_text(self.tok_decode(c.tokens), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def scores(lm: JaxcritLM, folder: Path, tasks: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """lm's scores on lm-eval tasks whose YAMLs are in folder (lm-eval's built-in tasks are not
    indexed): per task, per metric, {"value", "stderr"}. acc's stderr is the items' standard error
    of the mean (closed form: lm-eval bootstraps only other aggregations, none of which these use)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    got = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(folder),
                                                                           include_defaults=False),
                          log_samples=False, torch_random_seed=None)["results"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task in tasks:
        for key, value in got[task].items():          # "acc,none", "acc_stderr,none", ..., "alias"
            metric, _, kept = key.partition(",")
            if kept and not metric.endswith("_stderr"):
                out.setdefault(task, {})[metric] = {"value": float(value),
                                                    "stderr": float(got[task][f"{metric}_stderr,{kept}"])}
    return out


def main() -> int:
    """lm-eval's command line with the jaxcrit model registered; a bad model arg is one error line."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv[0] = "python -m jaxcrit.evaluate.lmeval"
    return exit_code(cli_evaluate)


if __name__ == "__main__":
    sys.exit(main())
