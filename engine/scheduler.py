"""Which sequences run in the next step, and with how many tokens each.

Continuous batching (Orca's iteration-level scheduling): every step re-forms the batch, so finished
requests leave and waiting ones join between any two tokens. Decodes are scheduled first, then
unfinished prefills, then new requests, all inside a token budget (`max_num_batched_tokens`); with
chunked prefill a long prompt is split across steps instead of stalling the decodes behind it.
When a decode needs a block and none is free, the newest running request is preempted and will be
recomputed from scratch later. The static policy is the request-level baseline: a batch is formed
only when the previous one has completely drained.

Bookkeeping only: the scheduler never touches tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager, ContiguousAllocator
from engine.config import EngineConfig
from engine.sequence import Sequence, Status


@dataclass
class Batch:
    """One step's work: (sequence, tokens to feed) pairs, decodes first."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    """Admission, batching and preemption over one block manager."""

    def __init__(self, config: EngineConfig, blocks: BlockManager, max_len: int) -> None:
        self.config = config
        self.blocks = blocks
        self.contiguous = ContiguousAllocator(max_len)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._admitted = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Drop a request wherever it is (its client left); its blocks are free when this returns."""
        seq = next((s for s in (*self.waiting, *self.running) if s.id == seq_id), None)
        if seq is None:
            return None
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq_id)
        self.contiguous.free(seq_id)
        seq.status = Status.FINISHED
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- scheduling ----------------------------------------------------------------------------
    def schedule(self, now: float) -> Batch:
        batch = Batch()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(batch, budget)
        if self.config.policy == "continuous" or not self.running:
            self._admit_waiting(batch, budget, now)
        return batch

    def _schedule_running(self, batch: Batch, budget: int) -> int:
        decodes = [s for s in self.running if s.is_decode]
        prefills = [s for s in self.running if not s.is_decode]
        for seq in decodes:
            if seq.status is not Status.RUNNING or budget < 1:
                continue
            if not self._reserve(seq, seq.num_computed + 1, batch):
                continue  # seq itself was the newest and got preempted
            batch.items.append((seq, 1))
            budget -= 1
        for seq in prefills:
            if seq.status is not Status.RUNNING:
                continue  # preempted above to make room for a decode
            chunk = self._chunk(seq, budget)
            if chunk == 0 or not self.blocks.can_allocate(seq.id, seq.num_computed + chunk):
                break
            self.blocks.allocate(seq.id, seq.num_computed + chunk)
            batch.items.append((seq, chunk))
            budget -= chunk
        return budget

    def _reserve(self, seq: Sequence, total: int, batch: Batch) -> bool:
        """Find room for `seq` to hold `total` tokens, preempting the newest others if needed."""
        while not self.blocks.can_allocate(seq.id, total):
            victim = max(self.running, key=lambda s: s.admitted_order)
            self._preempt(victim, batch)
            if victim is seq:
                return False
        self.blocks.allocate(seq.id, total)
        return True

    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        self.running.remove(seq)
        batch.items = [(s, n) for s, n in batch.items if s is not seq]
        self.blocks.free(seq.id)
        self.contiguous.free(seq.id)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)  # recomputed first, ahead of newer arrivals
        batch.preempted.append(seq.id)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of `seq`'s prefill that fit the budget (all of it, or none, without chunking)."""
        if self.config.chunked_prefill:
            return min(seq.remaining, budget)
        return seq.remaining if seq.remaining <= budget else 0

    def _admit_waiting(self, batch: Batch, budget: int, now: float) -> None:
        # A static batch is formed whole: members past the token budget join now and start their
        # prefill in later steps, and nobody else joins until the batch has drained.
        static = self.config.policy == "static"
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            chunk = self._chunk(seq, budget)
            if chunk == 0 and not static:
                break
            if not self.blocks.can_allocate(seq.id, seq.num_computed + max(chunk, 1)):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq.id, seq.num_computed + chunk)
            self.contiguous.allocate(seq.id)
            seq.status = Status.RUNNING
            seq.admitted_order = self._admitted
            self._admitted += 1
            if seq.record.scheduled_s is None:
                seq.record.scheduled_s = now
            self.running.append(seq)
            if chunk:
                batch.items.append((seq, chunk))
                budget -= chunk

    # -- after the forward pass ----------------------------------------------------------------
    def finish_step(self, batch: Batch, sampled: dict[int, int], now: float) -> list[int]:
        """Advance each scheduled sequence, append sampled tokens, retire finished ones."""
        finished = []
        for seq, n in batch.items:
            seq.num_computed += n
            if seq.id in sampled:
                seq.append(sampled[seq.id], now)
            if seq.done:
                seq.status = Status.FINISHED
                seq.record.finish_s = now
                self.running.remove(seq)
                self.blocks.free(seq.id)
                self.contiguous.free(seq.id)
                finished.append(seq.id)
        return finished
