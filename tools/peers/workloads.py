"""The interventions benchmark's two workloads, their plain-torch reference and the harness that
times a peer tool on them (imported by nnsight_peer.py and transformer_lens_peer.py).

(a) Causal tracing of one 128-token prompt. clean = 128 ids from numpy default_rng(0) over
    [100, vocab); corrupt = clean with positions 0..3 moved to other ids of the same generator.
    target = argmax of the clean run's logits at the last position. Patch (l, p), for every layer
    l and position p in layer-major order: the corrupt prompt with the output of
    model.layers[l].mlp (down_proj's output) at position p replaced by the clean run's value
    there; metric = log_softmax(logits[-1])[target] in float32. Result [n_layers, 128].
(b) Ablation of the first min(4096, n_layers * d_model) down_proj output channels in layer-major
    order (layer = i // d_model, channel = i % d_model), one per batch row, zero at every
    position of the clean prompt; metric = mean next-token NLL over its 127 predictions, in
    float32 from the model's logits. Result [n_ablations].

A tool gives three functions over torch tensors on its device (a `Tool`); the harness batches the
edit sets in order, so a batch may span two layers and the last batch may be short.

Each peer script (PEER: nnsight_peer.py, transformer_lens_peer.py) runs the same way. On a GPU
(wheels installed by tools/peers/install.sh; a model dir written by tools/model_shape.py gets
random weights the first time):
    python tools/peers/PEER --model /tmp/q05 --out PEER.json --save /tmp/peers/PEER
On a CPU, its results against plain torch forward hooks in float32:
    python tools/model_shape.py tiny /tmp/tiny
    python tools/peers/PEER --model /tmp/tiny --device cpu --check
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import transformers

TOKENS = 128          # prompt length of both workloads
CORRUPTED = 4         # positions 0..CORRUPTED-1 differ between the clean and the corrupt prompt
MAX_ABLATIONS = 4096  # channels of workload (b)
LOW_ID = 100          # ids are drawn from [LOW_ID, vocab)
PEAK_ROWS = 100       # the batch of (b) whose peak device memory is reported
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Tool:
    """One peer's way of running the workloads; every tensor is on the model's device.

    clean(ids [T]) -> (mlp outputs of every layer [L, T, D], target id of the last position)
    patch(corrupt [T], layers [B], positions [B], values [B, D], target) -> metric (a) [B]
    ablate(ids [T], layers [B], channels [B]) -> metric (b) [B]
    """
    clean: Callable[[torch.Tensor], tuple[torch.Tensor, int]]
    patch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
    ablate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def prompts(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(clean [TOKENS], corrupt [TOKENS]) int64 ids; corrupt differs from clean at 0..CORRUPTED-1 only."""
    rng = np.random.default_rng(0)
    clean = rng.integers(LOW_ID, vocab, TOKENS)
    corrupt = clean.copy()
    shift = rng.integers(1, vocab - LOW_ID, CORRUPTED)      # a nonzero shift: the id always changes
    corrupt[:CORRUPTED] = LOW_ID + (clean[:CORRUPTED] - LOW_ID + shift) % (vocab - LOW_ID)
    return clean, corrupt


def patch_sites(n_layers: int) -> np.ndarray:
    """[n_layers * TOKENS, 2] (layer, position) of workload (a), layer-major."""
    return np.stack(np.divmod(np.arange(n_layers * TOKENS), TOKENS), axis=1)


def ablation_sites(n_layers: int, d_model: int) -> np.ndarray:
    """[min(MAX_ABLATIONS, n_layers * d_model), 2] (layer, channel) of workload (b), layer-major."""
    return np.stack(np.divmod(np.arange(min(MAX_ABLATIONS, n_layers * d_model)), d_model), axis=1)


