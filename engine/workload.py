"""Synthetic request streams: prompt and output lengths, arrival times, seeded.

Arrivals follow vLLM's `bench serve` meaning: `rate=None` sends every request at t=0; otherwise the
gaps between requests are gamma-distributed with mean 1/rate and shape `burstiness` (1.0 is a Poisson
process; smaller is burstier). Prompt token ids are random: the engine knows nothing of text.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import ConfigError


@dataclass(frozen=True)
class Request:
    """What a client sends: a prompt, how many tokens to generate, and when it arrives."""

    id: int
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float


@dataclass(frozen=True)
class WorkloadSpec:
    """A seeded recipe for a list of requests."""

    num_requests: int = 8
    prompt_len: int = 128  # fixed length, or the low end when prompt_len_max is set
    output_len: int = 64
    prompt_len_max: int | None = None  # draw prompt lengths uniformly in [prompt_len, max]
    output_len_max: int | None = None  # draw output lengths uniformly in [output_len, max]
    rate: float | None = None  # requests per second; None sends all at t=0
    burstiness: float = 1.0  # gamma shape of inter-arrival gaps; 1.0 is Poisson
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ConfigError(f"need at least one request, got {self.num_requests}")
        if self.prompt_len < 1:
            raise ConfigError(f"context (prompt) length must be at least 1, got {self.prompt_len}")
        if self.output_len < 1:
            raise ConfigError(f"output length must be at least 1 token, got {self.output_len}")
        for low, high, what in ((self.prompt_len, self.prompt_len_max, "prompt"),
                                (self.output_len, self.output_len_max, "output")):
            if high is not None and high < low:
                raise ConfigError(f"{what} length range is empty: {low}..{high}")
        if self.rate is not None and not self.rate > 0:
            raise ConfigError(f"request rate must be positive, got {self.rate}")
        if not self.burstiness > 0:
            raise ConfigError(f"burstiness must be positive, got {self.burstiness}")

    @property
    def longest(self) -> int:
        """The most tokens any one request can hold: longest prompt plus longest output."""
        return (self.prompt_len_max or self.prompt_len) + (self.output_len_max or self.output_len)


def make_requests(spec: WorkloadSpec, vocab_size: int) -> list[Request]:
    """Draw the requests `spec` describes, reproducibly."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests

    def lengths(low: int, high: int | None) -> np.ndarray:
        if high is None or high == low:
            return np.full(n, low)
        return rng.integers(low, high + 1, size=n)

    prompt_lens = lengths(spec.prompt_len, spec.prompt_len_max)
    output_lens = lengths(spec.output_len, spec.output_len_max)
    if spec.rate is None:
        arrivals = np.zeros(n)
    else:
        gaps = rng.gamma(spec.burstiness, 1.0 / (spec.rate * spec.burstiness), size=n)
        gaps[0] = 0.0  # the first request opens the run
        arrivals = np.cumsum(gaps)
    return [Request(id=i, prompt_ids=rng.integers(0, vocab_size, size=int(p)).tolist(),
                    max_tokens=int(o), arrival_s=float(a))
            for i, (p, o, a) in enumerate(zip(prompt_lens, output_lens, arrivals))]
