"""A real `mlflow server` for tests, and free loopback ports (tests/test_nightly.py,
tests/test_webhook.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without MLflow's and the nightly's settings, for a child process
    (tiny models on a shared 2-core host: one thread each)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY", "PERSONA_AUDIT"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true",
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, wait_s: float) -> None:
    """Poll `url` until it answers 200; fail with the end of `log` if `proc` exits first or
    `wait_s` passes."""
    import urllib.request

    deadline = time.time() + wait_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"{url} did not answer in {wait_s} s:\n" + \
            log.read_text()[-3000:]
        time.sleep(0.3)


@contextmanager
def mlflow_server(log_dir: Path, args: list[str], env: dict[str, str],
                  wait_s: float) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port: yields its URL once /health answers,
    and is stopped by its process group's PID however the block ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", *args, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=open(log_dir / "server.log", "w"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True)
    try:
        wait_healthy(f"{url}/health", server, log_dir / "server.log", wait_s)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
