"""Does the lab measure what the engine measures? TPOT p50 in a rendered page against the CLI.

    PYTHONPATH=. .venv/bin/python -m tools.fidelity --repeats 5 --out docs/fidelity.json

`--repeats` times: starts the whole lab afresh (`python -m lab`: the engine server and
`panel serve`), opens the page in headless chromium on this same machine, and reads the summary
table's TPOT p50 of the first run at the default settings, measured while the browser draws the
page and the run live. Then runs `python -m engine run` with the same settings and threads as many
times. Prints both medians and their ratio; the lab is faithful when they agree within 15%
(issue 14). Fresh servers each time, because once a page has a result its sweeps keep the engine
busy in the background, and a second measurement would not be at the default settings' first run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {"model": "cpu-8m", "batch": 8, "context": 128, "page": 16, "output": 64,
            "kv_mb": 32, "chunk": 512}  # LabState's defaults (checked below)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_tpot(threads: int) -> float:
    """TPOT p50 (ms) of a fresh lab's first run at the default settings, read off a rendered page."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = dict(os.environ, LAB_CPU_THREADS=str(threads), LAB_DEVICE="cpu",
               PYTHONPATH=str(ROOT))
    env.pop("LAB_ENGINE_URL", None)
    lab = subprocess.Popen([sys.executable, "-m", "lab", "--port", str(port), "--address",
                            "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}"],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            deadline = time.monotonic() + 240
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}/app", timeout=60_000)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            page.locator(".run-status p").first.filter(has_text="Measured").wait_for(
                timeout=180_000)
            cell = page.locator("table.summary-table tr", has_text="TPOT p50").locator("td")
            tpot = float(re.sub(r"[^0-9.]", "", cell.first.inner_text()))
            browser.close()
    finally:
        lab.terminate()
        lab.wait(30)
    return tpot


def cli_tpots(repeats: int, threads: int) -> list[float]:
    d = DEFAULTS
    cmd = [sys.executable, "-m", "engine", "run", "--json", "--model", d["model"],
           "--batch", str(d["batch"]), "--context", str(d["context"]),
           "--page-size", str(d["page"]), "--output", str(d["output"]),
           "--kv-budget-mb", str(d["kv_mb"]), "--max-batched-tokens", str(d["chunk"]),
           "--cpu-threads", str(threads), "--device", "cpu"]
    out = []
    for i in range(repeats):
        run = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                             capture_output=True, text=True, check=True)
        out.append(json.loads(run.stdout)["summary"]["tpot_ms"]["p50"])
        print(f"cli run {i + 1}: TPOT p50 {out[-1]:.2f} ms", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads of the engine in both cases (the lab's default on 2 cores)")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from lab.state import LabState
    s = LabState()
    assert {k: getattr(s, k) for k in DEFAULTS} == DEFAULTS, "LabState's defaults moved"
    lab = []
    for i in range(args.repeats):
        lab.append(lab_tpot(args.threads))
        print(f"lab run {i + 1}: TPOT p50 {lab[-1]} ms", file=sys.stderr)
    cli = cli_tpots(args.repeats, args.threads)
    report = {"settings": DEFAULTS, "threads": args.threads, "lab_tpot_p50_ms": lab,
              "cli_tpot_p50_ms": cli, "lab_median": statistics.median(lab),
              "cli_median": statistics.median(cli),
              "ratio": statistics.median(lab) / statistics.median(cli),
              "load_average": os.getloadavg()}
    print(f"lab median {report['lab_median']:.2f} ms, CLI median {report['cli_median']:.2f} ms, "
          f"ratio {report['ratio']:.3f} (within 15%: {abs(report['ratio'] - 1) <= 0.15})")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
