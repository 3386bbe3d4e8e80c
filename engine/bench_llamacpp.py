"""`python -m engine.bench_llamacpp`: the engine beside llama.cpp on the CPU, same weights.

llama.cpp is what a user would pick for CPU inference, so it is the anchor for the engine's CPU
figures. The engine's model goes to an f32 GGUF (`engine.gguf_export`); llama.cpp, through
`llama-cpp-python` (the `llamacpp` extra, built from source), runs in a child process that never
imports `engine` (`engine/llamacpp_child.py`). Measured on both sides:
- greedy tokens for a few prompts, which must match (they check the export, rotary layout included);
- TPOT at batch 1 (prompt 128, 64 new tokens; first to last token, per later token);
- prefill speed: prompt tokens / time to the first token, for the same 128-token prompt.
"""
from __future__ import annotations

if __name__ == "__main__":  # run as a program: before torch loads (see cpu_threads.quiet_openmp)
    from engine.cpu_threads import quiet_openmp

    quiet_openmp()

import argparse  # noqa: E402  (after quiet_openmp, on purpose; the same below)
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from engine.bench import bench_main  # noqa: E402
from engine.config import ConfigError, EngineConfig  # noqa: E402
from engine.cpu_threads import set_blas_threads  # noqa: E402
from engine.gguf_export import write_gguf  # noqa: E402
from engine.hf_peer import plain_state, run_child  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.metrics import summarize  # noqa: E402
from engine.workload import WorkloadSpec, make_requests  # noqa: E402

CHILD = Path(__file__).with_name("llamacpp_child.py")


def run_llamacpp(engine: LLMEngine, jobs: dict, timeout_s: float = 1800) -> dict:
    """Export the engine's weights to GGUF and run `jobs` on them in the llama.cpp child."""
    state = {k: v.float().numpy() for k, v in plain_state(engine.model).items()}
    with tempfile.TemporaryDirectory(prefix="llamacpp-") as tmp:
        folder = Path(tmp)
        write_gguf(folder / "model.gguf", state, engine.model_config)
        (folder / "jobs.json").write_text(json.dumps(jobs))
        return run_child(CHILD, folder, timeout_s)  # llama.cpp's OpenMP threads get its defaults


def run(model: str, quick: bool, threads: int | None = None) -> dict:
    repeats = 1 if quick else 3
    new_tokens = 16 if quick else 64
    if threads is not None:  # both sides on the same number of threads
        set_blas_threads(threads)
    engine = LLMEngine(EngineConfig(model=model, device="cpu", max_num_seqs=8))
    vocab = engine.model_config.vocab_size
    checks = make_requests(WorkloadSpec(num_requests=3, prompt_len=24, output_len=12, seed=7),
                           vocab)
    tpot_spec = WorkloadSpec(num_requests=1, prompt_len=128, output_len=new_tokens, seed=11)
    tpot_prompt = make_requests(tpot_spec, vocab)[0].prompt_ids
    theirs = run_llamacpp(engine, {
        "n_ctx": 256, "threads": threads, "repeats": repeats, "new_tokens": new_tokens,
        "tpot_prompt": tpot_prompt, "greedy": [[r.prompt_ids, r.max_tokens] for r in checks]})
    ours_tokens = {r.id: r.output_ids for r in engine.run(checks).requests}
    matches = [ours_tokens[r.id] == tokens for r, tokens in zip(checks, theirs["greedy"])]
    summaries = [summarize(engine.run(tpot_spec)) for _ in range(repeats)]
    return {
        "model": model, "device": engine.device_name, "llama_cpp": theirs["llama_cpp_version"],
        "llama_cpp_threads": theirs["threads"],
        "greedy_match": matches, "engine_tokens": [ours_tokens[r.id] for r in checks],
        "llama_cpp_tokens": theirs["greedy"],
        "tpot_ms": {"engine": statistics.median(s.tpot_ms.p50 for s in summaries),
                    "llama_cpp": statistics.median(theirs["tpot_s"]) * 1e3},
        "prefill_tok_s": {"engine": statistics.median(128 / (s.ttft_ms.p50 / 1e3)
                                                      for s in summaries),
                          "llama_cpp": statistics.median(theirs["prefill_tok_s"])},
    }


def summary_lines(out: dict) -> list[str]:
    """The readable form of `run`'s result."""
    t, p = out["tpot_ms"], out["prefill_tok_s"]
    return [f"model {out['model']}, engine on {out['device']}, llama.cpp {out['llama_cpp']} on "
            f"{out['llama_cpp_threads']} threads",
            f"greedy tokens match: {out['greedy_match']}",
            f"TPOT batch 1: engine {t['engine']:.2f} ms, llama.cpp {t['llama_cpp']:.2f} ms",
            f"prefill (128 tokens): engine {p['engine']:.0f} tok/s, llama.cpp "
            f"{p['llama_cpp']:.0f} tok/s"]


def run_if_installed(args: argparse.Namespace) -> dict:
    """`run`, once the `llamacpp` extra is known to be installed."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"{err.name} is not installed; pip install -e '.[llamacpp]'") from None
    return run(args.model, args.quick, args.threads)


def main(argv: list[str] | None = None) -> int:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--threads", type=int,
                            help="threads for llama.cpp and the engine (default: one per core)")

    return bench_main(argv, "python -m engine.bench_llamacpp", __doc__.split("\n")[0],
                      "16 new tokens, one repeat", flags, run_if_installed, summary_lines)


if __name__ == "__main__":
    sys.exit(main())
