"""Measure the demo's workload figures from the command line, with the lab's own run code.

    PYTHONPATH=. .venv/bin/python tools/workload_report.py --requests 48 --rate 8 --mix mixed

Runs one workload (the demo's sliders as flags) under both batching policies on the identical
request list, then the goodput sweep over arrival rates, and prints what the page would show:
the static-against-continuous table, the running bound beside the measured peak, and the knee.
Each run is the lab's own request (`lab.runs.run_spec`) measured by the engine server's own code
(`engine.server.measured_runs.execute`), in this process, so the figures are the page's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from engine.config import SLO, preset
from engine.cpu_threads import set_blas_threads
from engine.device_probe import probe
from engine.llm_engine import describe_device
from engine.metrics import summarize
from engine.server.measured_runs import ModelShelf, RunSpec, execute
from lab.engine_client import EngineInfo
from lab.runs import (SWEEP_RATES, Limits, RunKey, check_run, other_policy_key, rate_key,
                      run_spec, running_bounds)
from widgets.goodput_rate_plot import knee, rate_points

KV_CAP = 2**40  # no server cap here: the flags are the whole request


def measure(key: RunKey, shelf: ModelShelf, engine: EngineInfo):
    t = time.perf_counter()
    spec = RunSpec.from_json(run_spec(key, engine), kv_cap_bytes=KV_CAP)
    trace = execute(spec, shelf, lambda _step: None, None)
    print(f"[report] {key.label()}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cpu-8m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--output", type=int, default=64)
    p.add_argument("--page", type=int, default=16)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=8.0)
    p.add_argument("--mix", choices=("fixed", "mixed"), default="mixed")
    p.add_argument("--kv-mb", type=int, default=32)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--ttft-slo", type=float, default=1000.0)
    p.add_argument("--tpot-slo", type=float, default=100.0)
    p.add_argument("--cpu-threads", type=int, default=1, help="as the lab's runs on two cores")
    p.add_argument("--max-run-s", type=float, default=60.0, help="rates slower than this skip")
    p.add_argument("--no-sweep", action="store_true", help="skip the arrival-rate sweep")
    args = p.parse_args(argv)
    set_blas_threads(args.cpu_threads)
    key = RunKey(args.model, args.batch, args.context, args.page, args.output,
                 requests=args.requests, rate=args.rate, mix=args.mix, kv_mb=args.kv_mb,
                 chunk=args.chunk)
    limits = Limits(max_run_s=args.max_run_s, kv_budget_bytes=KV_CAP)
    shelf = ModelShelf("cpu")
    engine = EngineInfo(device_type="cpu", device=describe_device(shelf.device),
                        probe=probe("cpu"), kv_cap_bytes=KV_CAP, max_run_s=args.max_run_s)
    why = check_run(key, limits, engine)
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    slo = SLO(ttft_ms=args.ttft_slo, tpot_ms=args.tpot_slo)
    report: dict = {"key": key.to_json(), "slo": {"ttft_ms": args.ttft_slo,
                                                   "tpot_ms": args.tpot_slo}}
    for k in (key, other_policy_key(key)):
        s = summarize(measure(k, shelf, engine), slo)
        report[k.policy] = {"goodput_rps": s.goodput_rps, "ttft_p90_ms": s.ttft_ms.p90,
                            "tpot_p90_ms": s.tpot_ms.p90, "throughput_tok_s": s.throughput_tok_s,
                            "duration_s": s.duration_s, "peak_running": s.peak_running,
                            "peak_waiting": s.peak_waiting, "preemptions": s.preemptions}
    bounds = running_bounds(key, preset(key.model), engine.bytes_per_elem)
    report["bounds"] = {"batch_cap": bounds.batch_cap, "at_full_length": bounds.at_full_length,
                        "on_prompt": bounds.on_prompt, "num_blocks": bounds.num_blocks}
    if not args.no_sweep:
        traces = {rk.rate: measure(rk, shelf, engine)
                  for rk in (rate_key(key, r) for r in SWEEP_RATES)
                  if check_run(rk, limits, engine) is None}
        points = rate_points(traces, slo)
        best = knee(points)
        report["rates"] = [{"rate": p.rate, "goodput_rps": p.goodput,
                            "attainment": p.attainment} for p in points]
        report["knee_rps"] = best.rate if best else None
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
