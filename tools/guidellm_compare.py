"""GuideLLM's medians beside the engine's own records of the same run (docs/benchmarks.md).

    python tools/guidellm_compare.py GUIDELLM.json TRACE.jsonl

GUIDELLM.json is what `guidellm run --output kind=json,path=...` wrote; TRACE.jsonl is what
`python -m engine serve --trace-out` appended while GuideLLM ran, one request record a line.
Definitions differ by name, not by substance: GuideLLM's ITL is per request
(latency - TTFT) / (output tokens - 1), which is vLLM's (and this engine's) TPOT, and GuideLLM's
TPOT divides the whole latency by the output tokens. So the engine's TPOT is set against
GuideLLM's ITL, and the engine's pooled ITL (every gap between two tokens) is shown for reference.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from engine.metrics import tpot_s, ttft_s
from engine.records import RequestRecord


def guidellm_rows(path: str) -> list[dict]:
    rows = []
    for bench in json.load(open(path))["benchmarks"]:
        m = bench["metrics"]
        rows.append({
            "strategy": bench["config"]["strategy"].get("type_", "?"),
            "rate": bench["config"]["strategy"].get("rate"),
            "requests": m["request_totals"]["successful"],
            "ttft_ms": m["time_to_first_token_ms"]["successful"]["median"],
            "itl_ms": m["inter_token_latency_ms"]["successful"]["median"],
            "req_s": m["requests_per_second"]["successful"]["mean"],
            "out_tok_s": m["output_tokens_per_second"]["successful"]["mean"],
        })
    return rows


def engine_row(path: str) -> dict:
    records = [RequestRecord(**json.loads(line)) for line in open(path) if line.strip()]
    return {"requests": len(records),
            "ttft_ms": 1e3 * float(np.median([ttft_s(r) for r in records])),
            "tpot_ms": 1e3 * float(np.median([tpot_s(r) for r in records
                                              if len(r.output_ids) > 1])),
            "itl_pooled_ms": 1e3 * float(np.median([b - a for r in records for a, b in
                                                    zip(r.token_times_s, r.token_times_s[1:])]))}


def main(argv: list[str]) -> int:
    gl, trace = argv
    rows = guidellm_rows(gl)
    for row in rows:
        print("guidellm " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items()))
    eng = engine_row(trace)
    print("engine   " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in eng.items()))
    if len(rows) == 1:
        g = rows[0]
        print(f"TTFT p50: guidellm {g['ttft_ms']:.1f} ms, engine {eng['ttft_ms']:.1f} ms "
              f"({g['ttft_ms'] / eng['ttft_ms'] - 1:+.1%})")
        print(f"ITL p50 (per request, vLLM's TPOT): guidellm {g['itl_ms']:.1f} ms, engine "
              f"{eng['tpot_ms']:.1f} ms ({g['itl_ms'] / eng['tpot_ms'] - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
