"""`python -m engine serve` and `python -m engine tokenizer`: their flags and what they do.

`engine.cli` adds these subcommands to its parser; the heavy imports (tornado, tokenizers, the
model) happen only when one of them runs, so `python -m engine run` does not pay for them.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from engine.cli_flags import (add_engine_flags, apply_cpu_threads, engine_config, finite_float,
                              positive_int)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `tokenizer` to `python -m engine`'s subcommands."""
    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_engine_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-num-seqs", type=positive_int, default=8,
                       help="most sequences in one batch")
    serve.add_argument("--max-model-len", type=positive_int,
                       help="longest prompt + output (default: the model's positions)")
    serve.add_argument("--max-waiting", type=positive_int, default=256,
                       help="requests allowed to wait for a batch slot; past it, HTTP 503")
    serve.add_argument("--shutdown-grace-s", type=finite_float, default=10.0,
                       help="on SIGTERM, how long streams may finish before they are aborted")
    serve.add_argument("--trace-out", type=Path,
                       help="append each finished request's record here, one JSON line each")
    serve.add_argument("--no-lab", action="store_true",
                       help="leave out the lab's measured-run routes (/lab/info, /lab/runs)")
    serve.add_argument("--no-metrics", action="store_true",
                       help="leave out GET /metrics, as a deployment without one would")
    serve.set_defaults(main=serve_main)

    tok = sub.add_parser("tokenizer", help="write the tokenizer files a client needs")
    tok.add_argument("--model", default="cpu-30m", help="preset name or checkpoint directory")
    tok.add_argument("--out", type=Path, required=True, help="directory to write into")
    tok.set_defaults(main=tokenizer_main)


def _model_config(model: str):
    """The model's shapes, from a preset or a checkpoint's config.json, without its weights."""
    import json

    from engine.config import preset
    from engine.weights import config_from_hf

    path = Path(model)
    if (path / "config.json").is_file():
        return config_from_hf(json.loads((path / "config.json").read_text()), str(path))
    return preset(model)


def tokenizer_main(args: argparse.Namespace) -> int:
    from engine.server.tokenizer import for_model, write

    for path in write(for_model(args.model, _model_config(args.model)), args.out):
        print(path)
    return 0


def serve_main(args: argparse.Namespace) -> int:
    from engine.llm_engine import LLMEngine
    from engine.server.app import serve
    from engine.server.tokenizer import for_model

    config = engine_config(args, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    apply_cpu_threads(args)
    engine = LLMEngine(config)
    codec = for_model(args.model, engine.model_config)
    lab = None
    if not args.no_lab:
        from engine.server.lab_routes import LabRuns
        lab = LabRuns(device=args.device)
    trace_out = args.trace_out.open("a") if args.trace_out else None
    try:
        asyncio.run(serve(engine, codec, args.model, args.host, args.port, args.max_waiting,
                          args.shutdown_grace_s, trace_out, lab, not args.no_metrics))
    except OSError as err:  # the port is taken, or the address is not this machine's
        print(f"error: cannot listen on {args.host}:{args.port} ({err.strerror})",
              file=sys.stderr)
        return 2
    finally:
        if trace_out is not None:
            trace_out.close()
    return 0
