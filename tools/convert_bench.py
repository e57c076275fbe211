"""Conversion benchmark: wall time and peak host memory of load_hf on a Qwen2.5-0.5B-shaped checkpoint.

    python tools/convert_bench.py [--dir DIR] [--keep]

Three processes, so no measurement sees another's memory:
  1. builder: a random Qwen2.5-0.5B-shaped model (transformers Qwen2Config), bf16, save_pretrained
     into DIR (skipped if DIR already holds model.safetensors);
  2. measurer: imports jax/jaxcrit, initialises the CPU backend, notes its RSS (the baseline),
     runs load_hf(DIR, dtype=bfloat16) and blocks on the result; reports wall time and
     peak RSS (getrusage ru_maxrss) minus the baseline;
  3. this driver, which prints the ratio peak / checkpoint size (target <= 1.5).
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

BUILD = textwrap.dedent("""
    import sys, time, torch, transformers as tf
    t = time.perf_counter()
    cfg = tf.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(sys.argv[1])
    print(f"built in {time.perf_counter() - t:.1f} s", file=sys.stderr)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="checkpoint dir (built there if it holds no model.safetensors)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary checkpoint")
    args = ap.parse_args()
    d = Path(args.dir or tempfile.mkdtemp(prefix="qwen05b_"))
    try:
        if not (d / "model.safetensors").exists():
            subprocess.run([sys.executable, "-c", BUILD, str(d)], check=True)
        ckpt = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        r = subprocess.run([sys.executable, "-c", MEASURE, str(d)], check=True, env=env,
                           capture_output=True, text=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        used = m["peak_rss"] - m["rss_base"]
        mib = lambda b: f"{b / 2**20:,.0f} MiB"
        print(f"machine         : {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"python {platform.python_version()}, jax {m['jax']}")
        print(f"checkpoint      : {mib(ckpt)} ({m['n_params']:,} params, {', '.join(m['dtypes'])})")
        print(f"load_hf wall    : {m['wall_s']:.2f} s")
        print(f"RSS baseline    : {mib(m['rss_base'])} (after imports {mib(m['rss_after_imports'])}, "
              f"+ CPU client init)")
        print(f"peak RSS        : {mib(m['peak_rss'])}; minus baseline {mib(used)}")
        print(f"RSS after load  : {mib(m['rss_after_load'])}; params hold {mib(m['param_bytes'])}")
        ratio = used / ckpt
        print(f"peak / ckpt     : {ratio:.2f}  (target <= 1.5: {'met' if ratio <= 1.5 else 'MISSED'})")
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
