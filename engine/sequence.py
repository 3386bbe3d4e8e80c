"""A request's state inside the engine: its tokens, how many of them are cached, and its record."""
from __future__ import annotations

import enum

from engine.records import RequestRecord
from engine.sampling_params import GREEDY, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens so far (prompt then outputs) and `num_computed`, how many have KV in the cache.

    A step feeds tokens `[num_computed, num_computed + chunk)`; when that reaches the last token the
    step samples a new one. A decode is the case where exactly one token is left to feed.
    """

    def __init__(self, record: RequestRecord, sampling: SamplingParams = GREEDY) -> None:
        self.record = record
        self.sampling = sampling
        self.token_ids: list[int] = list(record.prompt_ids)
        self.num_computed = 0
        self.status = Status.WAITING
        self.admitted_order = -1  # larger is newer; the preemption victim is the newest

    @property
    def id(self) -> int:
        return self.record.id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next one can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_decode(self) -> bool:
        return self.remaining == 1 and bool(self.record.output_ids)

    @property
    def stopped(self) -> bool:
        """The last output token is one of the request's stop tokens (EOS, say)."""
        out = self.record.output_ids
        return bool(out) and out[-1] in self.sampling.stop_token_ids

    @property
    def done(self) -> bool:
        return self.stopped or len(self.record.output_ids) >= self.record.max_tokens

    @property
    def finish_reason(self) -> str:
        """OpenAI's names: `stop` for a stop token, `length` for reaching max_tokens."""
        return "stop" if self.stopped else "length"

    def append(self, token: int, now: float) -> None:
        """Record a sampled token and when it came."""
        rec = self.record
        if rec.first_token_s is None:
            rec.first_token_s = now
        rec.output_ids.append(token)
        rec.token_times_s.append(now)
        self.token_ids.append(token)

    def reset_for_recompute(self) -> None:
        """Preempted: the cache is gone, so every token (outputs too) must be fed again."""
        self.num_computed = 0
        self.status = Status.WAITING
        self.record.preemptions += 1
