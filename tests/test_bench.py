"""`python -m jaxcrit.bench`: every benchmark runs on the tiny shape on a CPU and reports sane
values; the scan's losses are transformers' on the same random params; the random params have
the table's shapes, their layers drawn apart."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers as tf

import hf_models
from jaxcrit.bench import SHAPES, random_params, random_tokens
from jaxcrit.bench.__main__ import main
from jaxcrit.models.config import to_hf_config
from jaxcrit.models.params import param_table

TINY = SHAPES["tiny"]
SEQ = 37   # tokens of every benchmark's text: RoPE past its first period, not a power of two
# One dtype, text length and chunk for all: the benchmarks share their compiled programs.
F32 = ["--shape", "tiny", "--dtype", "float32"]
CHUNK = "8"


def bench(tmp_path, *argv: str) -> dict:
    """Runs the benchmark command; returns the report it wrote with --out."""
    out = tmp_path / "report.json"
    assert main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


# jaxcrit's Qwen2 params -> transformers' names (the kernels transposed to [out, in])
TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
PER_LAYER = {"input_norm": "input_layernorm.weight", "post_norm": "post_attention_layernorm.weight",
             "q_w": "self_attn.q_proj.weight", "k_w": "self_attn.k_proj.weight", "v_w": "self_attn.v_proj.weight",
             "o_w": "self_attn.o_proj.weight", "q_b": "self_attn.q_proj.bias", "k_b": "self_attn.k_proj.bias",
             "v_b": "self_attn.v_proj.bias", "gate_w": "mlp.gate_proj.weight", "up_w": "mlp.up_proj.weight",
             "down_w": "mlp.down_proj.weight"}


def torch_model(params: dict) -> torch.nn.Module:
    """The tiny Qwen2 in transformers (f32, eager attention) holding these params."""
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**to_hf_config(TINY)),
                                                attn_implementation="eager").eval()
    t = lambda name, a: torch.tensor(a.T if name.endswith("_w") else a)
    state = {hf: t(k, np.asarray(params[k])) for k, hf in TOP.items()}
    state |= {f"model.layers.{i}.{hf}": t(k, np.asarray(params[k][i])) for k, hf in PER_LAYER.items()
              for i in range(TINY.n_layers)}
    model.load_state_dict(state, strict=False)   # lm_head is tied to the embedding
    return model


def torch_scan(model: torch.nn.Module, tokens: np.ndarray, module: str, width: int) -> tuple[float, np.ndarray]:
    """(clean mean NLL, [L * width] mean NLL with channel c of `module` zeroed in layer l, row l * width + c),
    all rows in one batch: a forward hook zeroes each row's own channel."""
    rows = TINY.n_layers * width
    ids = torch.from_numpy(tokens.astype(np.int64))[None].repeat(rows + 1, 1)   # the last row: clean

    def zero_own(layer):
        def hook(mod, args, out):
            out = out.clone()
            out[torch.arange(layer * width, (layer + 1) * width), :, torch.arange(width)] = 0.0
            return out
        return hook
    handles = [model.get_submodule(f"model.layers.{i}.{module}").register_forward_hook(zero_own(i))
               for i in range(TINY.n_layers)]
    try:
        with torch.no_grad():
            logits = model(ids).logits.float()
    finally:
        for h in handles:
            h.remove()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    return float(nll[-1]), nll[:-1].numpy()


