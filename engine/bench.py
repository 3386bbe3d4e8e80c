"""`python -m engine.bench`: the engine against the roofline and against Hugging Face `generate()`.

Both sides hold the same weights on the same device. Four measurements, in one run:
1. a sweep of TPOT and output throughput over batch 1 to 32 (context 128, all requests at t=0),
   each beside max(bandwidth floor, compute floor);
2. TPOT at batch 1 and 8 against Hugging Face (equal prompts, so it needs no padding); its TPOT is
   read from the time each step's tokens reach the host within one `generate()` call;
3. throughput on a mixed-length workload: Hugging Face runs static batches, left-padded, each until
   its longest request is done; the engine batches continuously with the same batch cap;
4. the engine's batch-1 TPOT against the decode floor (weights + KV read) / measured bandwidth.
Hugging Face runs in a child process that never imports `engine` (`engine.hf_peer.run_peer`), with
torch's default threads. Ratios are engine / Hugging Face. Targets on the CPU default model are
listed in docs/benchmarks.md.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a program: before torch loads (see cpu_threads.quiet_openmp)
    from engine.cpu_threads import quiet_openmp

    quiet_openmp()

import argparse  # noqa: E402  (after quiet_openmp, on purpose; the same below)
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402

from engine import analytic, device_probe  # noqa: E402
from engine.config import ConfigError, EngineConfig  # noqa: E402
from engine.hf_peer import run_peer  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.metrics import summarize  # noqa: E402
from engine.workload import Request, WorkloadSpec, make_requests  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def equal_prompts(batch: int, prompt_len: int, output_len: int) -> WorkloadSpec:
    """`batch` requests of equal length, all at t=0 (Hugging Face then needs no padding)."""
    return WorkloadSpec(num_requests=batch, prompt_len=prompt_len, output_len=output_len)


def sweep_entry(engine: LLMEngine, probe: analytic.DeviceProbe, batch: int, prompt_len: int,
                output_len: int, repeats: int) -> dict[str, float]:
    """TPOT and output throughput at one batch (medians of `repeats` runs), beside both floors.

    The bandwidth floor counts every weight plus the KV of the batch's mean context, read once per
    step; the compute floor, each sequence's token through every layer's matrices and the LM head
    at 2 FLOPs a weight, at the probe's matmul rate."""
    spec = equal_prompts(batch, prompt_len, output_len)
    summaries = [summarize(engine.run(spec)) for _ in range(repeats)]
    kv_read = (engine.model_config.kv_bytes_per_token(engine.cache.k.element_size())
               * batch * (prompt_len + output_len / 2))
    bandwidth_floor = analytic.decode_tpot_floor_s(engine.model.weight_bytes(), int(kv_read),
                                                   probe.bandwidth_bytes_s)
    cfg = engine.model_config
    compute_floor = (2 * batch * (analytic.layer_params(cfg) + analytic.head_params(cfg))
                     / probe.flops_per_s)
    tpot = statistics.median(s.tpot_ms.p50 for s in summaries)
    return {"batch": batch, "tpot_ms": tpot,
            "floor_ms": max(bandwidth_floor, compute_floor) * 1e3,
            "bandwidth_floor_ms": bandwidth_floor * 1e3, "compute_floor_ms": compute_floor * 1e3,
            "ratio": tpot / (max(bandwidth_floor, compute_floor) * 1e3),
            "throughput_tok_s": statistics.median(s.throughput_tok_s for s in summaries)}


def peer_jobs(engine: LLMEngine, batches: tuple[int, ...], prompt_len: int, output_len: int,
              repeats: int, mixed: list[Request], mixed_batch: int) -> list[dict]:
    """What the Hugging Face child runs: TPOT at each batch, then the mixed workload in static
    batches of `mixed_batch`, left-padded, each until its longest request is done."""
    vocab = engine.model_config.vocab_size
    jobs: list[dict] = [
        {"tpot": [r.prompt_ids for r in make_requests(
            equal_prompts(b, prompt_len, output_len), vocab)],
         "new_tokens": output_len, "repeats": repeats} for b in batches]
    groups = [mixed[i:i + mixed_batch] for i in range(0, len(mixed), mixed_batch)]
    jobs.append({"groups": [[[r.prompt_ids for r in g], max(r.max_tokens for r in g)]
                            for g in groups]})
    return jobs


SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)


