"""The Hugging Face side of the benchmark, run in a child process that never imports `engine`.

`engine.hf_peer.run_peer` writes DIR (`config.json` for a `LlamaConfig`, `model.safetensors`,
`jobs.json`) and runs this file as a script with DIR as its one argument (`run_child`); the
results go to stdout as one JSON object. Why a separate process: the engine's entry points set
`OMP_WAIT_POLICY=PASSIVE` (see `engine.cpu_threads.quiet_openmp`) and engine runs size torch's
threads for themselves. Hugging Face `generate()` is all torch and was measured slower in the
engine's process (docs/benchmarks.md, "The Hugging Face peer, in-process and in its own process").
Here it gets a process of its own with torch's default threads, as a user of transformers would
run it.

This module imports only torch, safetensors and transformers; tests also import its timing
functions for in-process use.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch


class TokenClock:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    clock = TokenClock()
    _sync(device)
    t = time.perf_counter()
    peer.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                  streamer=clock if clocked else None)
    _sync(device)
    return time.perf_counter() - t, [s - t for s in clock.token_times]


def hf_tpot_s(peer, prompts: list[list[int]], new_tokens: int) -> float:
    """Hugging Face's TPOT: from its first token to its last, per later token, in one call."""
    if new_tokens < 2:
        raise ValueError("TPOT needs at least two new tokens")
    _, times = hf_generate(peer, prompts, new_tokens)
    if len(times) != new_tokens:
        raise RuntimeError(f"generate() streamed {len(times)} steps, expected {new_tokens}")
    return (times[-1] - times[0]) / (new_tokens - 1)


@torch.inference_mode()
def hf_greedy(peer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens for one prompt, exactly max_new_tokens of them."""
    device = next(peer.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out = peer.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                        eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def load_peer(folder: Path, device: str):
    """A `LlamaForCausalLM` from the folder's config.json and model.safetensors."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**json.loads((folder / "config.json").read_text()))
    state = load_file(str(folder / "model.safetensors"))
    dtype = getattr(torch, json.loads((folder / "jobs.json").read_text())["dtype"])
    peer = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    # A tied LM head is not in the file (safetensors stores no shared tensors); tying restores it.
    missing, unexpected = peer.load_state_dict(state, strict=False)
    tied = config.tie_word_embeddings
    missing = [k for k in missing
               if not (k.endswith("rotary_emb.inv_freq") or (k == "lm_head.weight" and tied))]
    if missing or unexpected:
        raise RuntimeError(f"peer weights do not line up: missing {missing}, extra {unexpected}")
    peer.tie_weights()
    return peer.eval()


def run_jobs(peer, jobs: list[dict]) -> list[dict]:
    """Each job is {"tpot": prompts, "new_tokens", "repeats"} (TPOT of each repeat, seconds),
    {"groups": [[prompts, new_tokens], ...]} (seconds for the groups one after the other) or
    {"greedy": prompt, "new_tokens"} (the greedy tokens, to check the weights arrived intact)."""
    results = []
    for job in jobs:
        if "greedy" in job:
            results.append({"tokens": hf_greedy(peer, job["greedy"], job["new_tokens"])})
        elif "tpot" in job:
            results.append({"tpot_s": [hf_tpot_s(peer, job["tpot"], job["new_tokens"])
                                       for _ in range(job["repeats"])]})
        else:
            results.append({"seconds": sum(hf_generate(peer, prompts, n, clocked=False)[0]
                                           for prompts, n in job["groups"])})
    return results


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    spec = json.loads((folder / "jobs.json").read_text())
    peer = load_peer(folder, spec["device"])
    hf_generate(peer, [[1, 2, 3]], 2)  # one-time allocations stay out of the first job
    out = {"results": run_jobs(peer, spec["jobs"]), "torch_threads": torch.get_num_threads(),
           "engine_imported": "engine" in sys.modules,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
