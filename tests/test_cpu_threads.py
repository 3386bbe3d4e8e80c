"""engine/cpu_threads.py: numpy's BLAS pool is sized at run time and the device name follows it;
OpenMP's wait policy is set by entry points, before torch loads, and never by an import."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cpu_threads import blas_threads, quiet_openmp, set_blas_threads, usable_cores
from engine.llm_engine import describe_device


def test_blas_pool_size_is_set_and_reported() -> None:
    before = blas_threads()
    try:
        assert set_blas_threads(1) == 1 == blas_threads()
        assert describe_device(torch.device("cpu")) == "CPU: 1 thread"
        a = np.ones((64, 64), dtype=np.float32)
        assert float((a @ a)[0, 0]) == 64.0  # BLAS still computes on one thread
        if usable_cores() >= 2:
            assert set_blas_threads(2) == 2
            assert describe_device(torch.device("cpu")) == "CPU: 2 threads"
    finally:
        set_blas_threads(before)


def test_a_pool_of_no_threads_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        set_blas_threads(0)


def _python(code: str, env: dict[str, str]) -> str:
    """The last line `code` prints in a fresh interpreter with `env` (the repository on its path)."""
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env=env | {"PYTHONPATH": root}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _env_without_policy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}


def test_importing_the_engine_changes_no_environment() -> None:
    code = ("import os, engine, engine.cli, engine.llm_engine, engine.bench\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    assert _python(code, _env_without_policy()) == "None"


def test_python_m_engine_quiets_openmp_before_torch_loads() -> None:
    """What `python -m engine` sees when it first imports torch."""
    code = ("import builtins, os, runpy, sys\n"
            "seen, real = [], builtins.__import__\n"
            "def spy(name, *args, **kwargs):\n"
            "    if name == 'torch' and not seen:\n"
            "        seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
            "    return real(name, *args, **kwargs)\n"
            "builtins.__import__ = spy\n"
            "sys.argv = ['engine', 'run', '--help']\n"
            "try:\n"
            "    runpy.run_module('engine', run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(seen)")
    assert _python(code, _env_without_policy()) == "['PASSIVE']"


def test_quiet_openmp_keeps_a_policy_the_user_chose(monkeypatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    quiet_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    quiet_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
