"""The serving loop: admit arriving requests, schedule, run, record, repeat.

Two ways to drive one engine, over one API (`add_request`, `abort`, `step`):
- `LLMEngine(config).run(workload, on_step=...)`, the closed loop, returns a `Trace` of measured
  records. It keeps real time: requests arrive when their arrival time comes, the loop sleeps when
  idle.
- The HTTP server (`engine.server`) calls `add_request` and `abort` as clients come and go, and
  `step()` in a loop of its own.

`step()` has nano-vllm's shape: the scheduler picks the batch, the runner runs it (and alone
chooses how: `engine.runner.choose_path`), the scheduler post-processes. The closed loop adds only
arrivals and waiting around `step()`. Every step is timed with the wall clock (the sampler's
`.tolist()` waits for the device, so CUDA work is done before the clock is read). The engine knows
nothing of text or of the page that draws its records.
"""
from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence as Seq
from dataclasses import replace

import torch

from engine.block_manager import BlockManager, blocks_for
from engine.config import ConfigError, EngineConfig, dtype_for
from engine.cpu_threads import blas_threads, cpu_label, engine_threads
from engine.kv_cache import KVCache
from engine.model import Llama
from engine.records import PageSnapshot, RequestRecord, ScheduledItem, StepRecord, Trace
from engine.runner import ModelRunner, capture_decode_graphs, graphs_supported
from engine.sampling_params import GREEDY, SamplingParams
from engine.scheduler import Batch, Scheduler
from engine.sequence import Sequence
from engine.weights import load_model
from engine.workload import Request, WorkloadSpec, make_requests

CPU_KV_BUDGET = 512 * 2**20  # a CPU run rarely needs more, and the lab's host has other users
GPU_KV_FRACTION = 0.5  # of the memory left free after the weights


