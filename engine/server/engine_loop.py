"""The one thread that owns the engine: take new requests and aborts, step, hand tokens out.

The HTTP side never touches the engine. It puts `add` and `abort` commands in an inbox (a
thread-safe queue) and gets tokens back through `deliver`, a callable that runs a function on its
own event loop (`loop.call_soon_threadsafe`). Between any two steps the loop drains the inbox, so a
request that arrived during a step joins the batch at the next one (continuous batching), and a
client that went away has its blocks freed before the next step runs. Nothing in the loop waits
on a socket: a slow client costs the step nothing.

This is vLLM V1's engine core in miniature; vLLM puts it in a process of its own, here it is a
thread (the model's arithmetic runs in torch and numpy, which release the GIL).
"""
from __future__ import annotations

import itertools
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from engine.cpu_threads import engine_threads
from engine.llm_engine import LLMEngine
from engine.records import RequestRecord, StepRecord
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.server.prometheus import ServerMetrics
from engine.server.protocol import ApiError

IDLE_WAIT_S = 0.5  # how long an idle loop blocks on the inbox before looking at `stopping` again


@dataclass
class Stream:
    """One request as the loop sees it: its record, and where its tokens go."""

    record: RequestRecord
    sampling: SamplingParams
    # Called on the HTTP event loop with (new token ids, finish reason or None, error or None).
    sink: Callable[[list[int], str | None, ApiError | None], None]
    seq: Sequence | None = None
    sent: int = 0  # output tokens already handed to the sink


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics,
                 deliver: Callable[[Callable[[], None]], None],
                 on_finish: Callable[[RequestRecord], None] | None = None) -> None:
        """`on_finish` sees each finished request's record, on the HTTP side (via `deliver`)."""
        self.engine = engine
        self.metrics = metrics
        self.deliver = deliver
        self.on_finish = on_finish
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[int, Stream] = {}
        self.stopping = threading.Event()
        self.error: str | None = None  # set if the loop died; /health then answers 503
        self.num_waiting = 0  # published after every step for the HTTP side's queue bound
        self._ids = itertools.count()
        self.thread = threading.Thread(target=self._main, name="engine-loop", daemon=True)

    # -- called from the HTTP side ---------------------------------------------------------------
    def submit(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
               sink: Callable[[list[int], str | None, ApiError | None], None],
               arrival_s: float) -> int:
        """Queue a request that arrived at `arrival_s` (`engine.now()`); returns its id."""
        rid = next(self._ids)
        record = RequestRecord(id=rid, prompt_ids=prompt_ids, max_tokens=max_tokens,
                               arrival_s=arrival_s)
        self.inbox.put(("add", Stream(record, sampling, sink)))
        return rid

    def abort(self, request_id: int) -> None:
        self.inbox.put(("abort", request_id))

    @property
    def queued(self) -> int:
        """Requests not yet running: the engine's waiting queue plus the inbox's adds."""
        return self.num_waiting + self.inbox.qsize()

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.inbox.put(("wake", None))
        self.thread.join(timeout)

    # -- the engine's thread ---------------------------------------------------------------------
    def _main(self) -> None:
        try:
            with engine_threads(self.engine.device):
                while not self.stopping.is_set():
                    self._drain(block=not self.engine.has_work)
                    step = self.engine.step() if self.engine.has_work else None
                    if step is not None:
                        self._publish(step)
                    self._set_gauges()
        except Exception:  # the server must say it is broken rather than hang its clients
            self.error = traceback.format_exc()
            failed = ApiError("the engine failed; see the server's log", 500, "InternalServerError")
            for stream in self.streams.values():
                self._hand(stream, [], None, failed)
            raise

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: str, arg) -> None:
        if command == "add":
            stream: Stream = arg
            stream.seq = self.engine.add_request(stream.record, stream.sampling)
            if stream.seq is None:  # the HTTP side checked already; kept for callers that did not
                self._hand(stream, [], None,
                           ApiError(f"this request can never run here: {stream.record.rejected}"))
            else:
                self.streams[stream.record.id] = stream
        elif command == "abort":
            self.engine.abort(arg)
            self.streams.pop(arg, None)

    def _publish(self, step: StepRecord) -> None:
        """Hand each stream its new tokens; count them; retire finished streams."""
        self.metrics.preemptions.inc(len(step.preempted))
        finished = set(step.finished)
        for item in step.scheduled:
            stream = self.streams.get(item.request_id)
            if stream is None:
                continue
            out = stream.record.output_ids
            new = out[stream.sent:]
            if not new and item.request_id not in finished:
                continue  # a prefill chunk that did not reach the prompt's end
            stream.sent = len(out)
            self.metrics.tokens(stream.record, len(new))
            reason = None
            if item.request_id in finished:
                reason = stream.seq.finish_reason
                self.metrics.finished(stream.record)
                del self.streams[item.request_id]
                if self.on_finish is not None:
                    self.deliver(lambda r=stream.record: self.on_finish(r))
            self._hand(stream, new, reason, None)

    def _hand(self, stream: Stream, new: list[int], reason: str | None,
              error: ApiError | None) -> None:
        self.deliver(lambda: stream.sink(new, reason, error))

    def _set_gauges(self) -> None:
        sched, blocks = self.engine.scheduler, self.engine.blocks
        self.num_waiting = len(sched.waiting)
        self.metrics.set_state(len(sched.running), self.queued,
                               blocks.num_used / blocks.num_blocks)
