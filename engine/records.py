"""What a run leaves behind: per-request and per-step records, and the whole trace.

These dataclasses are the engine's only output format. The scheduler and runner fill them while the
loop runs; `metrics.summarize` reads them; the lab's widgets draw them. Times are seconds since the
run started (`time.perf_counter()` relative to the run's start), measured, never modelled.
Nothing here imports torch, so the lab can hold traces without touching the device.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request's life: what it asked for, what it got, and when each event happened."""

    id: int
    prompt_ids: list[int]
    max_tokens: int  # output length asked for; generation stops there
    arrival_s: float
    scheduled_s: float | None = None  # first time any of its tokens entered a batch
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # one per output token
    output_ids: list[int] = field(default_factory=list)
    finish_s: float | None = None
    preemptions: int = 0
    rejected: str | None = None  # why it could never run (too long for the KV budget, ...)

    @property
    def finished(self) -> bool:
        return self.finish_s is not None and self.rejected is None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RequestRecord":
        return cls(**d)


@dataclass
class ScheduledItem:
    """One sequence's share of one step: how many tokens it contributed and of which kind."""

    request_id: int
    num_tokens: int  # prompt tokens in a prefill chunk, 1 for a decode
    is_prefill: bool
    context_len: int  # tokens in the KV cache for this sequence after the step


@dataclass
class StepRecord:
    """One engine iteration (one forward pass over a mixed batch)."""

    index: int
    t_start: float
    t_end: float
    prefill_tokens: int  # prompt tokens processed this step (all chunks together)
    decode_seqs: int  # sequences that produced a decode token this step
    running: int  # sequences holding KV blocks after the step
    waiting: int  # arrived requests not yet admitted (or preempted) after the step
    kv_blocks_used: int
    kv_bytes_used: int  # blocks used * bytes per block, as allocated
    waste_tokens: int  # reserved-but-empty slots in the last block of each live sequence
    tokens_stored: int = 0  # tokens actually held in the cache
    contiguous_bytes: int = 0  # what a max_len-per-request allocator would reserve right now
    scheduled: list[ScheduledItem] = field(default_factory=list)
    blocks_allocated: int = 0
    blocks_freed: int = 0
    finished: list[int] = field(default_factory=list)  # request ids that completed this step
    preempted: list[int] = field(default_factory=list)  # request ids evicted this step

    @property
    def duration_s(self) -> float:
        return self.t_end - self.t_start

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StepRecord":
        return cls(**{**d, "scheduled": [ScheduledItem(**item) for item in d["scheduled"]]})


@dataclass
class PageSnapshot:
    """The block tables at one moment: which physical blocks each live request owns."""

    step_index: int
    block_size: int
    num_blocks: int
    tables: dict[int, list[int]]  # request id -> physical block ids, in logical order
    tokens: dict[int, int]  # request id -> tokens stored

    def waste(self, request_id: int) -> int:
        """Empty slots in this request's last block."""
        return len(self.tables[request_id]) * self.block_size - self.tokens[request_id]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PageSnapshot":
        """JSON turns the request ids that key the tables into strings; this turns them back."""
        return cls(step_index=d["step_index"], block_size=d["block_size"],
                   num_blocks=d["num_blocks"],
                   tables={int(k): list(v) for k, v in d["tables"].items()},
                   tokens={int(k): v for k, v in d["tokens"].items()})


@dataclass
class Trace:
    """Everything one run measured, in order."""

    device: str  # human-readable, e.g. "CPU: 2 threads" or a GPU's name
    model: str  # preset name or checkpoint path
    config: dict[str, Any]
    requests: list[RequestRecord]
    steps: list[StepRecord]
    block_size: int
    num_blocks: int
    block_bytes: int  # KV bytes one block holds across all layers (K and V)
    kv_bytes_capacity: int
    duration_s: float = 0.0
    peak_snapshot: PageSnapshot | None = None  # block tables at the step of peak KV use
    weight_bytes: int = 0  # bytes of model weights, for the decode roofline

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["peak_snapshot"] = asdict(self.peak_snapshot) if self.peak_snapshot else None
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Trace":
        """The inverse of `to_json` (after a round trip through `json`): how a trace measured in
        the engine server's process reaches the lab's page process."""
        snapshot = d.get("peak_snapshot")
        return cls(**{**d, "requests": [RequestRecord.from_json(r) for r in d["requests"]],
                      "steps": [StepRecord.from_json(s) for s in d["steps"]],
                      "peak_snapshot": PageSnapshot.from_json(snapshot) if snapshot else None})


@dataclass(frozen=True)
class Outcome:
    """How a measured run ended for whoever asked: a trace, or a message saying why there is none.
    `to_event` and `from_event` are its form on the wire (POST /lab/runs, docs/server.md)."""

    trace: Trace | None = None
    error: str | None = None
    cancelled: bool = False
    cached: bool = False  # answered from the cache, not measured for this request

    def to_event(self, run: int) -> dict[str, Any]:
        if self.cancelled:
            return {"event": "cancelled", "run": run}
        if self.error is not None:
            return {"event": "error", "run": run, "message": self.error}
        return {"event": "done", "run": run, "trace": self.trace.to_json(), "cached": self.cached}

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> "Outcome":
        if event["event"] == "done":
            return cls(trace=Trace.from_json(event["trace"]), cached=bool(event.get("cached")))
        if event["event"] == "error":
            return cls(error=event["message"])
        return cls(cancelled=True)
