"""The GPU check script, exercised on the CPU: its dry run must complete and write a full report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the dry run times the Triton kernel in triton's interpreter")

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("kernel_tests", "device_probe", "kernel_bandwidth", "decode_graphs", "bench", "serving")


def run_check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run([sys.executable, "-m", "tools.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_writes_every_step(tmp_path):
    done = run_check("--out", str(tmp_path), "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(STEPS) <= set(report)
    for key in ("device_name", "torch", "triton", "dry_run", "seconds", "all_ok"):
        assert key in report["meta"]
    for step in STEPS:  # every step either succeeded or says why not
        assert report[step]["ok"] or report[step].get("error"), step
    for step in ("kernel_tests", "device_probe", "kernel_bandwidth"):  # these need nobody else's code
        assert report[step]["ok"], report[step].get("error")
    assert report["kernel_tests"]["counts"].get("passed", 0) >= 1
    assert report["device_probe"]["read_gbs"] > 0
    rows = report["kernel_bandwidth"]["rows"]
    assert rows and all(r["gbs"] > 0 and r["max_abs_err"] < 1e-4 for r in rows)
    assert {"tpot_vs_batch", "ttft_vs_context"} <= set(report["serving"])
    markdown = (tmp_path / "gpu_check.md").read_text()
    for heading in ("(a) Kernel tests", "(b) Device probe", "(c) Kernel bandwidth", "(d)", "(e)"):
        assert heading in markdown


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_refuses_without_cuda(tmp_path):
    done = run_check("--out", str(tmp_path))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--dry-run" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()