def by_layer(layer_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """[(layer, its batch rows)] in forward order, for the [B] layer of each row of a batch."""
    return [(l, (layer_ids == l).nonzero()[:, 0]) for l in layer_ids.unique().tolist()]


def last_logprob(logits: torch.Tensor, target: int) -> torch.Tensor:
    """Metric (a): [B, V] logits of the last position -> [B] float32 log-probability of target."""
    return torch.log_softmax(logits.float(), dim=-1)[:, target]


def mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Metric (b): [B, T, V] logits of the prompt ids [T] -> [B] float32 mean next-token NLL."""
    b, t, v = logits.shape
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, v), ids[1:].repeat(b), reduction="none")
    return nll.view(b, t - 1).mean(dim=1)


def stand_in_tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the ids' decimal names. The peers want a tokenizer object to wrap
    a model; the workloads feed ids, so it only has to exist and to know the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="0", pad_token="0", eos_token="1")


def load_model(directory: Path, dtype: torch.dtype, device: str) -> transformers.PreTrainedModel:
    """The HF causal LM of a checkpoint directory, in eval mode with no gradients. A directory with
    only a config.json (tools/model_shape.py) first gets random float32 weights (torch seed 0,
    transformers' own initialisation) and the stand-in tokenizer saved into it, so every peer and
    jaxcrit read the same checkpoint."""
    if not any(directory.glob("*.safetensors")):
        torch.manual_seed(0)
        config = transformers.AutoConfig.from_pretrained(directory)
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
        stand_in_tokenizer(config.vocab_size).save_pretrained(directory)
        print(f"wrote random weights into {directory}", flush=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    return model.requires_grad_(False)


def hooks_reference(model: transformers.PreTrainedModel) -> Tool:
    """The workloads with plain torch forward hooks on model.model.layers[l].mlp: the reference."""
    mlps = [layer.mlp for layer in model.model.layers]

    def run(ids: torch.Tensor, edit: Callable, layers: list[int], **forward) -> torch.Tensor:
        handles = [mlps[l].register_forward_hook(lambda m, i, out, l=l: edit(l, out)) for l in layers]
        try:
            return model(ids, **forward).logits
        finally:
            for h in handles:
                h.remove()

    def clean(ids):
        seen = []
        logits = run(ids[None], lambda l, out: seen.append(out[0].clone()), list(range(len(mlps))))
        return torch.stack(seen), int(logits[0, -1].argmax())

    def patch(corrupt, layers, positions, values, target):
        def edit(l, out):
            rows = (layers == l).nonzero()[:, 0]
            out[rows, positions[rows]] = values[rows]
        logits = run(corrupt.expand(len(layers), -1), edit, layers.unique().tolist(), logits_to_keep=1)
        return last_logprob(logits[:, -1], target)

    def ablate(ids, layers, channels):
        def edit(l, out):
            rows = (layers == l).nonzero()[:, 0]
            out[rows, :, channels[rows]] = 0
        return mean_nll(run(ids.expand(len(layers), -1), edit, layers.unique().tolist()), ids)

    return Tool(clean, patch, ablate)


def causal_trace(tool: Tool, clean: torch.Tensor, corrupt: torch.Tensor, n_layers: int, batch: int) -> np.ndarray:
    """Workload (a) in batches of `batch` patches: [n_layers, TOKENS] float32."""
    mlp, target = tool.clean(clean)
    sites = torch.as_tensor(patch_sites(n_layers), device=clean.device)
    out = [tool.patch(corrupt, s[:, 0], s[:, 1], mlp[s[:, 0], s[:, 1]], target) for s in sites.split(batch)]
    return torch.cat(out).float().cpu().numpy().reshape(n_layers, TOKENS)


def ablation_scan(tool: Tool, ids: torch.Tensor, n_layers: int, d_model: int, batch: int) -> np.ndarray:
    """Workload (b) in batches of `batch` ablations: [n_ablations] float32."""
    sites = torch.as_tensor(ablation_sites(n_layers, d_model), device=ids.device)
    return torch.cat([tool.ablate(ids, s[:, 0], s[:, 1]) for s in sites.split(batch)]).float().cpu().numpy()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[[int], np.ndarray], batch: int, device: str) -> tuple[float, np.ndarray]:
    """(seconds, result) of one whole workload at a batch size, after a warm-up pass of it."""
    run(batch)
    sync(device)
    start = time.perf_counter()
    result = run(batch)
    sync(device)
    return time.perf_counter() - start, result


def sweep(run: Callable[[int], np.ndarray], count: int, batches: list[int],
          device: str) -> tuple[dict, np.ndarray | None]:
    """Times a workload of `count` edit sets at each batch size (an out-of-memory one is noted and
    skipped): ({'by_batch': {b: {seconds, per_s} | 'oom'}, 'best_batch', 'per_s'}, best result)."""
    by_batch, best, result = {}, None, None
    for b in batches:
        try:
            seconds, got = timed(run, b, device)
        except torch.OutOfMemoryError:
            seconds = None
        if seconds is None:          # outside the except clause, so its traceback's tensors are free
            by_batch[b] = "oom"
            print(f"  batch {b}: out of memory", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        by_batch[b] = {"seconds": seconds, "per_s": count / seconds}
        print(f"  batch {b}: {count / seconds:,.1f}/s", flush=True)
        if best is None or seconds < by_batch[best]["seconds"]:
            best, result = b, got
    summary = {"by_batch": by_batch, "best_batch": best, "per_s": by_batch[best]["per_s"] if best else None}
    return summary, result


def peak_memory(tool: Tool, ids: torch.Tensor, n_layers: int, d_model: int, device: str) -> int | None:
    """torch.cuda.max_memory_allocated in bytes (the weights included) over one batch of PEAK_ROWS
    ablations of (b); None off CUDA."""
    if not device.startswith("cuda"):
        return None
    sites = torch.as_tensor(ablation_sites(n_layers, d_model)[:PEAK_ROWS], device=ids.device)
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    tool.ablate(ids, sites[:, 0], sites[:, 1])
    sync(device)
    return torch.cuda.max_memory_allocated()


def arguments(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="HF checkpoint dir, or a dir with only a config.json")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", default="16,32,64,128,256", help="comma-separated; the fastest is kept")
    ap.add_argument("--out", type=Path, help="JSON: rates by batch size, the best, peak memory, versions")
    ap.add_argument("--save", type=Path, help="dir for a.npy [L, 128], b.npy [n] and prompts.npy [2, 128]")
    ap.add_argument("--check", action="store_true", help="instead of timing, compare both workloads at every "
                    "batch size with plain torch forward hooks, in float32 (meant for a tiny model)")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model} holds no config.json: write one with tools/model_shape.py SHAPE DIR")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        ap.error(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of integers, e.g. 16,32,64")
    if min(args.batch_sizes) < 1:
        ap.error("--batch-sizes must be positive")
    return args


def check(tool: Tool, reference: Tool, clean: torch.Tensor, corrupt: torch.Tensor, n_layers: int, d_model: int,
          batches: list[int]) -> bool:
    """Whether the tool's results equal the reference's (one edit set per forward) at every batch size,
    within 1e-4 and within 1 % of the spread of the reference's results (small on a random tiny model)."""
    want_a = causal_trace(reference, clean, corrupt, n_layers, 1)
    want_b = ablation_scan(reference, clean, n_layers, d_model, 1)
    tolerance = min(1e-4, 0.01 * np.ptp(want_a), 0.01 * np.ptp(want_b))
    ok = True
    for b in batches:
        err_a = float(np.abs(causal_trace(tool, clean, corrupt, n_layers, b) - want_a).max())
        err_b = float(np.abs(ablation_scan(tool, clean, n_layers, d_model, b) - want_b).max())
        print(f"batch {b}: max |a - reference| {err_a:.2e}, max |b - reference| {err_b:.2e}", flush=True)
        ok &= max(err_a, err_b) <= tolerance
    print(f"{'equal' if ok else 'DIFFERENT'} within {tolerance:.1e} ({want_a.size} patches, {want_b.size} "
          f"ablations; the reference's spread: a {np.ptp(want_a):.2e}, b {np.ptp(want_b):.2e})")
    return ok


def main(description: str, name: str, make_tool: Callable[[transformers.PreTrainedModel], Tool],
         packages: list[str]) -> int:
    """A peer script's command line: --check against the reference, or the timed sweep of both workloads."""
    args = arguments(description)
    dtype = torch.float32 if args.check else DTYPES[args.dtype]
    batches = args.batch_sizes
    model = load_model(args.model, dtype, args.device)
    cfg = model.config
    n_layers, d_model = cfg.num_hidden_layers, cfg.hidden_size
    clean, corrupt = (torch.as_tensor(p, device=args.device) for p in prompts(cfg.vocab_size))
    tool = make_tool(model)
    with torch.no_grad():
        if args.check:
            reference = hooks_reference(load_model(args.model, dtype, args.device))
            return 0 if check(tool, reference, clean, corrupt, n_layers, d_model, batches) else 1
        n_patches, n_ablations = n_layers * TOKENS, len(ablation_sites(n_layers, d_model))
        print(f"{name}: (a) {n_patches} patches", flush=True)
        trace, a = sweep(lambda b: causal_trace(tool, clean, corrupt, n_layers, b), n_patches, batches, args.device)
        print(f"{name}: (b) {n_ablations} ablations", flush=True)
        scan, b = sweep(lambda b: ablation_scan(tool, clean, n_layers, d_model, b), n_ablations, batches, args.device)
        peak = peak_memory(tool, clean, n_layers, d_model, args.device)
    on_cuda = args.device.startswith("cuda")
    report = {
        "tool": name,
        "versions": {p: version(p) for p in [*packages, "torch", "transformers"]}
        | {"python": platform.python_version()},
        "device": torch.cuda.get_device_name() if on_cuda else platform.processor() or platform.machine(),
        "dtype": args.dtype, "model": str(args.model), "tokens": TOKENS,
        "shape": {"n_layers": n_layers, "d_model": d_model, "vocab": cfg.vocab_size},
        "causal_trace": {"patches": n_patches, "patches_per_s": trace.pop("per_s"), **trace},
        "ablation": {"ablations": n_ablations, "ablations_per_s": scan.pop("per_s"), **scan},
        f"peak_memory_bytes_ablation_batch_{PEAK_ROWS}": peak,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for file, result in [("a.npy", a), ("b.npy", b)]:
            if result is not None:     # None: every batch size ran out of memory
                np.save(args.save / file, result)
        np.save(args.save / "prompts.npy", torch.stack([clean, corrupt]).cpu().numpy())
    return 0
