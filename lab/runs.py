"""What one demo run is, whether it may run, and how it runs on the shared worker.

`RunKey` is the cache key: everything that changes what the engine measures (SLOs are not in it:
they only change how a finished trace is judged). `check_run` refuses, before anything is allocated,
a run that is impossible (past the model's positions, a KV need beyond the lab's budget) or too
long for a shared classroom device. `execute` builds an engine around weights loaded once per model.
"""
from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass

import torch

from engine import analytic
from engine.block_manager import blocks_for
from engine.config import ConfigError, EngineConfig, ModelConfig, preset
from engine.cpu_threads import usable_cores
from engine.llm_engine import LLMEngine, describe_device, pick_device
from engine.model import Llama
from engine.records import StepRecord, Trace
from engine.weights import load_model
from engine.workload import WorkloadSpec


@dataclass(frozen=True)
class Limits:
    """What one server lets a single run use; set from the environment at start-up."""

    kv_budget_bytes: int = 256 * 2**20  # LAB_KV_BUDGET_MB
    max_run_s: float = 20.0  # LAB_MAX_RUN_S: longest estimated run one learner may start
    device: str = "auto"  # LAB_DEVICE
    # LAB_CPU_THREADS: BLAS threads of CPU runs. One core is left to the server's event loop,
    # which builds and updates pages while runs are measured (engine/cpu_threads.py says why).
    cpu_threads: int = max(1, usable_cores() - 1)
    # LAB_LIVE_UPDATE_S: the shortest gap between live plot updates during a run. Each update is
    # work for the server's event loop, and that work competes with the run it shows.
    live_update_s: float = 0.25

    @classmethod
    def from_env(cls) -> "Limits":
        env = os.environ
        threads = env.get("LAB_CPU_THREADS", "")
        if threads and not (threads.isdigit() and int(threads) >= 1):
            raise ValueError(f"LAB_CPU_THREADS must be a whole number of at least 1, not {threads!r}")
        gap = env.get("LAB_LIVE_UPDATE_S", str(cls.live_update_s))
        try:
            live_update_s = float(gap)
        except ValueError:
            live_update_s = -1.0
        if not 0 <= live_update_s < 60:
            raise ValueError(f"LAB_LIVE_UPDATE_S must be seconds from 0 to 60, not {gap!r}")
        return cls(kv_budget_bytes=int(float(env.get("LAB_KV_BUDGET_MB", 256)) * 2**20),
                   max_run_s=float(env.get("LAB_MAX_RUN_S", 20.0)),
                   device=env.get("LAB_DEVICE", "auto"),
                   cpu_threads=int(threads) if threads else cls.cpu_threads,
                   live_update_s=live_update_s)


@dataclass(frozen=True)
class RunKey:
    model: str
    batch: int
    context: int
    page: int
    output: int

    def label(self) -> str:
        return (f"{self.model}: batch {self.batch}, context {self.context}, page {self.page}, "
                f"output {self.output}")

    def to_json(self) -> dict:
        return asdict(self)


def bytes_per_elem(device: torch.device) -> int:
    return 2 if device.type == "cuda" else 4  # bf16 on CUDA, fp32 on the CPU


def kv_need_bytes(key: RunKey, cfg: ModelConfig, elem: int) -> int:
    """KV bytes the run holds at its fullest: every request's pages at prompt + output tokens."""
    per_seq = blocks_for(key.context + key.output, key.page) * key.page
    return key.batch * per_seq * cfg.kv_bytes_per_token(elem)


def estimate_run_s(key: RunKey, cfg: ModelConfig, probe: analytic.DeviceProbe, elem: int) -> float:
    """A deliberately rough upper estimate of the run's time, from the measured device limits."""
    params = cfg.num_params()
    prompt_tokens = key.batch * key.context
    attn_flops = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * \
        key.batch * key.context ** 2
    prefill = (2 * params * prompt_tokens + attn_flops) / probe.flops_per_s
    kv_read = cfg.kv_bytes_per_token(elem) * key.batch * (key.context + key.output / 2)
    decode = key.output * analytic.decode_tpot_floor_s(params * elem, int(kv_read),
                                                       probe.bandwidth_bytes_s)
    # Measured engines run a few times above these floors on small models; budget for it.
    return 3.0 * (prefill + decode)


def check_run(key: RunKey, limits: Limits) -> str | None:
    """Why this run may not start (one sentence for the learner), or None."""
    if min(key.batch, key.context, key.page, key.output) < 1:
        return "Batch, context, page size and output must each be at least 1."
    try:
        cfg = preset(key.model)
    except ConfigError as err:
        return str(err)
    device = pick_device(limits.device)
    elem = bytes_per_elem(device)
    total = key.context + key.output
    if total > cfg.max_position_embeddings:
        return (f"Context {key.context} + output {key.output} = {total} tokens is past this "
                f"model's maximum of {cfg.max_position_embeddings} positions.")
    need = kv_need_bytes(key, cfg, elem)
    if need > limits.kv_budget_bytes:
        return (f"This run needs {need / 1e9:.3g} GB of KV cache ({key.batch} sequences x "
                f"{total} tokens in pages of {key.page}), but the lab's budget is "
                f"{limits.kv_budget_bytes / 1e9:.3g} GB. Lower the batch, context or output.")
    seconds = estimate_run_s(key, cfg, analytic.probe(device.type), elem)
    if seconds > limits.max_run_s:
        return (f"This run would take about {seconds:.0f} s on {describe_device(device)}, "
                f"more than the {limits.max_run_s:.0f} s one learner may hold the shared device. "
                "Lower the batch, context or output.")
    return None


class ModelShelf:
    """Weights loaded once per model name and kept for the process (read-only while serving)."""

    def __init__(self, device: str) -> None:
        self.device = pick_device(device)
        self._models: dict[str, Llama] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Llama:
        with self._lock:
            if name not in self._models:
                dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
                self._models[name] = load_model(name, seed=0, device=self.device, dtype=dtype)
            return self._models[name]


def execute(key: RunKey, shelf: ModelShelf, on_step, cancel: threading.Event) -> Trace:
    """Run the demo's workload for `key`: `batch` requests of `context` tokens, all at t=0."""
    model = shelf.get(key.model)
    elem = bytes_per_elem(shelf.device)
    budget = kv_need_bytes(key, model.config, elem)  # exactly what this run can use
    config = EngineConfig(model=key.model, device=shelf.device.type, block_size=key.page,
                          kv_budget_bytes=max(budget, key.page * model.config.kv_bytes_per_token(elem)),
                          max_num_seqs=key.batch, max_num_batched_tokens=512)
    engine = LLMEngine(config, model=model)
    spec = WorkloadSpec(num_requests=key.batch, prompt_len=key.context, output_len=key.output)
    return engine.run(spec, on_step=on_step, cancel=cancel)


SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # batch sizes of the background TPOT sweep


def sweep_key(key: RunKey, batch: int) -> RunKey:
    """The sweep's run at one batch: current context and page, a short output to stay cheap."""
    return RunKey(key.model, batch, key.context, key.page, min(key.output, 16))


def floor_ms(key: RunKey, batch: int, cfg: ModelConfig, probe: analytic.DeviceProbe,
             elem: int) -> float:
    """The decode roofline at `batch`: weights once plus every sequence's KV, over bandwidth."""
    kv_read = cfg.kv_bytes_per_token(elem) * batch * (key.context + key.output / 2)
    return 1e3 * analytic.decode_tpot_floor_s(cfg.num_params() * elem, int(kv_read),
                                              probe.bandwidth_bytes_s)

