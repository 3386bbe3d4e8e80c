"""One script that checks and measures the CUDA path on a GPU machine, in under five minutes.

    python -m tools.gpu_check --out DIR [--dry-run]

Steps, in order, each inside its own time box and failing soft (the error is recorded, the next
step runs): (a) the Triton kernel tests compiled on CUDA (pytest in a subprocess, from the
repository root); (b) the engine's own device probe (`engine.device_probe.probe`: read bandwidth
and matmul throughput, the figures its floors use); (c) the kernel's achieved bandwidth on long
contexts, against that read bandwidth; (d) pure-decode step time with CUDA graphs on and off,
against the bandwidth floor; (e) `python -m engine.bench`; (f) TPOT against batch and TTFT against
context from `python -m engine run`. Writes
DIR/gpu_check.json and DIR/gpu_check.md. Without CUDA it refuses (exit 2) unless --dry-run, which
runs the same steps on the CPU with tiny sizes (the kernel in triton's interpreter) so that the
script itself stays tested.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.device_probe import probe

ROOT = Path(__file__).resolve().parent.parent  # the repository root: subprocesses run from here
# Numbers worth a table cell: mean latencies, throughputs, ratios (not every percentile).
HEADLINE = re.compile(r"(ttft|tpot|itl)[^.]*(\.mean)?$|throughput|(^|[._])ratio", re.I)


@dataclass(frozen=True)
class Plan:
    """Sizes and time boxes (seconds) of one run: the GPU plan, or the dry run's tiny one."""

    device: str
    total_s: float  # the whole script; each step's box is also cut to what is left of this
    test_filter: str  # pytest -k expression ("" = every kernel test)
    test_box_s: float
    kernel_dtype: torch.dtype
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    page_size: int  # the engine's default page size
    kernel_box_s: float
    bench_box_s: float
    bench_quick: bool  # the benchmark's smoke sizes
    model: str
    output_len: int
    tpot_batches: tuple[int, ...]
    tpot_context: int
    ttft_contexts: tuple[int, ...]
    run_box_s: float  # one `engine run` subprocess
    serving_box_s: float  # all of them together
    graph_batches: tuple[int, ...]  # decode batches timed with CUDA graphs on and off
    graph_context: int  # short, so a step's bytes are mostly weights
    graph_box_s: float


GPU_PLAN = Plan(
    device="cuda", total_s=290, test_filter="",
    test_box_s=100,  # compiling the tests' ~30 kernel variants on a fresh machine takes most of it
    kernel_dtype=torch.bfloat16,
    batches=(1, 4, 16, 64), contexts=(4096, 8192, 16384, 32768), page_size=16, kernel_box_s=40,
    bench_box_s=55, bench_quick=False, model="gpu-1b", output_len=32,
    tpot_batches=(1, 8, 64, 256), tpot_context=512,
    ttft_contexts=(512, 2048, 8192), run_box_s=40, serving_box_s=65,
    graph_batches=(1, 8, 64), graph_context=128, graph_box_s=35)
DRY_PLAN = Plan(
    device="cpu", total_s=75, test_filter="smoke", test_box_s=25, kernel_dtype=torch.float32,
    batches=(1, 2),
    contexts=(40, 100), page_size=16, kernel_box_s=10, bench_box_s=15, bench_quick=True,
    model="tiny", output_len=4,
    tpot_batches=(1, 2), tpot_context=16, ttft_contexts=(32,), run_box_s=8, serving_box_s=15,
    graph_batches=(1, 2), graph_context=16, graph_box_s=10)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of fn after one warm-up call; CUDA events on the GPU, wall clock elsewhere."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a subprocess at the repository root; keep its exit code, JSON output and output tail."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s",
                "cmd": " ".join(cmd[1:])}
    result: dict[str, Any] = {"ok": done.returncode == 0, "returncode": done.returncode,
                              "cmd": " ".join(cmd[1:]), "stdout_tail": done.stdout[-600:]}
    try:
        result["json"] = json.loads(done.stdout)
    except ValueError:
        pass
    if done.returncode != 0:
        result["error"] = (done.stderr.strip() or done.stdout.strip())[-1500:]
    return result


