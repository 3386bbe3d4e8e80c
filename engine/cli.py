"""`python -m engine run ...`: serve a synthetic workload and print what was measured.

Prints a readable summary (or, with --json, one JSON object with the device, model, config, summary,
per-request and per-step records). A configuration that cannot run exits with code 2 and one line on
stderr; a progress line on stderr appears for runs longer than a second.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

import torch

from engine.cli_flags import (add_engine_flags, apply_cpu_threads, engine_config, finite_float,
                              positive_int)
from engine.config import ConfigError, EngineConfig, SLO
from engine.limits import check_cli_run
from engine.llm_engine import LLMEngine
from engine.metrics import Summary, summarize
from engine.records import StepRecord, Trace
from engine.server.cli import add_commands
from engine.workload import MIXES, WorkloadSpec

SUMMARY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "goodput_rps", "slo_attainment",
                "throughput_tok_s", "kv_bytes_peak", "kv_bytes_capacity", "waste_tokens_peak",
                "preemptions")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line on stderr (and exit code 2), not the usage text."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python -m engine run --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m engine", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="serve a synthetic workload and report serving metrics")
    add_engine_flags(run)
    run.add_argument("--batch", type=positive_int, default=8,
                     help="most concurrent sequences; also the request count without --requests")
    run.add_argument("--context", type=positive_int, default=128, help="prompt length in tokens")
    run.add_argument("--output", type=positive_int, default=64, help="tokens to generate")
    run.add_argument("--policy", choices=("continuous", "static"), default="continuous")
    run.add_argument("--requests", type=positive_int, help="number of requests (default: --batch)")
    run.add_argument("--rate", type=finite_float, help="arrival rate in requests/s (default: all at t=0)")
    run.add_argument("--burstiness", type=finite_float, default=1.0, help="gamma shape; 1 is Poisson")
    run.add_argument("--mix", choices=MIXES, default="fixed",
                     help="lengths: fixed, or lognormal around --context and --output as means")
    run.add_argument("--ttft-slo", type=finite_float, help="TTFT SLO in ms for goodput")
    run.add_argument("--tpot-slo", type=finite_float, help="TPOT SLO in ms for goodput")
    run.add_argument("--no-chunked-prefill", action="store_true",
                     help="schedule each prompt whole instead of in chunks")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    add_commands(sub)  # serve, tokenizer (engine/server/cli.py)
    return parser


def configs(args: argparse.Namespace) -> tuple[EngineConfig, WorkloadSpec, SLO]:
    """Map command-line flags onto the engine's config objects (they validate themselves)."""
    engine = engine_config(args, max_num_seqs=args.batch, policy=args.policy,
                           chunked_prefill=not args.no_chunked_prefill)
    workload = WorkloadSpec(num_requests=args.requests or args.batch, prompt_len=args.context,
                            output_len=args.output, rate=args.rate, burstiness=args.burstiness,
                            mix=args.mix, seed=args.seed)
    return engine, workload, SLO(ttft_ms=args.ttft_slo, tpot_ms=args.tpot_slo)


class Progress:
    """A one-line progress report on stderr, shown once a run has taken a second."""

    def __init__(self, total_requests: int, stream: TextIO | None = None) -> None:
        self.total = total_requests
        self.done = 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.shown = False

    def __call__(self, step: StepRecord) -> None:
        self.done += len(step.finished)
        elapsed = time.perf_counter() - self.start
        if elapsed < 1.0 or not self.stream.isatty() and step.index % 50:
            return
        width = 24
        filled = width * self.done // self.total
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                          f"requests  step {step.index + 1}  {elapsed:.1f}s")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")


def report(trace: Trace, summary: Summary) -> dict[str, Any]:
    """The --json object."""
    full = summary.to_json()
    return {"device": trace.device, "model": trace.model, "config": trace.config,
            "summary": {k: full[k] for k in SUMMARY_KEYS} | {
                "completed": summary.completed, "rejected": summary.rejected,
                "duration_s": summary.duration_s, "queue_ms": full["queue_ms"],
                "contiguous_bytes_peak": summary.contiguous_bytes_peak},
            "requests": [r.to_json() for r in trace.requests],
            "steps": [s.to_json() for s in trace.steps]}


def table(trace: Trace, summary: Summary) -> str:
    """The readable summary."""
    rows = [("device", trace.device), ("model", trace.model),
            ("requests", f"{summary.completed} done, {summary.rejected} rejected, "
                         f"{summary.preemptions} preemptions"),
            ("duration", f"{summary.duration_s:.3f} s over {len(trace.steps)} steps")]
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "queue_ms"):
        s = getattr(summary, name)
        rows.append((name.replace("_ms", " (ms)").upper().replace("(MS)", "(ms)"),
                     f"mean {s.mean:9.3f}   p50 {s.p50:9.3f}   p90 {s.p90:9.3f}   "
                     f"p99 {s.p99:9.3f}"))
    rows += [("throughput", f"{summary.throughput_tok_s:.1f} output tok/s"),
             ("goodput", f"{summary.goodput_rps:.3f} req/s  (SLO attainment "
                         f"{summary.slo_attainment:.1%})"),
             ("KV peak", f"{summary.kv_bytes_peak / 1e6:.3f} MB of "
                         f"{summary.kv_bytes_capacity / 1e6:.3f} MB "
                         f"(contiguous would reserve {summary.contiguous_bytes_peak / 1e6:.3f} MB)"),
             ("waste peak", f"{summary.waste_tokens_peak} token slots")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        return args.main(args)
    try:
        engine_cfg, workload, slo = configs(args)
        check_cli_run(engine_cfg, workload)  # before any prompt, weight or cache is made
        apply_cpu_threads(args)
        engine = LLMEngine(engine_cfg)
        progress = Progress(workload.num_requests)
        try:
            trace = engine.run(workload, on_step=progress)
        finally:
            progress.close()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("error: the device ran out of memory; lower --batch, --context or --kv-budget-mb",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    summary = summarize(trace, slo)
    if args.json:
        json.dump(report(trace, summary), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(table(trace, summary))
    return 0
