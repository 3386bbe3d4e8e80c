"""The flags that configure an engine, shared by `python -m engine run` and `serve`.

One list, so the two commands cannot drift apart: the model and where it runs, KV paging, the
per-step token budget, CUDA graphs, CPU threads and the seed. Each command adds its own flags (the
batch cap, the workload, the server's address) and passes its own fields to `engine_config`.
Imports neither torch nor the engine's heavy modules: building the parser stays cheap.
"""
from __future__ import annotations

import argparse
from typing import Any

from engine.config import EngineConfig
from engine.cpu_threads import set_blas_threads


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Add the engine's flags to a command's parser."""
    parser.add_argument("--model", default="cpu-30m", help="preset name or checkpoint directory")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--kv-budget-mb", type=finite_float,
                        help="KV cache size in MiB (default: device)")
    parser.add_argument("--max-batched-tokens", type=positive_int, default=512,
                        help="token budget per step (caps a prefill chunk)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="launch decode steps kernel by kernel (CUDA only; shows what graphs "
                             "save)")
    parser.add_argument("--cpu-threads", type=positive_int,
                        help="BLAS threads for CPU runs (default: one per core; the lab uses one "
                             "fewer)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the preset's random weights and sampling (and run's workload)")


def engine_config(args: argparse.Namespace, **fields: Any) -> EngineConfig:
    """The EngineConfig the engine flags describe, with the command's own `fields` (it validates
    itself: a bad value is a ConfigError)."""
    budget = None if args.kv_budget_mb is None else int(args.kv_budget_mb * 2**20)
    return EngineConfig(model=args.model, device=args.device, seed=args.seed,
                        block_size=args.page_size, kv_budget_bytes=budget,
                        max_num_batched_tokens=args.max_batched_tokens,
                        cuda_graphs=not args.no_cuda_graphs, **fields)


def apply_cpu_threads(args: argparse.Namespace) -> None:
    """Size the process's BLAS threads as `--cpu-threads` asks (an entry point's job)."""
    if args.cpu_threads is not None:
        set_blas_threads(args.cpu_threads)