def kernel_tests(plan: Plan, box_s: float) -> dict[str, Any]:
    """(a) pytest on the kernel tests: compiled on CUDA, interpreted in the dry run."""
    env = dict(os.environ)
    if plan.device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "tests/test_triton_kernel.py", "-q", "-p",
           "no:cacheprovider"] + (["-k", plan.test_filter] if plan.test_filter else [])
    result = _run(cmd, box_s, env)
    last_line = (result.get("stdout_tail", "").strip().splitlines() or [""])[-1]
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)", last_line)
    result["counts"] = {word: int(n) for n, word in counts}  # from "3 passed, 1 skipped in 2.0s"
    return result


def device_probe(plan: Plan, box_s: float) -> dict[str, Any]:
    """(b) the engine's device probe: the ceilings the kernel and the engine are held to."""
    del box_s  # a second or two by construction: nothing to cut short
    measured = probe(plan.device)
    return {"device": measured.device, "read_gbs": measured.bandwidth_gbs,
            "matmul_tflops": measured.matmul_tflops,
            "read_samples_gbs": list(measured.read_samples_gbs)}


def _attention_shape(model: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a preset: the kernel is timed at the model's shape."""
    from engine.config import preset
    cfg = preset(model)
    return cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim


def kernel_bandwidth(plan: Plan, box_s: float, read_gbs: float | None) -> dict[str, Any]:
    """(c) bytes of K+V the kernel reads per second, over batch x context, and a few tile shapes."""
    from engine.kernels import triton_paged_attention as tpa
    from engine.kernels.paged_attention import paged_decode_attention_ref
    if not tpa.available():
        raise RuntimeError("triton is not available here")
    deadline = time.monotonic() + box_s
    device = torch.device(plan.device)
    n_heads, n_kv, d_head = _attention_shape(plan.model)
    page = plan.page_size
    num_blocks = max(plan.batches) * math.ceil(max(plan.contexts) / page)
    # One cache serves every point; each point's sequences take a shuffled subset of its pages.
    k_cache = torch.randn(num_blocks, page, n_kv, d_head, device=device, dtype=plan.kernel_dtype)
    v_cache = torch.randn_like(k_cache)  # (num_blocks, page, Hkv, D)
    elem = k_cache.element_size()
    gen = torch.Generator(device="cpu").manual_seed(0)

    def measure(batch: int, context: int, **kwargs: Any) -> dict[str, Any]:
        per_seq = math.ceil(context / page)
        tables = torch.randperm(num_blocks, generator=gen)[:batch * per_seq]
        tables = tables.reshape(batch, per_seq).to(device=device, dtype=torch.int32)  # (B, pages)
        lens = torch.full((batch,), context, device=device, dtype=torch.int32)  # (B,)
        q = torch.randn(batch, n_heads, d_head, device=device,
                        dtype=plan.kernel_dtype)  # (B, Hq, D)
        args = (q, k_cache, v_cache, tables, lens, d_head ** -0.5)
        seconds = _timed(lambda: tpa.paged_decode_attention_triton(*args, **kwargs), device, 5)
        gbs = 2 * batch * context * n_kv * d_head * elem / seconds / 1e9  # K and V, each read once
        row = {"batch": batch, "context": context, "ms": seconds * 1e3, "gbs": gbs,
               "pct_of_read": 100 * gbs / read_gbs if read_gbs else None,
               "splits": tpa.split_plan(batch, n_kv, per_seq * page, device, **kwargs)[0]}
        if batch * context <= 1 << 18:  # the reference gathers a copy of the cache: keep it small
            err = tpa.paged_decode_attention_triton(*args, **kwargs).float()
            err -= paged_decode_attention_ref(*args).float()
            row["max_abs_err"] = err.abs().max().item()
        return row

    # Tile shapes, and split-K against no split, at both ends: one long sequence, a full batch.
    cuda = plan.device == "cuda"
    tiles = [tpa.TileConfig(), tpa.TileConfig(32, 4, 3), tpa.TileConfig(128, 4, 2),
             tpa.TileConfig(64, 8, 3)] if cuda else [tpa.TileConfig()]
    points = ([("rows", b, c, {}) for b in plan.batches for c in plan.contexts]
              + [("sweep", b, max(plan.contexts), {"tile": t, "num_splits": n})
                 for b in (min(plan.batches), max(plan.batches)) for t in tiles
                 for n in ((None, 1) if cuda else (None,))])
    result: dict[str, Any] = {"shape": [n_heads, n_kv, d_head], "page_size": page,
                              "dtype": str(plan.kernel_dtype).removeprefix("torch."),
                              "rows": [], "sweep": [], "truncated": False}
    for table, batch, context, kwargs in points:
        if time.monotonic() > deadline:
            result["truncated"] = True
            break
        row = measure(batch, context, **kwargs)
        if "tile" in kwargs:
            tile = kwargs["tile"]
            row["tile"] = [tile.block_n, tile.num_warps, tile.num_stages]
        result[table].append(row)
    return result


def decode_graphs(plan: Plan, box_s: float, read_gbs: float | None) -> dict[str, Any]:
    """(d) median pure-decode step time (each sequence's TPOT) at a few batches, CUDA graphs on
    and off, one loaded model for every engine; the floor is a step's bytes over read bandwidth."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.weights import load_model
    from engine.workload import WorkloadSpec
    deadline = time.monotonic() + box_s
    device = torch.device(plan.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(plan.model, 0, device, dtype)
    per_token = model.config.kv_bytes_per_token(torch.finfo(dtype).bits // 8)
    context, output = plan.graph_context, plan.output_len
    result: dict[str, Any] = {"model": plan.model, "context": context, "output_len": output,
                              "rows": [], "truncated": False}
    for batch in plan.graph_batches:
        row: dict[str, Any] = {"batch": batch}
        for graphs in (True, False):
            if time.monotonic() > deadline:
                result["truncated"] = True
                break
            # Every prompt in one step, so every later step decodes the whole batch.
            engine = LLMEngine(EngineConfig(
                model=plan.model, device=plan.device, max_num_seqs=batch, cuda_graphs=graphs,
                max_num_batched_tokens=max(512, batch * context),
                kv_budget_bytes=2 * batch * (context + output) * per_token), model=model)
            if graphs:
                row["graphs_used"] = engine.graphs is not None  # False off CUDA or without triton
            trace = engine.run(WorkloadSpec(num_requests=batch, prompt_len=context,
                                            output_len=output))
            times = [s.duration_s for s in trace.steps
                     if not s.prefill_tokens and s.decode_seqs == batch]
            row["graphs_ms" if graphs else "eager_ms"] = 1e3 * statistics.median(times)
            del engine, trace
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "eager_ms" in row:
            row["speedup"] = row["eager_ms"] / row["graphs_ms"]
        if read_gbs and "graphs_ms" in row:
            step_bytes = model.weight_bytes() + batch * (context + output / 2) * per_token
            row["floor_ms"] = 1e3 * step_bytes / (read_gbs * 1e9)
            row["graphs_over_floor"] = row["graphs_ms"] / row["floor_ms"]
        result["rows"].append(row)
    return result


def bench(plan: Plan, box_s: float) -> dict[str, Any]:
    """(e) the engine's own benchmark, as a subprocess."""
    return _run([sys.executable, "-m", "engine.bench", "--json", "--device", plan.device,
                 "--model", plan.model] + (["--quick"] if plan.bench_quick else []), box_s)


def serving(plan: Plan, box_s: float) -> dict[str, Any]:
    """(f) TPOT against batch and TTFT against context, one `engine run` subprocess per point."""
    deadline = time.monotonic() + box_s
    points = ([("tpot_vs_batch", b, plan.tpot_context) for b in plan.tpot_batches]
              + [("ttft_vs_context", 1, c) for c in plan.ttft_contexts])
    result: dict[str, Any] = {"tpot_vs_batch": [], "ttft_vs_context": []}
    for sweep, batch, context in points:
        left = deadline - time.monotonic()
        if left < 1:
            run = {"ok": False, "error": "skipped: the step's time box ran out"}
        else:
            run = _run([sys.executable, "-m", "engine", "run", "--model", plan.model, "--device",
                        plan.device, "--batch", str(batch), "--context", str(context), "--output",
                        str(plan.output_len), "--json"], min(plan.run_box_s, left))
        if isinstance(run.get("json"), dict):  # per-request and per-step records would bloat it
            run["json"] = {k: v for k, v in run["json"].items() if k not in ("requests", "steps")}
        run.pop("stdout_tail", None)
        result[sweep].append({"batch": batch, "context": context,
                              "metrics": _headline(run.get("json")), **run})
    result["ok"] = all(r["ok"] for s in ("tpot_vs_batch", "ttft_vs_context") for r in result[s])
    return result


def _headline(obj: Any, prefix: str = "") -> dict[str, float]:
    """Mean latencies and throughput from a JSON result whose schema this script does not own."""
    found: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix and prefix != "summary" else str(key)
            if isinstance(value, dict):
                found.update(_headline(value, name))
            elif (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and HEADLINE.search(name)):
                found[name] = value
    return dict(list(found.items())[:12])


def _step(report: dict[str, Any], name: str, fn: Callable[[float], dict[str, Any]],
          box_s: float, end: float) -> None:
    """Run one step inside min(its box, what is left), recording its result or its error."""
    t0 = time.monotonic()
    try:
        result = fn(max(1.0, min(box_s, end - t0)))
        result.setdefault("ok", True)
    except Exception as exc:  # fail soft: one broken step must not hide the others' numbers
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.monotonic() - t0, 2)
    report[name] = result
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cell(value: Any) -> str:
    """One markdown table cell: numbers rounded, errors cut to their first line."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    text = str(value if value is not None else "-").strip().splitlines()
    return (text[-1] if text else "-")[:160].replace("|", "\\|")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows] + [""]


def _failed(result: dict[str, Any]) -> list[str]:
    return [] if result.get("ok") else [f"Failed: `{_cell(result.get('error'))}`", ""]


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables, one section per step."""
    meta = report["meta"]
    out = ["# GPU check", "",
           f"Device: {meta['device_name']}; torch {meta['torch']} (CUDA {meta['cuda']}); "
           f"triton {meta['triton']}; dry run: {meta['dry_run']}; {meta['seconds']} s in all.", ""]
    tests = report["kernel_tests"]
    out += ["## (a) Kernel tests", ""] + _table(
        ["ok", "passed", "failed", "skipped", "seconds"],
        [[tests["ok"], *(tests["counts"].get(k, 0) if "counts" in tests else "-"
                         for k in ("passed", "failed", "skipped")), tests["seconds"]]])
    out += _failed(tests)
    dev = report["device_probe"]
    out += ["## (b) Device probe (engine.device_probe)", ""] + _table(
        ["device", "read GB/s", "matmul TFLOP/s"],
        [[dev.get("device"), dev.get("read_gbs"), dev.get("matmul_tflops")]])
    out += _failed(dev)
    kern = report["kernel_bandwidth"]
    cols = ["batch", "context", "splits", "ms", "gbs", "pct_of_read"]
    out += ["## (c) Kernel bandwidth (K+V bytes read / time)", "",
            f"Heads (Hq, Hkv, D): {kern.get('shape')}; {kern.get('dtype')}; page size "
            f"{kern.get('page_size')}; truncated: {kern.get('truncated')}.", ""]
    out += _table(cols + ["max_abs_err"], [[r.get(c) for c in cols + ["max_abs_err"]]
                                           for r in kern.get("rows", [])])
    out += _table(["tile (block_n, warps, stages)"] + cols,
                  [[r["tile"]] + [r.get(c) for c in cols] for r in kern.get("sweep", [])])
    out += _failed(kern)
    graphs = report["decode_graphs"]
    cols = ["batch", "graphs_used", "graphs_ms", "eager_ms", "speedup", "floor_ms",
            "graphs_over_floor"]
    out += ["## (d) Decode graphs: pure-decode step time, CUDA graphs on and off", "",
            f"Model {graphs.get('model')}; prompt {graphs.get('context')}, output "
            f"{graphs.get('output_len')}; floor = (weights + KV read) / read bandwidth; "
            f"truncated: {graphs.get('truncated')}.", ""]
    out += _table(cols, [[r.get(c) for c in cols] for r in graphs.get("rows", [])])
    out += _failed(graphs)
    b = report["bench"]
    out += ["## (e) engine.bench", ""] + _table(["ok", "metric", "value"], [
        [b["ok"], k, v] for k, v in _headline(b.get("json")).items()] or [[b["ok"], "-", "-"]])
    out += _failed(b)
    serve = report["serving"]
    out += ["## (f) Serving: TPOT vs batch, TTFT vs context", ""]
    for sweep in ("tpot_vs_batch", "ttft_vs_context"):
        rows = [[sweep, r["batch"], r["context"], r["ok"],
                 "; ".join(f"{k}={_cell(v)}" for k, v in r.get("metrics", {}).items())
                 or r.get("error")] for r in serve.get(sweep, [])]
        out += _table(["sweep", "batch", "context", "ok", "metrics or error"], rows)
    return "\n".join(out + _failed(serve))


