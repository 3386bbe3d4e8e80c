"""Start `python -m engine serve` as a child of the lab, for a one-command set-up.

`python -m lab` (what `make lab` runs) starts one engine server this way and points every page
process at it through LAB_ENGINE_URL. A page process started without LAB_ENGINE_URL (a bare
`panel serve lab/app.py`) starts its own the same way, the first time a session needs it.
The engine's device, threads and caps come from the lab's environment: LAB_DEVICE,
LAB_CPU_THREADS, LAB_KV_BUDGET_MB and LAB_MAX_RUN_S.
"""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "cpu-8m"  # what the engine's OpenAI routes serve; lab runs name their own model


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def engine_threads(env: dict[str, str] | None = None) -> int:
    """BLAS threads for the engine: LAB_CPU_THREADS, else every core but one, which is left to
    the page processes and the browsers drawing what the engine measures."""
    threads = (os.environ if env is None else env).get("LAB_CPU_THREADS", "")
    if threads:
        if not (threads.isdigit() and int(threads) >= 1):
            raise ValueError(f"LAB_CPU_THREADS must be a whole number of at least 1, "
                             f"not {threads!r}")
        return int(threads)
    return max(1, len(os.sched_getaffinity(0)) - 1)


def start_engine(port: int | None = None, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, **popen) -> tuple[subprocess.Popen, str]:
    """Start an engine server with `env` (default: this process's environment); returns the
    process and its URL. It is stopped when this process exits."""
    port = port or free_port(host)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "engine", "serve", "--host", host, "--port", str(port),
           "--model", MODEL, "--device", env.get("LAB_DEVICE", "auto"),
           "--cpu-threads", str(engine_threads(env))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)
    atexit.register(stop_engine, proc)
    return proc, f"http://{host}:{port}"


def stop_engine(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
