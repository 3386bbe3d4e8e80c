"""What one demo run is, whether it may run, and what the engine server is asked to measure.

`RunKey` is the cache key: everything that changes what the engine measures (SLOs are not in it:
they only change how a finished trace is judged). The run is a workload: `requests` arriving at
`rate`, of fixed or mixed lengths, served with a KV cache of `kv_mb` under a batching `policy`.
`check_run` refuses, before anything is sent, a run that is impossible (past the model's
positions, a request no cache of that size could hold) or too long for a shared classroom device.
`run_spec` turns a key into the engine server's own terms (POST /lab/runs), which measures it.
Nothing here imports torch: the page process only does arithmetic on shapes.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, replace

from engine import analytic
from engine.analytic import RunningBounds
from engine.block_manager import blocks_for
from engine.config import POLICIES, ConfigError, ModelConfig, preset
from engine.workload import WorkloadSpec, draw_shape
from lab.engine_client import EngineInfo


@dataclass(frozen=True)
class Limits:
    """What one server lets a single run use; set from the environment at start-up."""

    kv_budget_bytes: int = 256 * 2**20  # LAB_KV_BUDGET_MB (the engine server enforces it too)
    max_run_s: float = 20.0  # LAB_MAX_RUN_S: longest estimated run one learner may start
    # LAB_LIVE_UPDATE_S: the period of each session's ticker (lab/ticker.py), which is also the
    # shortest gap between live plot updates during a run.
    live_update_s: float = 0.25

    @classmethod
    def from_env(cls) -> "Limits":
        env = os.environ
        gap = env.get("LAB_LIVE_UPDATE_S", str(cls.live_update_s))
        try:
            live_update_s = float(gap)
        except ValueError:
            live_update_s = -1.0
        if not 0.02 <= live_update_s < 60:
            raise ValueError(f"LAB_LIVE_UPDATE_S must be seconds from 0.02 to 60, not {gap!r}")
        return cls(kv_budget_bytes=int(float(env.get("LAB_KV_BUDGET_MB", 256)) * 2**20),
                   max_run_s=float(env.get("LAB_MAX_RUN_S", 20.0)),
                   live_update_s=live_update_s)


MIXES = {"fixed": "fixed", "mixed": "lognormal"}  # the page's word -> the engine's length mix


@dataclass(frozen=True)
class RunKey:
    """Everything that changes what the engine measures: the cache key of one demo run."""

    model: str
    batch: int  # cap on running sequences (max_num_seqs)
    context: int  # prompt tokens (the mean, for a mixed workload)
    page: int  # tokens per KV block
    output: int  # tokens generated per request (the mean, for a mixed workload)
    requests: int | None = None  # None: one request per batch slot
    rate: float = 0.0  # arrivals per second (Poisson, seeded); 0 sends every request at t=0
    mix: str = "fixed"  # "fixed" lengths, or "mixed": lognormal around context and output
    kv_mb: int | None = None  # KV cache size; None: exactly what the workload holds at its fullest
    policy: str = "continuous"  # or "static" (request-level batching)
    chunk: int = 512  # prefill tokens per step (max_num_batched_tokens)
    repeat: int = 0  # which measurement of this same setting (runs are noisy; see lab/demo.py)

    def __post_init__(self) -> None:
        if self.requests is None:
            object.__setattr__(self, "requests", self.batch)

    def label(self) -> str:
        text = (f"{self.model}: batch {self.batch}, context {self.context}, page {self.page}, "
                f"output {self.output}")
        if self.requests != self.batch or self.rate or self.mix != "fixed":
            arrivals = f"{self.rate:g}/s" if self.rate else "at once"
            text += f", {self.requests} {self.mix} requests {arrivals}"
        if self.kv_mb is not None:
            text += f", {self.kv_mb} MB KV"
        if self.policy != "continuous":
            text += f", {self.policy} batching"
        return text

    def replace(self, **changes) -> "RunKey":
        return replace(self, **changes)

    def to_json(self) -> dict:
        return asdict(self)

    def workload(self) -> WorkloadSpec:
        """The requests this run serves (the same list for every policy and KV size)."""
        return WorkloadSpec(num_requests=self.requests, prompt_len=self.context,
                            output_len=self.output, rate=self.rate or None,
                            mix=MIXES.get(self.mix, self.mix))


def request_tokens(key: RunKey) -> list[int]:
    """Prompt + output tokens of each request, drawn without token ids."""
    shape = draw_shape(key.workload())
    return [p + o for p, o in zip(shape.prompt_lens, shape.output_lens)]


def kv_need_bytes(key: RunKey, cfg: ModelConfig, elem: int) -> int:
    """KV bytes the workload holds at its fullest: the `batch` largest requests at full length,
    every page counted whole."""
    per_seq = sorted((blocks_for(t, key.page) * key.page for t in request_tokens(key)),
                     reverse=True)
    return sum(per_seq[:key.batch]) * cfg.kv_bytes_per_token(elem)


def kv_capacity_bytes(key: RunKey, cfg: ModelConfig, elem: int) -> int:
    """The KV cache this run gets: `kv_mb`, or the workload's full need when it is None."""
    if key.kv_mb is None:
        return max(kv_need_bytes(key, cfg, elem), key.page * cfg.kv_bytes_per_token(elem))
    return key.kv_mb * 2**20


