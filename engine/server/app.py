"""The HTTP server: routes, start-up on given sockets, and a clean shutdown on SIGTERM.

The handlers (`engine.server.handlers`) run on one asyncio event loop; the engine runs on its own
thread (`EngineLoop`). Why Tornado: see docs/server.md.
"""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from typing import TextIO

import tornado.httpserver
import tornado.netutil
import tornado.web

from engine.llm_engine import LLMEngine
from engine.records import RequestRecord
from engine.server.engine_loop import EngineLoop
from engine.server import lab_routes
from engine.server.handlers import (GenerateHandler, HealthHandler, MetricsHandler,
                                    ModelsHandler, NotFound, ServerState, TokenizeHandler)
from engine.server.prometheus import ServerMetrics
from engine.server.tokenizer import TextCodec


def make_app(state: ServerState, lab: lab_routes.LabRuns | None = None,
             metrics: bool = True) -> tornado.web.Application:
    """The OpenAI routes, /tokenize, /health and (unless `metrics` is False) /metrics; and the
    lab's routes when `lab` is given."""
    args = {"state": state}
    extra = lab_routes.routes(lab) if lab is not None else []
    if metrics:
        extra.append((r"/metrics", MetricsHandler, args))
    return tornado.web.Application(extra + [
        (r"/v1/completions", GenerateHandler, args | {"chat": False}),
        (r"/v1/chat/completions", GenerateHandler, args | {"chat": True}),
        (r"/v1/models", ModelsHandler, args),
        (r"/tokenize", TokenizeHandler, args),
        (r"/health", HealthHandler, args),
    ], default_handler_class=NotFound, default_handler_args=args)


async def shutdown(state: ServerState, server: tornado.httpserver.HTTPServer,
                   grace_s: float, done: asyncio.Event) -> None:
    """SIGTERM: take no new requests, let streams finish for `grace_s`, abort the rest."""
    state.draining = True
    server.stop()
    deadline = time.monotonic() + grace_s
    while state.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for handler in list(state.active):
        handler.abort()  # ends its stream with finish_reason "abort" and [DONE]
    while state.active and time.monotonic() < deadline + 2.0:
        await asyncio.sleep(0.05)
    done.set()


def start(engine: LLMEngine, codec: TextCodec, model: str, sockets: list[socket.socket],
          max_waiting: int, trace_out: TextIO | None = None,
          lab: lab_routes.LabRuns | None = None, metrics_route: bool = True
          ) -> tuple[ServerState, tornado.httpserver.HTTPServer]:
    """Start the engine loop and answer HTTP on `sockets`; call from a running event loop."""
    aio = asyncio.get_running_loop()
    metrics = ServerMetrics(model, engine.config.block_size, engine.num_blocks)

    def write_record(record: RequestRecord) -> None:
        trace_out.write(json.dumps(record.to_json()) + "\n")
        trace_out.flush()

    loop = EngineLoop(engine, metrics, aio.call_soon_threadsafe,
                      write_record if trace_out is not None else None)
    state = ServerState(loop, codec, model, engine.max_len, max_waiting)
    server = tornado.httpserver.HTTPServer(make_app(state, lab, metrics_route))
    server.add_sockets(sockets)
    loop.start()
    return state, server


async def serve(engine: LLMEngine, codec: TextCodec, model: str, host: str, port: int,
                max_waiting: int, grace_s: float, trace_out: TextIO | None,
                lab: lab_routes.LabRuns | None = None, metrics_route: bool = True) -> None:
    """Run until SIGTERM or SIGINT; prints one line with the address once listening."""
    state, server = start(engine, codec, model, tornado.netutil.bind_sockets(port, host),
                          max_waiting, trace_out, lab, metrics_route)
    aio = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        aio.add_signal_handler(sig, lambda: aio.create_task(
            shutdown(state, server, grace_s, done)))
    print(f"serving {model} on http://{host}:{port} ({engine.device_name}, "
          f"{engine.num_blocks} KV blocks of {engine.config.block_size} tokens)",
          file=sys.stderr, flush=True)
    await done.wait()
    state.loop.stop()
    if lab is not None:
        lab.stop()