def test_random_params_have_the_table_shapes_and_layers_drawn_apart():
    p = random_params(TINY)
    table = param_table(TINY)
    assert {k: (v.shape, v.dtype) for k, v in p.items()} == {k: (s, np.float32) for k, (s, _) in table.items()}
    host = {k: np.asarray(v, np.float64) for k, v in p.items()}
    for k, (_, axes) in table.items():
        if axes[0] == "layers":   # each layer its own draw
            assert all(not np.allclose(host[k][0], host[k][i]) for i in range(1, TINY.n_layers)), k
    assert not np.allclose(host["gate_w"], host["up_w"])   # each param its own draw
    for k, v in host.items():
        mean, std = (1.0, 0.1) if "norm" in k else (0.0, 0.02)   # norm weights near their identity (Qwen2: 1)
        assert abs(v.mean() - mean) < 4 * std / np.sqrt(v.size) + 1e-9 and abs(v.std() - std) < 0.25 * std, k
    again = random_params(TINY)
    assert all(np.array_equal(np.asarray(again[k]), np.asarray(p[k])) for k in p)   # a seed gives one model
    assert not np.array_equal(np.asarray(random_params(TINY, seed=1)["embed"]), np.asarray(p["embed"]))


def test_scan_reports_transformers_losses(tmp_path):
    """The scan's clean loss, mean and largest effect over every down_proj channel equal
    transformers' with each channel zeroed by a hook; the flags alone (no subcommand) run it."""
    r = bench(tmp_path, *F32, "--seq", str(SEQ), "--sites", "down_proj", "--max-chunk", "9", "--peak-size", "64")
    assert r["shape"] == "tiny" and r["seq"] == SEQ and r["matmul_peak_tflops"] > 0 and set(r) >= {"down_proj"}
    s = r["down_proj"]
    base, losses = torch_scan(torch_model(random_params(TINY)), random_tokens(TINY, SEQ), "mlp.down_proj",
                              TINY.d_model)
    assert s["ablations"] == TINY.n_layers * TINY.d_model and s["chunk"] == 8   # 48's largest divisor <= 9
    assert s["finite"] and s["abl_per_s"] > 0 and s["seconds"] > 0 and 0 < s["pct_of_limit"]
    np.testing.assert_allclose([s["base_loss"], s["mean_loss"], s["max_effect"]],
                               [base, losses.mean(), np.abs(losses - base).max()], rtol=1e-5, atol=1e-6)
    assert s["max_effect"] > 1e-4   # the zeroed channels move the loss: the comparison sees them


def test_pipeline(tmp_path):
    r = bench(tmp_path, "pipeline", *F32, "--tokens", str(SEQ), "--samples", "4", "--batch", "2",
              "--steps", "10", "--chunk", CHUNK)
    for run in ("cold", "warm"):
        parts = [r[f"{run}_{k}_s"] for k in ("stage1", "rank", "stage2")]
        assert min(parts) > 0 and r[f"{run}_total_s"] == pytest.approx(sum(parts))
    assert r["stage2_steps"] == 10   # the full curve n = 1..steps: epsilon is never reached
    assert r["stage2_ms_per_step"] == pytest.approx(1e3 * r["warm_stage2_s"] / 10)
    assert r["stage1_ms_per_noisy_pass"] == pytest.approx(1e3 * r["warm_stage1_s"] / 4)
    assert r["params_s"] > 0 and r["loss"] == "xla"


def test_map(tmp_path):
    r = bench(tmp_path, "map", *F32, "--seq", str(SEQ), "--top-k", "3", "--max-rounds", "2", "--audit", "8",
              "--chunk", CHUNK)
    L, D, F, Q, KV = TINY.n_layers, TINY.d_model, TINY.d_ff, TINY.q_dim, TINY.kv_dim
    # nine sites: q, k, v, o, gate, up, act_fn, down, post_attention_layernorm
    assert r["neurons"] == L * (Q + KV + KV + D + F + F + F + D + D)
    assert r["ablations"] == sum(u["rows"] for u in r["units"]) > 0
    assert r["verified"] >= 3 and 0 < r["audited"] <= 8 and r["rounds"] <= 2 and r["abl_per_s"] > 0
    assert r["exhaustive_exact_s_at_this_rate"] == pytest.approx(r["neurons"] / r["abl_per_s"])


