"""`python -m engine.bench`: the engine against Hugging Face `generate()` and against the roofline.

Both sides hold the same weights on the same device. Three measurements, in one run:
1. TPOT at batch 1 and 8 (equal prompts, so Hugging Face needs no padding); Hugging Face's from
   the time each step's tokens reach the host within one `generate()` call;
2. throughput on a mixed-length workload: Hugging Face runs static batches, left-padded, each until
   its longest request is done; the engine batches continuously with the same batch cap;
3. the engine's batch-1 TPOT against the decode floor (weights + KV read) / measured bandwidth.
Ratios are engine / Hugging Face. Targets on the CPU default model are listed in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from engine import analytic
from engine.config import ConfigError, EngineConfig
from engine.hf_peer import hf_llama_like
from engine.llm_engine import LLMEngine
from engine.metrics import summarize
from engine.workload import WorkloadSpec, make_requests


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TokenClock:
    """A `generate()` streamer that notes when each new token reaches the host.

    `generate()` hands the prompt to `put` first, then every step's tokens (copied to the host, so
    the device has finished that step). The times of the later calls are the token times.
    """

    def __init__(self) -> None:
        self.prompt_seen = False
        self.token_times: list[float] = []

    def put(self, value) -> None:
        if self.prompt_seen:
            self.token_times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_generate(peer, prompts: list[list[int]], new_tokens: int,
                clocked: bool = True) -> tuple[float, list[float]]:
    """One left-padded `generate()` call producing `new_tokens` per prompt.

    Returns its wall time in seconds and, when `clocked`, the time of each step's tokens from the
    call's start (the clock costs a host copy of each step's tokens, so throughput runs skip it).
    """
    device = next(peer.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    clock = _TokenClock()
    _sync(device)
    t = time.perf_counter()
    peer.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                  streamer=clock if clocked else None)
    _sync(device)
    return time.perf_counter() - t, [s - t for s in clock.token_times]


def hf_generate_s(peer, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for one left-padded `generate()` call producing `new_tokens` per prompt."""
    return hf_generate(peer, prompts, new_tokens, clocked=False)[0]


def hf_tpot_s(peer, prompts: list[list[int]], new_tokens: int) -> float:
    """Hugging Face's TPOT: from its first token to its last, per later token, in one call."""
    if new_tokens < 2:
        raise ValueError("TPOT needs at least two new tokens")
    _, times = hf_generate(peer, prompts, new_tokens)
    if len(times) != new_tokens:
        raise RuntimeError(f"generate() streamed {len(times)} steps, expected {new_tokens}")
    return (times[-1] - times[0]) / (new_tokens - 1)


def tpot_pair(engine: LLMEngine, peer, batch: int, prompt_len: int, output_len: int,
              repeats: int) -> tuple[float, float]:
    """Median TPOT (s) of the engine and of Hugging Face at one batch size."""
    spec = WorkloadSpec(num_requests=batch, prompt_len=prompt_len, output_len=output_len)
    prompts = [r.prompt_ids for r in make_requests(spec, engine.model_config.vocab_size)]
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(summarize(engine.run(spec)).tpot_ms.p50 / 1e3)
        theirs.append(hf_tpot_s(peer, prompts, output_len))
    return statistics.median(ours), statistics.median(theirs)


def mixed_throughput(engine: LLMEngine, peer, spec: WorkloadSpec, batch: int) -> tuple[float, float]:
    """Useful output tokens per second, engine (continuous) and Hugging Face (static batches)."""
    requests = make_requests(spec, engine.model_config.vocab_size)
    useful = sum(r.max_tokens for r in requests)
    trace = engine.run(requests)
    ours = sum(len(r.output_ids) for r in trace.requests) / trace.duration_s
    t = 0.0
    for i in range(0, len(requests), batch):
        group = requests[i:i + batch]
        t += hf_generate_s(peer, [r.prompt_ids for r in group], max(r.max_tokens for r in group))
    return ours, useful / t


def run_bench(model: str, device: str, quick: bool) -> dict:
    repeats = 1 if quick else 3
    output_len = 16 if quick else 64
    engine = LLMEngine(EngineConfig(model=model, device=device, max_num_seqs=8,
                                    max_num_batched_tokens=512))
    log(f"device {engine.device_name}, model {model}")
    probe = analytic.probe(engine.device.type)
    reads = ", ".join(f"{r:.1f}" for r in probe.read_samples_gbs)
    log(f"probe: {probe.bandwidth_gbs:.1f} GB/s (median of {reads}), "
        f"{probe.matmul_tflops:.3f} TFLOP/s")
    peer = hf_llama_like(engine.model)
    prompt_len = 128
    results: dict[str, float] = {}
    for batch in (1, 8):
        ours, theirs = tpot_pair(engine, peer, batch, prompt_len, output_len, repeats)
        results[f"tpot_ms_engine_b{batch}"] = ours * 1e3
        results[f"tpot_ms_hf_b{batch}"] = theirs * 1e3
        log(f"TPOT batch {batch}: engine {ours * 1e3:.2f} ms, HF {theirs * 1e3:.2f} ms")
    mixed = WorkloadSpec(num_requests=8 if quick else 32, prompt_len=32,
                         prompt_len_max=128 if quick else 512, output_len=8 if quick else 16,
                         output_len_max=32 if quick else 256, seed=1)
    ours_tp, hf_tp = mixed_throughput(engine, peer, mixed, batch=8)
    log(f"mixed workload: engine {ours_tp:.1f} tok/s, HF {hf_tp:.1f} tok/s")
    # Floor at batch 1: every weight plus the KV of the mean context, read once per token.
    mean_context = prompt_len + output_len / 2
    kv_read = engine.model_config.kv_bytes_per_token(engine.cache.k.element_size()) * mean_context
    floor = analytic.decode_tpot_floor_s(engine.model.weight_bytes(), int(kv_read),
                                         probe.bandwidth_bytes_s)
    tpot_b1 = results["tpot_ms_engine_b1"] / 1e3
    return {
        "device": engine.device_name,
        "model": model,
        "roofline": {"bandwidth_gbs": probe.bandwidth_gbs, "tpot_floor_ms": floor * 1e3,
                     "tpot_ms": tpot_b1 * 1e3, "ratio": tpot_b1 / floor,
                     "bandwidth_samples_gbs": list(probe.read_samples_gbs)},
        "vs_hf": {"tpot_ratio_b1": results["tpot_ms_engine_b1"] / results["tpot_ms_hf_b1"],
                  "tpot_ratio_b8": results["tpot_ms_engine_b8"] / results["tpot_ms_hf_b8"],
                  "throughput_ratio_mixed": ours_tp / hf_tp},
        "measured": results | {"throughput_tok_s_engine_mixed": ours_tp,
                               "throughput_tok_s_hf_mixed": hf_tp,
                               "matmul_tflops": probe.matmul_tflops},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cpu-30m", help="preset name or checkpoint directory")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        out = run_bench(args.model, args.device, args.quick)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        r, v = out["roofline"], out["vs_hf"]
        print(f"device {out['device']}, model {out['model']}")
        print(f"TPOT batch 1: {r['tpot_ms']:.2f} ms, floor {r['tpot_floor_ms']:.2f} ms "
              f"at {r['bandwidth_gbs']:.1f} GB/s (ratio {r['ratio']:.2f})")
        print(f"engine / HF: TPOT b1 {v['tpot_ratio_b1']:.2f}, TPOT b8 {v['tpot_ratio_b8']:.2f}, "
              f"mixed throughput {v['throughput_ratio_mixed']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
