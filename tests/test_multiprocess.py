"""Two processes of two CPU devices each run the pipeline on one 2x2 mesh (gloo collectives): each
process holds one row of 'data' and the 'model' axis within it.

Process 0 must write exactly the files a single process with four devices writes on the same
mesh, byte for byte (the single process also uses gloo, so every all-reduce sums in the same
order), and process 1 must write nothing: it is given a workdir of its own, which must not
even be created.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcrit.run import runner as pipeline
from tiny_run import COMPARED, build_model, config_file, files

REPO = Path(__file__).resolve().parents[1]


def _ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port() -> int:
    """A free port (the other multi-process tests import it)."""
    return _ports(1)[0]


def _start(cfg: Path, workdir: Path, devices: int, processes: int, index: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
    return subprocess.Popen(
        [sys.executable, "-m", "jaxcrit.main", f"--config={cfg}", f"--workdir={workdir}", "--config.mesh.shape=(2,2)",
         f"--config.mesh.coordinator=localhost:{port}", f"--config.mesh.num_processes={processes}",
         f"--config.mesh.process_id={index}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_write_what_one_writes(tmp_path):
    model = build_model(tmp_path / "model")
    cfg = config_file(tmp_path / "cfg.py", model, stage1__batch=4, stage2__max_steps=8, baselines__ns=(1, 2),
                      baselines__names=("random", "gradient"), baselines__random_repeats=1, scan__layers=(1,),
                      scan__top=4, scan__greedy_steps=2, map__enabled=False, engine__chunk=8)
    single, pair = _ports(2)   # the single process and the pair run side by side: each is mostly one thread
    one = _start(cfg, tmp_path / "one", 4, 1, 0, single)
    procs = [_start(cfg, tmp_path / f"p{i}", 2, 2, i, pair) for i in range(2)]
    out, err = one.communicate(timeout=400)
    assert one.returncode == 0, err[-3000:]
    logs = [p.communicate(timeout=400) for p in procs]
    for p, (o, e) in zip(procs, logs):
        assert p.returncode == 0, e[-3000:]
    written = set(files(tmp_path / "p0"))
    assert files(tmp_path / "p0") == files(tmp_path / "one") and written == set(COMPARED) - {"map.csv", "map.json"}
    assert not (tmp_path / "p1").exists()
    assert "[jaxcrit 1/2]" in logs[1][1] and "critical n" in logs[0][0] and "critical n" not in logs[1][0]