class Cancelled(Exception):
    """The caller asked the run to stop (a newer job superseded it)."""


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """What the page and the CLI print as the measuring device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_label(blas_threads())  # runs do the step's products on this many


class LLMEngine:
    """One model, one paged KV cache, one scheduler policy."""

    def __init__(self, config: EngineConfig, model: Llama | None = None) -> None:
        """`model` reuses weights already loaded (for the same config.model) instead of loading."""
        self.config = config
        self.device = pick_device(config.device)
        self.dtype = getattr(torch, dtype_for(self.device.type))
        self.model = model or load_model(config.model, config.seed, self.device, self.dtype,
                                         config.model_config)
        self.model_config = self.model.config
        self.max_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_len > self.model_config.max_position_embeddings:
            raise ConfigError(f"max_model_len {self.max_len} is past the model's maximum of "
                              f"{self.model_config.max_position_embeddings} positions")
        elem = torch.finfo(self.dtype).bits // 8
        self.block_bytes = self.model_config.kv_bytes_per_token(elem) * config.block_size
        budget = config.kv_budget_bytes or self._default_budget()
        self.num_blocks = budget // self.block_bytes
        if self.num_blocks < 1:
            raise ConfigError(f"KV budget of {budget} bytes holds no block of {self.block_bytes} "
                              "bytes; raise the budget or lower the page size")
        use_graphs = config.cuda_graphs and graphs_supported(self.device)
        try:
            # With graphs, one block past the manager's range is the scratch target of padding rows.
            self.cache = KVCache(self.model_config, self.num_blocks + int(use_graphs),
                                 config.block_size, self.dtype, self.device)
        except RuntimeError:  # CPU allocation failure, or CUDA OOM (a RuntimeError subclass)
            raise ConfigError(f"cannot allocate a KV cache of {self.num_blocks * self.block_bytes} "
                              f"bytes on {self.device.type}; lower the KV budget") from None
        self.device_name = describe_device(self.device)
        with engine_threads(self.device):
            self._warm_up()
        # Captured after the eager warm-up, every ladder size at once: see DecodeGraphs.
        self.graphs = (capture_decode_graphs(self.model, self.cache, config.max_num_seqs,
                                             self.max_len, scratch_block=self.num_blocks)
                       if use_graphs else None)
        self.reset()

    def _default_budget(self) -> int:
        if self.device.type != "cuda":
            return CPU_KV_BUDGET
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * GPU_KV_FRACTION)

    def _warm_up(self) -> None:
        """One tiny prefill and decode so one-time allocations do not land in the first TTFT."""
        blocks = BlockManager(self.num_blocks, self.config.block_size)
        runner = ModelRunner(self.model, self.cache, blocks, self.device)
        seq = Sequence(RequestRecord(id=-1, prompt_ids=[0, 1], max_tokens=2, arrival_s=0.0))
        for _ in range(2):
            blocks.allocate(seq.id, seq.num_tokens)
            token = runner.run(Batch(items=[(seq, seq.remaining)]))
            seq.num_computed = seq.num_tokens
            seq.append(token[seq.id], 0.0)

    # -- checks --------------------------------------------------------------------------------
    def check(self, requests: Seq[Request]) -> None:
        """Refuse a workload no request of which could ever run."""
        cfg = self.config
        shortest = min(len(r.prompt_ids) + r.max_tokens for r in requests)
        if shortest > self.max_len:
            raise ConfigError(f"context + output = {shortest} tokens is past the model's maximum "
                              f"of {self.max_len}")
        if blocks_for(shortest, cfg.block_size) > self.num_blocks:
            raise ConfigError(
                f"the KV budget holds {self.num_blocks} blocks of {cfg.block_size} tokens "
                f"({self.num_blocks * cfg.block_size} tokens); one request needs {shortest}")
        if not cfg.chunked_prefill and shortest > cfg.max_num_batched_tokens:
            raise ConfigError(f"without chunked prefill a request of {shortest} tokens needs "
                              f"max_num_batched_tokens >= {shortest}")

    def why_never(self, prompt_ids: Seq[int], max_tokens: int) -> str | None:
        """Why one request can never be served here, or None. Reads only the config: any thread."""
        total = len(prompt_ids) + max_tokens
        # An empty prompt never gets a chunk and blocked the queue head forever (the loop then
        # raised "made no progress"); zero max_tokens still produced one token.
        if not prompt_ids:
            return "the prompt is empty"
        if max_tokens < 1:
            return f"max_tokens must be at least 1, got {max_tokens}"
        if total > self.max_len:
            return f"{total} tokens is past the model's maximum of {self.max_len}"
        if blocks_for(total, self.config.block_size) > self.num_blocks:
            return f"{total} tokens need more KV blocks than the cache holds ({self.num_blocks})"
        if not self.config.chunked_prefill and total > self.config.max_num_batched_tokens:
            return f"{total} tokens exceed the per-step token budget without chunked prefill"
        if any(not 0 <= t < self.model_config.vocab_size for t in prompt_ids):
            return "prompt holds token ids outside the vocabulary"
        return None

    # -- the online API: add, abort, step -------------------------------------------------------
    def reset(self) -> None:
        """An empty cache, no requests, and time zero now (times in records count from here)."""
        cfg = self.config
        self.blocks = BlockManager(self.num_blocks, cfg.block_size)
        self.scheduler = Scheduler(cfg, self.blocks, self.max_len)
        self.runner = ModelRunner(self.model, self.cache, self.blocks, self.device, self.graphs)
        self.num_steps = 0
        self._t0 = time.perf_counter()

    def now(self) -> float:
        """Seconds since the last `reset`, the clock of every record."""
        return time.perf_counter() - self._t0

    def add_request(self, record: RequestRecord,
                    sampling: SamplingParams = GREEDY) -> Sequence | None:
        """Queue a request for the next step; None (and `record.rejected` says why) if it never can.

        A sampled request without a seed gets one here, so that its draws stay fixed from now on.
        """
        record.rejected = self.why_never(record.prompt_ids, record.max_tokens)
        if record.rejected is not None:
            return None
        if not sampling.greedy and sampling.seed is None:
            sampling = replace(sampling, seed=random.getrandbits(63))
        seq = Sequence(record, sampling)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: int) -> Sequence | None:
        """Drop a queued or running request now, freeing its blocks; None if it was not here."""
        return self.scheduler.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> StepRecord | None:
        """One iteration: schedule, run the batch on the device, then post-process.

        Returns the step's record, or None when nothing could be scheduled (everyone left is
        waiting for memory that only an arrival or an abort can change).
        """
        allocated, freed = self.blocks.allocated_total, self.blocks.freed_total
        t_start = self.now()
        batch = self.scheduler.schedule(t_start)
        if not batch.items:
            return None
        items = [ScheduledItem(seq.id, n, not seq.is_decode, seq.num_computed + n)
                 for seq, n in batch.items]
        sampled = self.runner.run(batch)
        t_end = self.now()
        finished = self.scheduler.finish_step(batch, sampled, t_end)
        step = self._record(self.num_steps, t_start, t_end, items, batch.preempted, finished,
                            allocated, freed)
        self.num_steps += 1
        return step

    # -- the closed loop -----------------------------------------------------------------------
    def run(self, workload: WorkloadSpec | Seq[Request],
            on_step: Callable[[StepRecord], None] | None = None,
            cancel: threading.Event | None = None) -> Trace:
        """Serve every request of `workload`; `on_step` sees each step's record as it happens."""
        with engine_threads(self.device):
            return self._serve(workload, on_step, cancel)

    def _serve(self, workload: WorkloadSpec | Seq[Request],
               on_step: Callable[[StepRecord], None] | None,
               cancel: threading.Event | None) -> Trace:
        requests = (make_requests(workload, self.model_config.vocab_size)
                    if isinstance(workload, WorkloadSpec) else list(workload))
        if not requests:
            raise ConfigError("the workload holds no requests")
        if len({r.id for r in requests}) < len(requests):  # block tables are keyed by request id
            raise ConfigError("request ids must be unique")
        self.check(requests)
        cfg = self.config
        records = [RequestRecord(id=r.id, prompt_ids=list(r.prompt_ids), max_tokens=r.max_tokens,
                                 arrival_s=r.arrival_s) for r in requests]
        pending = deque(sorted(zip(requests, records), key=lambda rr: rr[0].arrival_s))
        steps: list[StepRecord] = []
        peak: PageSnapshot | None = None
        peak_blocks = 0
        self.reset()

        while pending or self.has_work:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            while pending and pending[0][0].arrival_s <= self.now():
                self.add_request(pending.popleft()[1])
            step = self.step() if self.has_work else None
            if step is None:  # idle, or all left wait for memory: only an arrival changes that
                if not pending:
                    raise RuntimeError("scheduler made no progress with work left; this is a bug")
                time.sleep(max(0.0, pending[0][0].arrival_s - self.now()))
                continue
            steps.append(step)
            if peak is None or step.kv_blocks_used > peak_blocks:
                peak_blocks = step.kv_blocks_used
                peak = PageSnapshot(step.index, cfg.block_size, self.num_blocks,
                                    {k: list(v) for k, v in self.blocks.block_tables.items()},
                                    dict(self.blocks.num_tokens))
            if on_step is not None:
                on_step(step)
        return Trace(device=self.device_name, model=cfg.model, config=cfg.to_json(),
                     requests=records, steps=steps, block_size=cfg.block_size,
                     num_blocks=self.num_blocks, block_bytes=self.block_bytes,
                     kv_bytes_capacity=self.num_blocks * self.block_bytes, duration_s=self.now(),
                     peak_snapshot=peak, weight_bytes=self.model.weight_bytes())

    def _record(self, index: int, t_start: float, t_end: float, items: list[ScheduledItem],
                preempted: list[int], finished: list[int], allocated: int,
                freed: int) -> StepRecord:
        """The step's counts, read from the allocator after the step."""
        scheduler, blocks = self.scheduler, self.blocks
        decode_seqs = sum(not it.is_prefill for it in items)
        token_bytes = self.block_bytes // self.config.block_size
        return StepRecord(
            index=index, t_start=t_start, t_end=t_end,
            prefill_tokens=sum(it.num_tokens for it in items if it.is_prefill),
            decode_seqs=decode_seqs, running=len(scheduler.running),
            waiting=len(scheduler.waiting), kv_blocks_used=blocks.num_used,
            kv_bytes_used=blocks.num_used * self.block_bytes, waste_tokens=blocks.waste_tokens,
            tokens_stored=blocks.tokens_stored,
            contiguous_bytes=scheduler.contiguous.reserved_tokens * token_bytes,
            scheduled=items, blocks_allocated=blocks.allocated_total - allocated,
            blocks_freed=blocks.freed_total - freed, finished=finished,
            preempted=list(preempted))

