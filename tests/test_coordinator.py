"""The coordination service's own process (jaxcrit/dist/coordinator.py): it stops when process 0 says so,
outlives a process 0 that ends without a word for the heartbeat timeout, then exits by itself, and a
port it cannot take is one error naming it."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxcrit.dist import coordinator
from jaxcrit.errors import JaxcritError
from test_multiprocess import _port

REPO = Path(__file__).resolve().parents[1]


def _service(port: int, heartbeat_timeout: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", coordinator._MAIN, f"127.0.0.1:{port}", "2", str(heartbeat_timeout)],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_stops_when_told():
    proc = _service(_port(), 60)
    proc.stdin.write("stop\n")
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


def test_outlives_a_silent_process_0():
    proc = _service(_port(), 3)
    began = time.monotonic()
    proc.stdin.close()   # process 0 gone without 'stop'
    time.sleep(1)
    assert proc.poll() is None
    assert proc.wait(timeout=15) == 0 and time.monotonic() - began >= 3


def test_busy_port_is_one_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(JaxcritError, match=rf"could not start on \[::\]:{port}: .*port free"):
            coordinator.start(f"localhost:{port}", 2, 20)
