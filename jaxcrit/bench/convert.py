"""Conversion: wall time and peak host memory of load_hf on a Qwen2.5-shaped checkpoint.

    python -m jaxcrit.bench convert [--shape 0.5b --dir DIR --keep]

Two processes beside this one, so no measurement sees another's memory:
  1. builder: a random model of the shape (transformers, bf16), save_pretrained into DIR
     (skipped if DIR already holds a *.safetensors file);
  2. measurer: imports jax and jaxcrit, sets up the CPU backend, notes its RSS (the baseline),
     runs load_hf(DIR, dtype=bfloat16) and blocks on the result; reports the wall time and the
     peak RSS (getrusage ru_maxrss) minus the baseline.
The report's peak_over_checkpoint is that peak over the checkpoint's size (target <= 1.5).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from jaxcrit.bench.model import SHAPES
from jaxcrit.models.config import to_hf_config

BUILD = textwrap.dedent("""
    import json, sys, torch, transformers as tf
    torch.manual_seed(0)
    cfg = tf.AutoConfig.for_model(**json.loads(sys.argv[2]))
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(sys.argv[1])
""")

MEASURE = textwrap.dedent("""
    import json, resource, sys, time

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    import jax, ml_dtypes, numpy as np
    from jaxcrit.convert.hf import load_hf
    after_imports = rss()
    jax.devices()                      # the CPU client is set up before the baseline
    base = rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    cfg, params = load_hf(sys.argv[1], dtype=ml_dtypes.bfloat16)
    jax.block_until_ready(params)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(
        wall_s=wall, rss_after_imports=after_imports, rss_base=base, peak_rss_before_load=peak_before,
        peak_rss=peak, rss_after_load=rss(), n_params=sum(int(v.size) for v in params.values()),
        param_bytes=sum(int(v.nbytes) for v in params.values()),
        dtypes=sorted({str(v.dtype) for v in params.values()}), jax=jax.__version__)))
""")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", default="0.5b", choices=SHAPES, help="the model the builder saves")
    ap.add_argument("--dir", type=Path, help="checkpoint dir (built there if it holds no *.safetensors)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary checkpoint")


def run(args: argparse.Namespace) -> dict:
    d = args.dir or Path(tempfile.mkdtemp(prefix=f"qwen{args.shape}_"))
    try:
        if not any(d.glob("*.safetensors")):
            subprocess.run([sys.executable, "-c", BUILD, str(d), json.dumps(to_hf_config(SHAPES[args.shape]))],
                           check=True)
        ckpt = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        got = subprocess.run([sys.executable, "-c", MEASURE, str(d)], check=True, env=env, capture_output=True,
                             text=True)
        m = json.loads(got.stdout.strip().splitlines()[-1])
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    used = m["peak_rss"] - m["rss_base"]
    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "checkpoint": str(d), "checkpoint_bytes": ckpt, **m,
            "peak_rss_over_base": used, "peak_over_checkpoint": used / ckpt}
