"""The routes the lab's page processes use: measured workload runs streamed as they happen.

The OpenAI API answers one request at a time; the lab needs whole measured runs with every step
record (the timeline, the page map and the storyboard are drawn from them). So:

    GET  /lab/info   the device, its probed limits and this server's caps, as JSON
    POST /lab/runs   {"session": str, "background": bool, "max_run_s": float,
                      "runs": [{"engine": {...}, "workload": {...}, "repeat": 0}, ...]}
                     answered with newline-delimited JSON, one event per line:
                       {"event": "queued", "run": i, "position": n}   pushed when n changes
                                                                      (foreground runs only)
                       {"event": "step", "run": i, "step": {...}}      foreground runs only
                       {"event": "done", "run": i, "trace": {...}, "cached": bool}
                       {"event": "error", "run": i, "message": str}
                       {"event": "cancelled", "run": i}
                     and the stream ends once every run has ended.

A session has one foreground run at a time: a newer foreground request from the same session
supersedes the older (its stream gets "cancelled"). Closing a stream withdraws what it asked for;
a run nobody else waits for stops. Background requests (a session's sweeps) run only while no
foreground run waits. See docs/server.md.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from functools import partial

import tornado.web
from tornado.iostream import StreamClosedError

from engine.config import ConfigError
from engine.cpu_threads import engine_threads
from engine.device_probe import probe
from engine.kernels import cpu_jit
from engine.llm_engine import describe_device
from engine.records import StepRecord
from engine.server import classroom_hub
from engine.server.classroom import ClassroomHub
from engine.server.measured_runs import ModelShelf, RunSpec, execute
from engine.records import Outcome
from engine.server.run_queue import RunQueue

KEEPALIVE_S = 15.0  # an empty line this often keeps a long wait from looking like a dead peer
# Steps are written in batches, this often. The engine's worker thread shares this process's
# interpreter with the event loop; waking the loop for every step (a few ms each on a small model)
# made the loop contend with the run it reports (tools/fidelity.py: docs/benchmarks.md).
STEP_BATCH_S = 0.25


class LabRuns:
    """The measured-run service: the device's shelf of weights, its queue, its caps."""

    def __init__(self, device: str = "auto", kv_cap_bytes: int | None = None,
                 max_run_s: float | None = None) -> None:
        env = os.environ
        self.shelf = ModelShelf(device)
        self.queue = RunQueue()
        self.kv_cap_bytes = kv_cap_bytes or int(float(env.get("LAB_KV_BUDGET_MB", 256)) * 2**20)
        self.max_run_s = max_run_s or float(env.get("LAB_MAX_RUN_S", 20.0))
        # Measured now, before any run competes, and on the threads runs get (`--cpu-threads`):
        # the floors the page draws are for the engine as it runs, not for every core.
        with engine_threads(self.shelf.device):
            self.probe = probe(self.shelf.device.type)
        if self.shelf.device.type == "cpu":  # compiled (or loaded from numba's cache) now, so
            cpu_jit.warm_up()  # that no learner's first run waits for it
        self.hub = ClassroomHub.from_env()  # the class every page process of the lab shares

    def info(self) -> dict:
        p = self.probe
        return {"device_type": self.shelf.device.type,
                "device": describe_device(self.shelf.device),
                "probe": {"device": p.device, "bandwidth_gbs": p.bandwidth_gbs,
                          "matmul_tflops": p.matmul_tflops,
                          "read_samples_gbs": list(p.read_samples_gbs)},
                "kv_cap_bytes": self.kv_cap_bytes, "max_run_s": self.max_run_s,
                "queue": self.queue.stats()}

    def stop(self) -> None:
        self.queue.stop()


class LabHandler(tornado.web.RequestHandler):
    def initialize(self, lab: LabRuns) -> None:
        self.lab = lab

    def answer(self, status: int, body: dict) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs) -> None:
        self.answer(status_code, {"error": self._reason})