def test_scaling(tmp_path):
    r = bench(tmp_path, "scaling", *F32, "--rows", "24", "--chunk", CHUNK, "--tokens", str(SEQ))
    assert [x["gpus"] for x in r["runs"]] == [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
    first = r["runs"][0]
    assert first["speedup"] == 1.0 and first["max_abs_loss_diff_vs_1"] == 0.0 and first["ablations_per_s"] > 0


def test_kernels(tmp_path):
    """XLA's MLP and loss agree with the f32 references to bf16 rounding; a fused kernel or tokamax
    that does not run here says why."""
    r = bench(tmp_path, "kernels", "--shape", "tiny", "--rows", "3", "--seq", str(SEQ), "--vocab-chunk", "64",
              "--reps", "1")
    assert set(r["mlp"]) == {"xla", "fused", "tokamax mosaic"}
    assert set(r["loss"]) == {"xla one pass (shifted)", "xla two pass (online)", "fused", "tokamax chunked_xla"}
    for part, tol in (("mlp", 2e-2), ("loss", 5e-2)):
        for name, x in r[part].items():
            if "ms" in x:
                assert x["ms"] > 0 and x["tflops"] > 0 and x["max_error"] < tol, (part, name, x)
            else:   # XLA's always run; a fused kernel or tokamax says why it did not
                assert not name.startswith("xla") and (x.get("skipped") or x.get("error")), (part, name, x)
    if jax.default_backend() == "cpu":
        assert "needs" in r["mlp"]["fused"]["skipped"] and "needs" in r["loss"]["fused"]["skipped"]


def test_convert(tmp_path):
    """load_hf's wall time and memory on a checkpoint in --dir; the parameter count is transformers'."""
    model = hf_models.build("qwen2", tmp_path / "ckpt")
    r = bench(tmp_path, "convert", "--dir", str(tmp_path / "ckpt"))
    n = sum(p.numel() for p in model.parameters())   # the tied head counted once, as jaxcrit holds it
    assert r["n_params"] == n and r["param_bytes"] == 2 * n and r["dtypes"] == ["bfloat16"]
    assert r["checkpoint_bytes"] >= 4 * n and r["wall_s"] > 0 and r["peak_over_checkpoint"] > 0
    assert (tmp_path / "ckpt").exists()   # a given --dir is kept


def test_interventions(tmp_path):
    """Zeroing's losses are transformers' with each channel zeroed by a hook (the first 60 in
    layer-major order: past layer 0). Tracing's [L, T] grid: a patch in the last layer at any
    position but the last cannot reach the last position's log-prob (its MLP acts per position
    and no attention follows), so that row is the corrupted run's; the last position moves it.
    Its target and clean log-prob are transformers'."""
    prefix = tmp_path / "iv"
    r = bench(tmp_path, "interventions", *F32, "--tokens", str(SEQ), "--channels", "60", "--sets", "12",
              "--chunk", CHUNK, "--npy", str(prefix))
    model, tokens = torch_model(random_params(TINY)), random_tokens(TINY, SEQ)
    base, losses = torch_scan(model, tokens, "mlp.down_proj", TINY.d_model)
    np.testing.assert_allclose(np.load(f"{prefix}_zero.npy"), losses[:60], rtol=1e-5, atol=1e-6)
    with torch.no_grad():   # tracing's target: the clean run's top token at the last position
        last = torch.log_softmax(model(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0, -1], -1)
    assert r["tracing"]["target"] == int(last.argmax())
    assert r["tracing"]["clean"] == pytest.approx(last.max().item(), abs=1e-5)
    z = r["zeroing"]
    assert z["ablations"] == 60 and z["ablations_per_s"] > 0 and z["base_loss"] == pytest.approx(base, rel=1e-5)
    grid, t = np.load(f"{prefix}_tracing.npy"), r["tracing"]
    assert grid.shape == (TINY.n_layers, SEQ) and t["patches"] == grid.size and t["patches_per_s"] > 0
    np.testing.assert_allclose(grid[-1, :-1], t["corrupted"], rtol=1e-6)
    assert abs(grid[-1, -1] - t["corrupted"]) > 1e-4
    assert r["mixed"]["sets"] == 12 and r["mixed"]["finite"]
