"""One demo run against an external endpoint, measured on the client as `bench serve` measures.

The slider workload becomes requests: `requests` prompts of `context` tokens (or lognormal around
it), arriving at `rate` by the seeded Poisson process `engine.workload` draws for the lab's own
engine, at most `batch` in flight at once (the client's concurrency cap: a request waits on the
client for a slot, and as in `bench serve --max-concurrency` that wait is not in its TTFT), each
asking for `output` tokens. Each request's chunks are timed as they arrive and become a
`RequestRecord`, so `engine.metrics.summarize` computes TTFT, TPOT, ITL, E2E and goodput with the
same definitions as for the lab's own engine. Meanwhile /metrics is scraped every
`METRICS_PERIOD_S` for KV use and the queue.

Runs of one page process take turns (`EndpointClient.turns`). Events go to `on_event` on this run's
threads: `queued` (with the runs ahead) while it waits its turn, `progress`, `sample`, and one
`done`, `error` or `cancelled` (`Outcome.to_event`). The run is stopped, with an error, at twice `max_run_s`, like a run of the
lab's own engine; `close()` stops it at once.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from engine.records import Outcome, RequestRecord, Trace
from engine.workload import Shape, draw_shape
from lab.endpoint_client import (Completion, EndpointClient, EndpointError, EndpointInfo,
                                 hang_up)
from lab.endpoint_prompts import PromptMaker
from lab.prometheus_text import MetricsSample, MetricsUnreadable, read_sample
from lab.runs import RunKey

log = logging.getLogger(__name__)

METRICS_PERIOD_S = 0.25  # one scrape per live update of the page
UNKNOWN_ID = -1  # token ids the client never sees: records keep only their number


def shape(key: RunKey) -> Shape:
    """The run's lengths and arrival times: the very ones the lab's own engine would serve."""
    return draw_shape(key.workload())


class EndpointRun:
    """One run in flight on its own daemon threads."""

    def __init__(self, client: EndpointClient, prompts: PromptMaker, key: RunKey,
                 max_run_s: float, on_event: Callable[[dict], None]) -> None:
        self.client, self.prompt_maker, self.key = client, prompts, key
        self.deadline_s = 2 * max_run_s
        self.on_event = on_event
        self.cancel = threading.Event()
        self.failure: str | None = None
        self._conns: list = []
        self._slots = threading.Semaphore(key.batch)
        self._lock = threading.Lock()
        self._finished = 0
        self._polling_done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lab-endpoint-run", daemon=True)

    def start(self) -> "EndpointRun":
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop the run: no further request is sent and every open one is hung up."""
        self.cancel.set()
        for conn in list(self._conns):
            hang_up(conn)

    # -- the run -------------------------------------------------------------------------------
    def _run(self) -> None:
        trace = None
        turns = self.client.turns
        try:
            if turns.wait(self, self.cancel, lambda ahead: self.on_event(
                    {"event": "queued", "run": 0, "position": ahead})):
                trace = self._measure()
        except EndpointError as err:
            self.failure = str(err)
            self.client.forget()
        except Exception as err:  # never a traceback on the page: one sentence, the log has it
            log.exception("endpoint run failed")
            self.failure = f"The run against the endpoint failed ({type(err).__name__})."
        finally:
            turns.done(self)
        if self.cancel.is_set() and self.failure is None:
            self.on_event(Outcome(cancelled=True).to_event(0))
        elif trace is None:
            self.on_event(Outcome(error=self.failure).to_event(0))
        else:
            self.on_event(Outcome(trace=trace).to_event(0))

    def _measure(self) -> Trace | None:
        info = self.client.info()
        plan = shape(self.key)
        longest = max(p + o for p, o in zip(plan.prompt_lens, plan.output_lens))
        if info.max_model_len is not None and longest > info.max_model_len:
            raise EndpointError(f"At {longest} tokens the longest request is past the "
                                f"{info.max_model_len} the endpoint's model takes; lower the "
                                "context or output.")
        prompts, vocab = self.prompt_maker.prompts(plan.prompt_lens)  # fresh words each run
        miscount = self.prompt_maker.check(prompts[0], plan.prompt_lens[0])
        samples: list[MetricsSample] = []
        metrics_error = self._scrape(samples, 0.0, first=True)
        t0 = time.perf_counter()
        poller = None
        if metrics_error is None:
            poller = threading.Thread(target=self._poll, args=(samples, t0), daemon=True,
                                      name="lab-endpoint-metrics")
            poller.start()
        results: list[Completion | None] = [None] * len(prompts)
        workers = self._dispatch(prompts, plan, results, t0)
        for w in workers:
            w.join(max(0.0, t0 + self.deadline_s - time.perf_counter()))
        timed_out = any(w.is_alive() for w in workers) or (
            len(workers) < len(prompts) and not self.cancel.is_set())
        if timed_out and self.failure is None:
            self.failure = (f"The run was stopped after {self.deadline_s:.0f} s, twice "
                            "LAB_MAX_RUN_S: lower the requests, context or output.")
        if self.failure is not None or timed_out:
            self.close()
            raise EndpointError(self.failure)
        if self.cancel.is_set():
            return None
        if poller is not None:
            self._polling_done.set()
            poller.join(2 * METRICS_PERIOD_S + 1)
            self._scrape(samples, time.perf_counter() - t0)
        return self._trace(plan, results, samples, metrics_error, vocab.counted, miscount, info)

    def _dispatch(self, prompts: list[str], plan: Shape, results: list,
                  t0: float) -> list[threading.Thread]:
        """Send each request at its arrival time once a slot is free; returns their threads."""
        workers = []
        for i, (prompt, out, at) in enumerate(zip(prompts, plan.output_lens, plan.arrivals_s)):
            wait = t0 + at - time.perf_counter()
            if wait > 0 and self.cancel.wait(wait):
                break
            while not self._slots.acquire(timeout=0.1):
                if self.cancel.is_set() or time.perf_counter() - t0 > self.deadline_s:
                    return workers
            if self.cancel.is_set():
                self._slots.release()
                break
            w = threading.Thread(target=self._one, args=(i, prompt, out, results, t0),
                                 daemon=True, name="lab-endpoint-request")
            w.start()
            workers.append(w)
        return workers

    def _one(self, i: int, prompt: str, max_tokens: int, results: list, t0: float) -> None:
        try:
            results[i] = self.client.stream_completion(prompt, max_tokens, t0, self.cancel,
                                                       self._conns)
        except EndpointError as err:
            if self.failure is None:
                self.failure = str(err)
            self.close()
        finally:
            self._slots.release()
        with self._lock:
            self._finished += 1
            finished = self._finished
        if not self.cancel.is_set():  # after a stop, the run's last event has been sent
            self.on_event({"event": "progress", "finished": finished, "total": len(results)})

    # -- /metrics ------------------------------------------------------------------------------
    def _scrape(self, samples: list[MetricsSample], t_s: float, first: bool = False) -> str | None:
        """One scrape into `samples` (and an event); the reason when it failed."""
        try:
            sample = read_sample(self.client.metrics_text(), t_s)
        except (EndpointError, MetricsUnreadable) as err:
            return str(err) if first else None
        samples.append(sample)
        self.on_event({"event": "sample", "sample": sample.to_json()})
        return None

    def _poll(self, samples: list[MetricsSample], t0: float) -> None:
        while not self._polling_done.wait(METRICS_PERIOD_S) and not self.cancel.is_set():
            self._scrape(samples, time.perf_counter() - t0)

    # -- the record ----------------------------------------------------------------------------
    def _trace(self, plan: Shape, results: list[Completion | None],
               samples: list[MetricsSample], metrics_error: str | None, counted: bool,
               miscount: int | None, info: EndpointInfo) -> Trace:
        records = [record(i, p, o, c) for i, (p, o, c) in
                   enumerate(zip(plan.prompt_lens, plan.output_lens, results))]
        block = next((s.block_size for s in samples if s.block_size), None)
        duration = max((r.finish_s for r in records if r.finish_s is not None), default=0.0)
        return Trace(
            device=f"the endpoint {self.client.config.address}", model=info.model,
            config={"endpoint": {
                "address": self.client.config.address, "model_from": info.model_from,
                "concurrency": self.key.batch,
                "prompt_tokens": "counted" if counted else "approximate",
                "prompt_miscount": miscount, "ignore_eos": info.ignore_eos,
                "metrics_error": metrics_error,
                "samples": [s.to_json() for s in samples]}},
            requests=records, steps=[], block_size=block or 0, num_blocks=0, block_bytes=0,
            kv_bytes_capacity=0, duration_s=duration)


def record(i: int, prompt_tokens: int, max_tokens: int, done: Completion | None) -> RequestRecord:
    """A request's record from what the client saw: one timestamp per output token (a chunk
    that carried several, by the usage count, repeats its time; the usage count wins)."""
    r = RequestRecord(id=i, prompt_ids=[UNKNOWN_ID] * prompt_tokens, max_tokens=max_tokens,
                      arrival_s=0.0)
    if done is None:
        r.rejected = "not sent before the run ended"
        return r
    r.arrival_s = r.scheduled_s = done.sent_s
    times = list(done.chunk_times_s)
    n = done.usage_tokens if done.usage_tokens is not None else len(times)
    if not times or n < 1:
        r.rejected = "the endpoint sent no tokens"
        return r
    if n > len(times):
        times += [times[-1]] * (n - len(times))
    elif n < len(times):
        times = times[:n - 1] + [times[-1]]
    r.token_times_s, r.output_ids = times, [UNKNOWN_ID] * n
    r.first_token_s, r.finish_s = times[0], times[-1]
    return r
