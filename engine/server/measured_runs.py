"""Whole workload runs measured for a client: what one is (`RunSpec`), and how it runs.

The lab's page process asks for these over HTTP (`engine.server.lab_routes`); they run here, in the
process that owns the device, on the run queue's one worker thread. A spec names an engine setting
and a synthetic workload, both by the engine's own field names (`EngineConfig`, `WorkloadSpec`);
it is also the cache key, so equal specs give one measurement (`repeat` asks for another).

Weights are loaded once per model name (`ModelShelf`) and shared read-only by every run. Only the
built-in presets may be named: a client never chooses a path on this machine.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from engine.config import PRESETS, ConfigError, EngineConfig
from engine.llm_engine import LLMEngine, pick_device
from engine.model import Llama
from engine.records import StepRecord, Trace
from engine.weights import load_model
from engine.workload import WorkloadSpec

ENGINE_FIELDS = ("model", "block_size", "kv_budget_bytes", "max_num_seqs",
                 "max_num_batched_tokens", "policy")
WORKLOAD_FIELDS = ("num_requests", "prompt_len", "output_len", "rate", "mix", "seed")


@dataclass(frozen=True)
class RunSpec:
    """One measured run: engine settings, the workload, and which measurement of them."""

    engine: tuple[tuple[str, object], ...]  # sorted (field, value) pairs of EngineConfig
    workload: tuple[tuple[str, object], ...]  # sorted (field, value) pairs of WorkloadSpec
    repeat: int = 0

    @classmethod
    def from_json(cls, d: object, kv_cap_bytes: int) -> "RunSpec":
        """Check a client's spec; ConfigError says what is wrong in one sentence."""
        if not isinstance(d, dict) or not isinstance(d.get("engine"), dict) \
                or not isinstance(d.get("workload"), dict):
            raise ConfigError('a run is {"engine": {...}, "workload": {...}, "repeat": 0}')
        engine, workload = d["engine"], d["workload"]
        for given, allowed, what in ((engine, ENGINE_FIELDS, "engine"),
                                     (workload, WORKLOAD_FIELDS, "workload")):
            unknown = sorted(set(given) - set(allowed))
            if unknown:
                raise ConfigError(f"unknown {what} field(s) {', '.join(unknown)}; "
                                  f"allowed: {', '.join(allowed)}")
        if engine.get("model") not in PRESETS:
            raise ConfigError(f"model must be one of the presets: {', '.join(PRESETS)}")
        budget = engine.get("kv_budget_bytes")
        if not isinstance(budget, int) or not 0 < budget <= kv_cap_bytes:
            raise ConfigError(f"kv_budget_bytes must be a whole number from 1 to this server's "
                              f"cap of {kv_cap_bytes} (LAB_KV_BUDGET_MB)")
        repeat = d.get("repeat", 0)
        if not isinstance(repeat, int) or repeat < 0:
            raise ConfigError("repeat must be a whole number, 0 or more")
        spec = cls(tuple(sorted(engine.items())), tuple(sorted(workload.items())), repeat)
        try:  # the engine's own checks, before the run is queued
            spec.engine_config("cpu")
            spec.workload_spec()
        except TypeError as err:
            raise ConfigError(f"a field has the wrong type ({err})") from None
        return spec

    def to_json(self) -> dict:
        return {"engine": dict(self.engine), "workload": dict(self.workload),
                "repeat": self.repeat}

    def cache_key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    def engine_config(self, device: str) -> EngineConfig:
        return EngineConfig(**dict(self.engine), device=device)

    def workload_spec(self) -> WorkloadSpec:
        return WorkloadSpec(**dict(self.workload))


class ModelShelf:
    """Weights loaded once per model name and kept for the process (read-only while serving)."""

    def __init__(self, device: str) -> None:
        self.device = pick_device(device)
        self._models: dict[str, Llama] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Llama:
        with self._lock:
            if name not in self._models:
                self._models[name] = load_model(name, seed=0, device=self.device)
            return self._models[name]


class RunTooLong(ConfigError):
    """A run that went on past the time limit (the client's estimate let it start)."""


def execute(spec: RunSpec, shelf: ModelShelf, on_step, cancel: threading.Event,
            max_run_s: float | None = None) -> Trace:
    """Serve `spec`'s workload on an engine around the shelf's weights. A run still going after
    twice `max_run_s` (it thrashes, or the device is slower than the client estimated) stops."""
    config = spec.engine_config(shelf.device.type)
    engine = LLMEngine(config, model=shelf.get(config.model))
    if max_run_s is None:
        return engine.run(spec.workload_spec(), on_step=on_step, cancel=cancel)
    deadline = time.monotonic() + 2 * max_run_s

    def on_step_in_time(step: StepRecord) -> None:
        on_step(step)
        if time.monotonic() > deadline:
            raise RunTooLong(f"The run was stopped after {2 * max_run_s:.0f} s, past the lab's "
                             "limit; lower the requests, batch or output, or give it more KV "
                             "memory (evictions make it recompute).")

    return engine.run(spec.workload_spec(), on_step=on_step_in_time, cancel=cancel)
