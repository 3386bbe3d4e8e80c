"""llama.cpp's side of `engine.bench_llamacpp`, run in a child process that never imports `engine`.

`engine.bench_llamacpp` writes DIR (`model.gguf` from `engine.gguf_export`, and `jobs.json`) and
runs this file as a script with DIR as its one argument (`engine.hf_peer.run_child`); one JSON
object goes to stdout. A process of its own because the engine's entry points set
`OMP_WAIT_POLICY=PASSIVE`, which llama.cpp's OpenMP threads would obey too; here llama.cpp runs as
a user would run it, with one thread per core unless told otherwise. Imports only numpy and
`llama_cpp` (the `llamacpp` extra).

Token ids go in and come out directly (the GGUF's vocabulary is a placeholder); sampling is
greedy, by argmax over the last position's logits, as the engine's is.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated position, read in place: (vocab,). (`Llama.eval` keeps
    logits only when every position's are asked for, which would cost a copy per position.)"""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                 shape=(llm.n_vocab(),))


def greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float], float]:
    """Greedy tokens after `prompt` from an empty cache; returns the tokens, the time each became
    known (seconds from the start of the prompt) and the prompt's evaluation time."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tokens = [int(np.argmax(last_logits(llm)))]
    times = [time.perf_counter() - t0]
    while len(tokens) < new_tokens:
        llm.eval(tokens[-1:])
        tokens.append(int(np.argmax(last_logits(llm))))
        times.append(time.perf_counter() - t0)
    return tokens, times, times[0]


def main(argv: list[str]) -> int:
    from llama_cpp import GGML_TYPE_F32, Llama

    folder = Path(argv[0])
    spec = json.loads((folder / "jobs.json").read_text())
    threads = spec.get("threads") or len(os.sched_getaffinity(0))
    llm = Llama(model_path=str(folder / "model.gguf"), n_ctx=spec["n_ctx"], n_batch=512,
                n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,  # an f32 cache, as the engine's
                logits_all=False, verbose=False)
    greedy(llm, spec["tpot_prompt"][:8], 2)  # one-time allocations stay out of the timings
    matches = [greedy(llm, p, n)[0] for p, n in spec["greedy"]]
    tpot, prefill = [], []
    for _ in range(spec["repeats"]):
        _, times, first = greedy(llm, spec["tpot_prompt"], spec["new_tokens"])
        tpot.append((times[-1] - times[0]) / (len(times) - 1))
        prefill.append(len(spec["tpot_prompt"]) / first)
    print(json.dumps({"greedy": matches, "tpot_s": tpot, "prefill_tok_s": prefill,
                      "threads": threads, "engine_imported": "engine" in sys.modules,
                      "llama_cpp_version": sys.modules["llama_cpp"].__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