def run_bench(model: str, device: str, quick: bool) -> dict:
    repeats = 1 if quick else 3
    output_len = 16 if quick else 64
    prompt_len = 128
    mixed_batch = 8
    # The sweep's token budget fits every prompt of the largest batch into the first step, so
    # that TPOT times decode steps only, as the floors do. (With a budget of 512, batch 32's
    # prompts take eight steps, and the decodes of the first requests wait behind seven of them.)
    engine = LLMEngine(EngineConfig(model=model, device=device, max_num_seqs=max(SWEEP_BATCHES),
                                    max_num_batched_tokens=max(SWEEP_BATCHES) * prompt_len))
    # The mixed workload's batch cap matches Hugging Face's static batches; same weights.
    capped = LLMEngine(replace(engine.config, max_num_seqs=mixed_batch, max_num_batched_tokens=512),
                       model=engine.model)
    log(f"device {engine.device_name}, model {model}")
    probe = device_probe.probe(engine.device.type)
    reads = ", ".join(f"{r:.1f}" for r in probe.read_samples_gbs)
    log(f"probe: {probe.bandwidth_gbs:.1f} GB/s (median of {reads}), "
        f"{probe.matmul_tflops:.3f} TFLOP/s")
    sweep = []
    for batch in SWEEP_BATCHES:
        sweep.append(sweep_entry(engine, probe, batch, prompt_len, output_len, repeats))
        e = sweep[-1]
        log(f"sweep batch {batch}: TPOT {e['tpot_ms']:.2f} ms, floor {e['floor_ms']:.2f} ms "
            f"(ratio {e['ratio']:.2f}), {e['throughput_tok_s']:.0f} tok/s")
    by_batch = {e["batch"]: e for e in sweep}
    results = {f"tpot_ms_engine_b{b}": by_batch[b]["tpot_ms"] for b in (1, 8)}
    mixed_spec = WorkloadSpec(num_requests=8 if quick else 32, prompt_len=32,
                              prompt_len_max=128 if quick else 512, output_len=8 if quick else 16,
                              output_len_max=32 if quick else 256, seed=1)
    mixed = make_requests(mixed_spec, engine.model_config.vocab_size)
    trace = capped.run(mixed)
    ours_tp = sum(len(r.output_ids) for r in trace.requests) / trace.duration_s
    log("Hugging Face peer: a child process with torch's default threads")
    peer = run_peer(engine.model, peer_jobs(engine, (1, 8), prompt_len, output_len, repeats,
                                            mixed, mixed_batch))
    for batch, job in zip((1, 8), peer["results"]):
        results[f"tpot_ms_hf_b{batch}"] = statistics.median(job["tpot_s"]) * 1e3
        log(f"TPOT batch {batch}: engine {results[f'tpot_ms_engine_b{batch}']:.2f} ms, "
            f"HF {results[f'tpot_ms_hf_b{batch}']:.2f} ms")
    hf_tp = sum(r.max_tokens for r in mixed) / peer["results"][-1]["seconds"]
    log(f"mixed workload: engine {ours_tp:.1f} tok/s, HF {hf_tp:.1f} tok/s")
    b1 = sweep[0]
    return {
        "device": engine.device_name,
        "model": model,
        "roofline": {"bandwidth_gbs": probe.bandwidth_gbs,
                     "tpot_floor_ms": b1["bandwidth_floor_ms"],
                     "tpot_ms": b1["tpot_ms"], "ratio": b1["tpot_ms"] / b1["bandwidth_floor_ms"],
                     "bandwidth_samples_gbs": list(probe.read_samples_gbs)},
        "sweep": sweep,
        "vs_hf": {"tpot_ratio_b1": results["tpot_ms_engine_b1"] / results["tpot_ms_hf_b1"],
                  "tpot_ratio_b8": results["tpot_ms_engine_b8"] / results["tpot_ms_hf_b8"],
                  "throughput_ratio_mixed": ours_tp / hf_tp},
        "measured": results | {"throughput_tok_s_engine_mixed": ours_tp,
                               "throughput_tok_s_hf_mixed": hf_tp,
                               "matmul_tflops": probe.matmul_tflops,
                               "hf_torch_threads": peer["torch_threads"]},
    }


def bench_main(argv: list[str] | None, prog: str, description: str, quick_help: str,
               add_flags: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace], dict],
               lines: Callable[[dict], list[str]]) -> int:
    """The benchmarks' shared command line: --model, --quick, --json and the flags `add_flags`
    adds; prints `run`'s result as one JSON object or as `lines`. A ConfigError is one line on
    stderr and exit code 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", default="cpu-30m", help="preset name or checkpoint directory")
    add_flags(parser)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        out = run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out) if args.json else "\n".join(lines(out)))
    return 0


def summary_lines(out: dict) -> list[str]:
    """The readable form of `run_bench`'s result."""
    r, v = out["roofline"], out["vs_hf"]
    return ([f"device {out['device']}, model {out['model']}",
             f"TPOT batch 1: {r['tpot_ms']:.2f} ms, floor {r['tpot_floor_ms']:.2f} ms "
             f"at {r['bandwidth_gbs']:.1f} GB/s (ratio {r['ratio']:.2f})"]
            + [f"batch {e['batch']:2d}: TPOT {e['tpot_ms']:6.2f} ms, "
               f"floor {e['floor_ms']:6.2f} ms (ratio {e['ratio']:.2f}), "
               f"{e['throughput_tok_s']:7.1f} output tok/s" for e in out["sweep"]]
            + [f"engine / HF: TPOT b1 {v['tpot_ratio_b1']:.2f}, TPOT b8 {v['tpot_ratio_b8']:.2f}, "
               f"mixed throughput {v['throughput_ratio_mixed']:.2f}x"])


def main(argv: list[str] | None = None) -> int:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    return bench_main(argv, "python -m engine.bench", __doc__.split("\n")[0],
                      "small sizes, one repeat (a smoke run)", flags,
                      lambda args: run_bench(args.model, args.device, args.quick), summary_lines)


if __name__ == "__main__":
    sys.exit(main())