def _versions() -> dict[str, Any]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.cuda.is_available()
    return {"device_name": torch.cuda.get_device_name() if cuda else "CPU (no CUDA)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    """Run every step, write DIR/gpu_check.json and DIR/gpu_check.md; 2 when there is no GPU."""
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json/.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step on the CPU with tiny sizes (tests the script itself)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_check: no CUDA device here; pass --dry-run to exercise the script on the CPU",
              file=sys.stderr)
        return 2
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if plan.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is first built, which is later
    start = time.monotonic()
    end = start + plan.total_s
    report: dict[str, Any] = {"meta": {**_versions(), "dry_run": args.dry_run,
                                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "plan": plan.__dict__}}
    _step(report, "kernel_tests", lambda box: kernel_tests(plan, box), plan.test_box_s, end)
    _step(report, "device_probe", lambda box: device_probe(plan, box), 30, end)
    read_gbs = report["device_probe"].get("read_gbs")
    _step(report, "kernel_bandwidth", lambda box: kernel_bandwidth(plan, box, read_gbs),
          plan.kernel_box_s, end)
    _step(report, "decode_graphs", lambda box: decode_graphs(plan, box, read_gbs),
          plan.graph_box_s, end)
    _step(report, "bench", lambda box: bench(plan, box), plan.bench_box_s, end)
    _step(report, "serving", lambda box: serving(plan, box), plan.serving_box_s, end)
    steps = ("kernel_tests", "device_probe", "kernel_bandwidth", "decode_graphs", "bench",
             "serving")
    report["meta"]["seconds"] = round(time.monotonic() - start, 1)
    report["meta"]["all_ok"] = all(report[s]["ok"] for s in steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(to_markdown(report))
    print(f"gpu_check: {', '.join(s + (' ok' if report[s]['ok'] else ' FAILED') for s in steps)}; "
          f"wrote {args.out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
