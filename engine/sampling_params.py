"""How one request wants its tokens chosen and when its output ends: plain data, no torch.

The sampler (`engine.sampler`) reads these per row; the sequence reads `stop_token_ids` to end an
output early. Closed-loop runs use the default, greedy with no stop token, so their traces depend
only on the prompt ids and `max_tokens`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.config import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 takes the most likely token (greedy); above 0 samples
    # Fixes the draws: the token at position i depends only on (seed, i, logits), so a request
    # samples the same output whatever else shares its batches, and again after a preemption.
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # an output ends after any of these (EOS, unless ignored)

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()
