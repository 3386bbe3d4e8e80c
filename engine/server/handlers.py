"""The HTTP handlers: the OpenAI routes, /v1/models, /health and /metrics.

Everything here runs on the server's asyncio event loop: parsing and tokenizing a request, turning
tokens back into text, writing server-sent events. Tokens come from the engine's thread
(`EngineLoop`) through `loop.call_soon_threadsafe` and wait in a per-request asyncio queue, so a
slow or vanished client never holds up a step.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import tornado.web
from tornado.iostream import StreamClosedError

from engine.server import protocol
from engine.server.engine_loop import EngineLoop
from engine.server.tokenizer import TextCodec

ERROR_TYPES = {404: "NotFoundError", 405: "MethodNotAllowedError", 500: "InternalServerError"}
CLOSED = object()  # put in a request's queue when its client went away or the server aborts it


@dataclass
class ServerState:
    """What every handler shares: the engine loop, the tokenizer, the model's names, limits."""

    loop: EngineLoop
    codec: TextCodec
    model: str  # the id clients name (`data[0].id`); also its `root`
    max_len: int
    max_waiting: int  # requests queued past this get 503
    draining: bool = False  # SIGTERM came: no new requests
    active: set = field(default_factory=set)  # handlers with a request in the engine


class Detokenizer:
    """Text of a growing list of ids, handed out as deltas; a cut UTF-8 character waits a token.

    Each call decodes a short window, not the whole output: the tokens of the previous delta (as
    context, since some tokenizers drop a leading space when a piece is decoded alone) and the
    new ones. The delta is what the new ones add to the window's text.
    """

    def __init__(self, codec: TextCodec) -> None:
        self.codec = codec
        self.ids: list[int] = []
        self.start = 0  # window start: the first token of the last delta
        self.sent = 0  # tokens whose text has been handed out

    def add(self, ids: list[int], final: bool) -> str:
        self.ids += ids
        before = self.codec.decode(self.ids[self.start:self.sent])
        text = self.codec.decode(self.ids[self.start:])
        if text.endswith("\ufffd") and not final:  # a byte token that starts a character
            return ""
        self.start, self.sent = self.sent, len(self.ids)
        return text[len(before):]


class JsonHandler(tornado.web.RequestHandler):
    def initialize(self, state: ServerState) -> None:
        self.state = state

    def fail(self, err: protocol.ApiError) -> None:
        self.set_status(err.status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(err.body()))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own errors (404, 405, an uncaught exception) in OpenAI's error shape."""
        kind = ERROR_TYPES.get(status_code, "BadRequestError")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(protocol.ApiError(self._reason, status_code, kind).body()))


class GenerateHandler(JsonHandler):
    """POST /v1/completions and /v1/chat/completions."""

    def initialize(self, state: ServerState, chat: bool) -> None:
        super().initialize(state)
        self.chat = chat
        self.rid: int | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine_done = False

    async def post(self) -> None:
        state = self.state
        # Arrival is when the body was read, as vLLM's API server stamps it: parsing and
        # tokenizing count toward TTFT, as they do for the client.
        arrival_s = state.loop.engine.now()
        if state.draining or state.loop.error is not None:
            return self.fail(protocol.ApiError("the server is shutting down or its engine "
                                               "failed", 503, "ServiceUnavailableError"))
        try:
            args = protocol.parse(self.request.body, self.chat, state.codec, {state.model},
                                  state.loop.engine.why_never)
        except protocol.ApiError as err:
            return self.fail(err)
        if state.loop.queued >= state.max_waiting:
            return self.fail(protocol.ApiError(
                f"{state.loop.queued} requests are already waiting; try again later", 503,
                "ServiceUnavailableError"))
        self.rid = state.loop.submit(args.prompt_ids, args.max_tokens, args.sampling, self._sink,
                                     arrival_s)
        state.active.add(self)
        try:
            await (self._stream(args) if args.stream else self._whole(args))
        finally:
            state.active.discard(self)

    def _sink(self, new: list[int], reason: str | None,
              error: protocol.ApiError | None) -> None:
        self.engine_done = reason is not None or error is not None
        self.queue.put_nowait((new, reason, error))

    def abort(self) -> None:
        """Stop this request: its client left, or the server is shutting down."""
        if self.rid is not None and not self.engine_done:
            self.engine_done = True
            self.state.loop.abort(self.rid)
            self.queue.put_nowait(CLOSED)

    def on_connection_close(self) -> None:
        self.abort()

    async def _next(self) -> tuple[list[int], str | None]:
        item = await self.queue.get()
        if item is CLOSED:
            return [], "abort"
        new, reason, error = item
        if error is not None:
            raise error
        return new, reason

    async def _whole(self, args: protocol.GenerateArgs) -> None:
        ids: list[int] = []
        reason = None
        while reason is None:
            try:
                new, reason = await self._next()
            except protocol.ApiError as err:
                return self.fail(err)
            ids += new
        if self.request.connection.stream.closed():
            return
        text = self.state.codec.decode(ids)
        self.finish(protocol.whole(args, self._id(), self.state.model, text, reason, ids))

    async def _stream(self, args: protocol.GenerateArgs) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        detok = Detokenizer(self.state.codec)
        model, rid, count, reason = self.state.model, self._id(), 0, None
        while reason is None:
            try:
                new, reason = await self._next()
            except protocol.ApiError as err:
                return self.fail(err)
            if reason == "abort" and self.request.connection.stream.closed():
                return  # the client left: nobody to tell
            if args.chat and count == 0:  # vLLM's first chat event names the role
                await self._send(protocol.chunk(args, rid, model, None, None, role=True))
            count += len(new)
            text = detok.add(new, reason is not None)
            await self._send(protocol.chunk(args, rid, model, text, reason, new))
        if args.include_usage:
            await self._send(protocol.usage_chunk(args, rid, model, count))
        await self._send_raw("data: [DONE]\n\n")
        if not self._finished:
            self.finish()

    async def _send(self, event: dict) -> None:
        await self._send_raw(f"data: {json.dumps(event)}\n\n")

    async def _send_raw(self, text: str) -> None:
        if self._finished:
            return
        try:
            self.write(text)
            await self.flush()
        except StreamClosedError:
            self.abort()

    def _id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.rid}"


class ModelsHandler(JsonHandler):
    def get(self) -> None:
        s = self.state
        self.write({"object": "list", "data": [{
            "id": s.model, "object": "model", "created": int(time.time()),
            "owned_by": "serving-lab", "root": s.model, "parent": None,
            "max_model_len": s.max_len}]})


class HealthHandler(JsonHandler):
    def get(self) -> None:
        if self.state.loop.error is not None or not self.state.loop.thread.is_alive():
            self.set_status(503)
        self.finish()


class TokenizeHandler(JsonHandler):
    """POST /tokenize, as vLLM answers it: the ids, their count and the longest request."""

    def post(self) -> None:
        s = self.state
        try:
            ids = protocol.parse_tokenize(self.request.body, s.codec, {s.model})
        except protocol.ApiError as err:
            return self.fail(err)
        self.finish({"count": len(ids), "max_model_len": s.max_len, "tokens": ids,
                     "token_strs": None})


class MetricsHandler(JsonHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.state.loop.metrics.render())


class NotFound(JsonHandler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)
