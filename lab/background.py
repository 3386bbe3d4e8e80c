"""The measurements a session asks for after each finished run, while nobody waits for the engine.

For the run just shown (`DemoController.shown_key`), in this order: the same requests under the
other batching policy, the setting measured `REPEATS` times in all (the prediction gate's noise
band), TPOT at every batch of `SWEEP_BATCHES`, and the workload at every arrival rate of
`SWEEP_RATES`. Settings this page process already holds are drawn at once; the rest are queued as
background runs, all on one stream to the engine server, which runs them only while no learner's
run waits (and stops one, to run again later, when one arrives). Results land on the session's loop
at the controller's next tick, and are dropped when the learner has moved to another setting
meanwhile.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.config import preset
from engine.metrics import summarize
from engine.records import Outcome, Trace
from lab.runs import (SWEEP_BATCHES, SWEEP_RATES, RunKey, check_run, floors_ms, kv_capacity_bytes,
                      kv_need_bytes, other_policy_key, rate_key, ridge_batch, sweep_key)

if TYPE_CHECKING:
    from lab.demo import DemoController

REPEATS = 3  # measurements of one setting, for its run-to-run spread
MIN_RATE_REQUESTS = 4  # fewer requests than this make an arrival rate meaningless


class BackgroundRuns:
    """One session's background measurements and the plots they fill."""

    def __init__(self, demo: "DemoController") -> None:
        self.demo = demo
        self.tpot: dict[int, float] = {}  # batch -> measured TPOT p50 (ms)
        self.rates: dict[float, Trace] = {}  # arrival rate -> trace

    def start(self, key: RunKey) -> None:
        """Queue (or draw from the cache) everything measured around the run `key`."""
        self.demo._background_done.clear()
        self._start_policy_comparison(key)
        for r in range(REPEATS):
            self._submit(key.replace(repeat=r), lambda *_: None)
        self._start_tpot_sweep(key)
        self._start_rate_sweep(key)
        self.demo.send_background()

    def redraw(self) -> None:
        """Judge everything again under the current SLOs (goodput depends on them)."""
        slo = self.demo.state.slo()
        self.demo.policy.rejudge(slo)
        self.demo.goodput_rate.rejudge(slo)
        self._draw_tpot()

    def rate_keys(self, key: RunKey) -> list[RunKey]:
        """The arrival rates the goodput sweep measures for this workload (those that may run)."""
        if key.requests < MIN_RATE_REQUESTS:
            return []
        return [rk for rk in (rate_key(key, r) for r in SWEEP_RATES)
                if check_run(rk, self.demo.limits, self.demo.engine) is None]

    def _submit(self, key: RunKey, done: Callable[[RunKey, Outcome], None]) -> Trace | None:
        """The cached trace for `key`, or None after queueing its run with `done` to follow."""
        cached = self.demo.traces.get(key)
        if cached is None:
            self.demo.queue_background(key, done)
        return cached

    def _is_current(self, outcome: Outcome, expected: Callable[[RunKey], RunKey],
                    key: RunKey) -> bool:
        """A result still wanted: a trace, for the setting shown now."""
        shown = self.demo.shown_key
        return outcome.trace is not None and shown is not None and expected(shown) == key

    # -- the other policy ----------------------------------------------------------------------
    def _start_policy_comparison(self, key: RunKey) -> None:
        demo = self.demo
        other = other_policy_key(key).replace(repeat=0)
        # Every request at once, in one batch, with room for all at full length: both policies
        # schedule the very same steps.
        cfg, elem = preset(key.model), demo.engine.bytes_per_elem
        same = (key.rate == 0 and key.requests <= key.batch
                and kv_need_bytes(key, cfg, elem) <= kv_capacity_bytes(key, cfg, elem))
        wanted = (not same and other.policy not in demo.policy.traces
                  and check_run(other, demo.limits, demo.engine) is None)
        demo.policy.same_steps = same
        demo.policy.show(key.policy, demo.trace, demo.state.slo(),
                         pending=other.policy if wanted else "")
        if wanted:
            cached = self._submit(other, self._policy_done)
            if cached is not None:
                demo.policy.show(other.policy, cached, demo.state.slo())

    def _policy_done(self, key: RunKey, outcome: Outcome) -> None:
        if self._is_current(outcome, lambda shown: other_policy_key(shown).replace(repeat=0), key):
            self.demo.policy.show(key.policy, outcome.trace, self.demo.state.slo())

    # -- TPOT against batch --------------------------------------------------------------------
    def _start_tpot_sweep(self, key: RunKey) -> None:
        self.tpot = {}
        for batch in SWEEP_BATCHES:
            sk = sweep_key(key, batch)
            if check_run(sk, self.demo.limits, self.demo.engine) is not None:
                continue
            cached = self._submit(sk, self._tpot_point)
            if cached is not None:  # drawn once below, not one redraw per cached point
                self._add_tpot(batch, cached)
        self._draw_tpot()

    def _add_tpot(self, batch: int, trace: Trace) -> None:
        summary = summarize(trace)
        if summary.tpot_requests:  # one-token outputs have no TPOT to plot
            self.tpot[batch] = summary.tpot_ms.p50

    def _tpot_point(self, sk: RunKey, outcome: Outcome) -> None:
        if self._is_current(outcome, lambda shown: sweep_key(shown, sk.batch), sk):
            self._add_tpot(sk.batch, outcome.trace)
            self._draw_tpot()

    def _draw_tpot(self) -> None:
        demo, key = self.demo, self.demo.shown_key
        if key is None:
            return
        cfg, engine = preset(key.model), demo.engine
        probe, elem = engine.probe, engine.bytes_per_elem
        floors = [(b, *floors_ms(key, b, cfg, probe, elem)) for b in SWEEP_BATCHES]
        expected = [b for b in SWEEP_BATCHES
                    if check_run(sweep_key(key, b), demo.limits, engine) is None]
        points = sorted(self.tpot.items())
        demo.tpot_batch.show_sweep(points, floors, key.batch, pending=len(points) < len(expected),
                                   ridge=ridge_batch(key, cfg, probe, elem))

    # -- goodput against arrival rate ----------------------------------------------------------
    def _start_rate_sweep(self, key: RunKey) -> None:
        keys = self.rate_keys(key)
        self.rates = {}
        for rk in keys:
            cached = self._submit(rk, self._rate_point)
            if cached is not None:
                self.rates[rk.rate] = cached
        self.demo.goodput_rate.show_sweep(self.rates, len(keys), self.demo.state.slo())

    def _rate_point(self, rk: RunKey, outcome: Outcome) -> None:
        if self._is_current(outcome, lambda shown: rate_key(shown, rk.rate), rk):
            self.rates[rk.rate] = outcome.trace
            self.demo.goodput_rate.show_sweep(self.rates, len(self.rate_keys(self.demo.shown_key)),
                                              self.demo.state.slo())