class InfoHandler(LabHandler):
    def get(self) -> None:
        self.answer(200, self.lab.info())


class RunsHandler(LabHandler):
    """POST /lab/runs: queue the runs, then stream their events until each has ended."""

    def initialize(self, lab: LabRuns) -> None:
        super().initialize(lab)
        self.events: asyncio.Queue = asyncio.Queue()
        self.steps: deque[tuple[int, StepRecord]] = deque()  # appended by the worker thread
        self.tag = object()  # names this stream's listeners in the queue
        self.closed = False

    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"null")
            session, runs = body["session"], body["runs"]
            if not isinstance(session, str) or not session or not isinstance(runs, list) \
                    or not runs:
                raise ValueError
            specs = [RunSpec.from_json(r, self.lab.kv_cap_bytes) for r in runs]
        except ConfigError as err:
            return self.answer(400, {"error": str(err)})
        except (ValueError, KeyError, TypeError):
            return self.answer(400, {"error": 'send {"session": "<id>", "runs": [<run>, ...]} '
                                              '(see GET /lab/info and docs/server.md)'})
        background = bool(body.get("background", False))
        asked = body.get("max_run_s")
        max_run_s = self.lab.max_run_s
        if isinstance(asked, (int, float)) and 0 < asked < max_run_s:
            max_run_s = float(asked)
        aio = asyncio.get_running_loop()

        def send(event: dict) -> None:  # from any thread
            aio.call_soon_threadsafe(self.events.put_nowait, event)

        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-cache")
        for i, spec in enumerate(specs):
            self.lab.queue.submit(
                session, spec.cache_key(), partial(execute, spec, self.lab.shelf,
                                                   max_run_s=max_run_s),
                on_done=partial(self._done, send, i),
                on_step=None if background else partial(self._step, i),
                on_position=None if background else partial(self._position, send, i),
                background=background, tag=self.tag)
        ended, last_write = 0, time.monotonic()
        try:
            while ended < len(specs):
                try:
                    event = await asyncio.wait_for(
                        self.events.get(), KEEPALIVE_S if background else STEP_BATCH_S)
                except asyncio.TimeoutError:
                    event = None
                if event is not None and event["event"] == "closed":
                    return
                wrote = self._write_steps()  # a run's steps all go before its end
                if event is not None:
                    if event["event"] in ("done", "error", "cancelled"):
                        ended += 1
                    self.write(json.dumps(event) + "\n")
                    wrote = True
                if not wrote and time.monotonic() - last_write > KEEPALIVE_S:
                    self.write("\n")
                    wrote = True
                if wrote:
                    last_write = time.monotonic()
                    await self.flush()
            self.finish()
        except StreamClosedError:
            pass
        finally:
            self.lab.queue.detach(self.tag)

    def _step(self, i: int, step: StepRecord) -> None:
        self.steps.append((i, step))  # on the worker thread: no wake-up, no encoding

    def _write_steps(self) -> bool:
        lines = []
        while self.steps:
            i, step = self.steps.popleft()
            lines.append(json.dumps({"event": "step", "run": i, "step": step.to_json()}))
        if lines:
            self.write("\n".join(lines) + "\n")
        return bool(lines)

    @staticmethod
    def _position(send, i: int, position: int) -> None:
        send({"event": "queued", "run": i, "position": position})

    @staticmethod
    def _done(send, i: int, outcome: Outcome) -> None:
        send(outcome.to_event(i))

    def on_connection_close(self) -> None:
        self.lab.queue.detach(self.tag)
        self.events.put_nowait({"event": "closed"})


def routes(lab: LabRuns) -> list[tuple]:
    """/lab/info, /lab/runs and the classroom hub's /lab/classroom/... routes."""
    return [(r"/lab/info", InfoHandler, {"lab": lab}),
            (r"/lab/runs", RunsHandler, {"lab": lab}),
            *classroom_hub.routes(lab.hub)]