def num_blocks(key: RunKey, cfg: ModelConfig, elem: int) -> int:
    """KV pages in this run's cache."""
    return kv_capacity_bytes(key, cfg, elem) // (key.page * cfg.kv_bytes_per_token(elem))


def running_bounds(key: RunKey, cfg: ModelConfig, elem: int) -> RunningBounds:
    """How many sequences may run at once: the batch cap (or the request count), and what memory
    allows when every sequence holds its full length and when each holds only its prompt.

    floor(KV blocks / blocks per sequence): the scheduler admits a request once its prompt's
    pages are free, so early in a run up to the second number run; as they grow towards the
    first number, the newest are evicted (preempted) to make room.
    """
    blocks = num_blocks(key, cfg, elem)
    shape = draw_shape(key.workload())
    full = statistics.mean(blocks_for(p + o, key.page)
                           for p, o in zip(shape.prompt_lens, shape.output_lens))
    prompt = statistics.mean(blocks_for(p + 1, key.page) for p in shape.prompt_lens)
    return RunningBounds(batch_cap=min(key.batch, key.requests), at_full_length=int(blocks // full),
                         on_prompt=int(blocks // prompt), num_blocks=blocks, blocks_full=full)


def estimate_run_s(key: RunKey, cfg: ModelConfig, probe: analytic.DeviceProbe, elem: int) -> float:
    """A deliberately rough upper estimate of the run's time, from the measured device limits."""
    params = cfg.num_params()
    shape = draw_shape(key.workload())
    prompts = shape.prompt_lens
    attn_flops = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * \
        sum(p * p for p in prompts)
    prefill = (2 * params * sum(prompts) + attn_flops) / probe.flops_per_s
    # Decode steps: static batching runs each batch of `batch` requests until its longest is done;
    # continuous batching needs at least the longest output, and at least the tokens over the batch.
    outputs = shape.output_lens
    if key.policy == "static":
        steps = sum(max(outputs[i:i + key.batch]) for i in range(0, len(outputs), key.batch))
    else:
        steps = max(max(outputs), sum(outputs) / key.batch)
    running = min(key.batch, key.requests)
    kv_read = cfg.kv_bytes_per_token(elem) * running * (key.context + key.output / 2)
    decode = steps * max(
        analytic.decode_tpot_floor_s(params * elem, int(kv_read), probe.bandwidth_bytes_s),
        2 * params * running / probe.flops_per_s)
    # Measured engines run a few times above these floors on small models; budget for it. Arrivals
    # spread over time add their span: the engine waits for them in real time.
    return 3.0 * (prefill + decode) + max(shape.arrivals_s)


def malformed(key: RunKey) -> str | None:
    """Why `key` is no run at all (a value out of its domain), or None."""
    if min(key.batch, key.context, key.page, key.output, key.requests, key.chunk) < 1:
        return "Batch, context, page size, output, requests and chunk must each be at least 1."
    if key.rate < 0 or key.mix not in MIXES or key.policy not in POLICIES:
        return "Rate must be 0 or more, mix fixed or mixed, and policy continuous or static."
    return None


def check_run(key: RunKey, limits: Limits, engine: EngineInfo) -> str | None:
    """Why this run may not start (one sentence for the learner), or None."""
    why = malformed(key)
    if why is not None:
        return why
    try:
        cfg = preset(key.model)
    except ConfigError as err:
        return str(err)
    if key.kv_mb is not None and key.kv_mb * 2**20 > limits.kv_budget_bytes:
        return (f"KV memory of {key.kv_mb} MB is past this server's cap of "
                f"{limits.kv_budget_bytes / 2**20:.0f} MB (LAB_KV_BUDGET_MB).")
    elem = engine.bytes_per_elem
    longest = max(request_tokens(key))
    if longest > cfg.max_position_embeddings:
        what = "the longest drawn request" if key.mix != "fixed" else "context + output"
        return (f"At {longest} tokens, {what} is past this model's maximum of "
                f"{cfg.max_position_embeddings} positions.")
    per_token = cfg.kv_bytes_per_token(elem)
    if key.kv_mb is None:
        need = kv_need_bytes(key, cfg, elem)
        if need > limits.kv_budget_bytes:
            return (f"This run needs {need / 1e9:.3g} GB of KV cache ({min(key.batch, key.requests)} "
                    f"sequences of up to {longest} tokens in pages of {key.page}), but the lab's "
                    f"budget is {limits.kv_budget_bytes / 1e9:.3g} GB. Lower the batch, context or "
                    "output.")
    elif blocks_for(longest, key.page) > num_blocks(key, cfg, elem):
        need_mb = blocks_for(longest, key.page) * key.page * per_token / 2**20
        return (f"One request of {longest} tokens needs {need_mb:.2f} MB of KV pages, more than "
                f"the {key.kv_mb} MB cache holds, so it could never run. Raise KV memory or lower "
                "the context or output.")
    seconds = estimate_run_s(key, cfg, engine.probe, elem)
    if seconds > limits.max_run_s:
        return (f"This run would take about {seconds:.0f} s on {engine.device}, "
                f"more than the {limits.max_run_s:.0f} s one learner may hold the shared device. "
                "Lower the requests, batch, context or output, or raise the rate.")
    return None


def run_spec(key: RunKey, engine: EngineInfo) -> dict:
    """The run `key` in the engine server's terms: EngineConfig and WorkloadSpec fields."""
    cfg = preset(key.model)
    w = key.workload()
    return {"engine": {"model": key.model, "block_size": key.page,
                       "kv_budget_bytes": kv_capacity_bytes(key, cfg, engine.bytes_per_elem),
                       "max_num_seqs": key.batch, "max_num_batched_tokens": key.chunk,
                       "policy": key.policy},
            "workload": {"num_requests": w.num_requests, "prompt_len": w.prompt_len,
                         "output_len": w.output_len, "rate": w.rate, "mix": w.mix,
                         "seed": w.seed},
            "repeat": key.repeat}


SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # batch sizes of the background TPOT sweep
SWEEP_RATES = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)  # arrival rates (req/s) of the goodput sweep


def sweep_key(key: RunKey, batch: int) -> RunKey:
    """The TPOT sweep's run at one batch: `batch` requests of the current context and output, all
    at once, with the memory they need, so each point is decode speed and nothing else. When the
    current run is that same workload, its key equals the sweep's."""
    return RunKey(key.model, batch, key.context, key.page, key.output, requests=batch)


def rate_key(key: RunKey, rate: float) -> RunKey:
    """The goodput sweep's run at one arrival rate: the current workload otherwise unchanged."""
    return key.replace(rate=rate, repeat=0)


def other_policy_key(key: RunKey) -> RunKey:
    """The same requests under the other batching policy."""
    return key.replace(policy="static" if key.policy == "continuous" else "continuous")


def ridge_batch(key: RunKey, cfg: ModelConfig, probe: analytic.DeviceProbe,
                elem: int) -> float | None:
    """The batch where the two floors cross, or None when the memory floor stays above the compute
    floor at every batch (KV reads growing faster than arithmetic)."""
    kv_per_seq = cfg.kv_bytes_per_token(elem) * (key.context + key.output / 2)
    compute_per_seq = 2 * cfg.num_params() / probe.flops_per_s
    memory_per_seq = kv_per_seq / probe.bandwidth_bytes_s
    if compute_per_seq <= memory_per_seq:
        return None
    return cfg.num_params() * elem / probe.bandwidth_bytes_s / (compute_per_seq - memory_per_seq)


def floors_ms(key: RunKey, batch: int, cfg: ModelConfig, probe: analytic.DeviceProbe,
              elem: int) -> tuple[float, float]:
    """The decode step's two roofline floors at `batch`, in ms: (memory, compute). Memory: the
    weights once plus every sequence's KV over bandwidth; compute: 2 FLOPs per weight per
    sequence over the measured FLOP/s."""
    kv_read = cfg.kv_bytes_per_token(elem) * batch * (key.context + key.output / 2)
    memory = analytic.decode_tpot_floor_s(cfg.num_params() * elem, int(kv_read),
                                          probe.bandwidth_bytes_s)
    compute = 2 * cfg.num_params() * batch / probe.flops_per_s
    return 1e3 * memory, 1e3 * compute
