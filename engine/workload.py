"""Synthetic request streams: prompt and output lengths, arrival times, seeded.

Arrivals follow vLLM's `bench serve` meaning: `rate=None` sends every request at t=0; otherwise the
gaps between requests are gamma-distributed with mean 1/rate and shape `burstiness` (1.0 is a Poisson
process; smaller is burstier). Lengths are fixed, uniform in a range, or, with `mix="lognormal"`,
long-tailed around their mean as chat traces are (many short requests, a few very long ones).
Prompt token ids are random: the engine knows nothing of text.
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
    # "fixed" (or uniform where a *_max is set) or "lognormal": lengths drawn with the given means
    # (prompt_len, output_len), spread LOGNORMAL_SIGMA, clipped to [1, LOGNORMAL_CAP x the mean]
    mix: str = "fixed"

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
        if self.mix not in MIXES:
            raise ConfigError(f"unknown length mix {self.mix!r}; choose one of {', '.join(MIXES)}")
        if self.mix == "lognormal" and (self.prompt_len_max or self.output_len_max):
            raise ConfigError("a lognormal mix draws its own spread; give no length range with it")

    @property
    def longest(self) -> int:
        """The most tokens any one request can hold: longest prompt plus longest output."""
        if self.mix == "lognormal":
            return lognormal_cap(self.prompt_len) + lognormal_cap(self.output_len)
        return (self.prompt_len_max or self.prompt_len) + (self.output_len_max or self.output_len)


MIXES = ("fixed", "lognormal")
# Prompt tokens one workload may hold in all. The ids live in Python lists, copied into each
# request's record and sequence (about 100 bytes a token in all), so this keeps them near 400 MB;
# at the CPU model's prefill rate it is hours of work, far past anything the lab or bench runs.
MAX_WORKLOAD_TOKENS = 1 << 22
LOGNORMAL_SIGMA = 0.8  # spread of log length: the longest tenth of requests is about 2.4x the mean
LOGNORMAL_CAP = 4  # no drawn length exceeds this multiple of its mean


def lognormal_cap(mean: int) -> int:
    """The longest length a lognormal mix can draw around `mean`."""
    return LOGNORMAL_CAP * mean


@dataclass(frozen=True)
class Shape:
    """A workload's lengths and arrival times, drawn without token ids (cheap to check)."""

    prompt_lens: list[int]
    output_lens: list[int]
    arrivals_s: list[float]


def draw_shape(spec: WorkloadSpec, rng: np.random.Generator | None = None) -> Shape:
    """The lengths and arrivals `spec` describes, reproducibly; `make_requests` adds the ids."""
    rng = rng if rng is not None else np.random.default_rng(spec.seed)
    n = spec.num_requests

    def lengths(mean: int, high: int | None) -> np.ndarray:
        if spec.mix == "lognormal":
            # mu chosen so that the mean of the unclipped draw is `mean`
            drawn = rng.lognormal(np.log(mean) - LOGNORMAL_SIGMA ** 2 / 2, LOGNORMAL_SIGMA, n)
            return np.clip(np.rint(drawn), 1, lognormal_cap(mean)).astype(int)
        if high is None or high == mean:
            return np.full(n, mean)
        return rng.integers(mean, high + 1, size=n)

    prompt_lens = lengths(spec.prompt_len, spec.prompt_len_max)
    output_lens = lengths(spec.output_len, spec.output_len_max)
    if spec.rate is None:
        arrivals = np.zeros(n)
    else:
        gaps = rng.gamma(spec.burstiness, 1.0 / (spec.rate * spec.burstiness), size=n)
        gaps[0] = 0.0  # the first request opens the run
        arrivals = np.cumsum(gaps)
    return Shape([int(p) for p in prompt_lens], [int(o) for o in output_lens],
                 [float(a) for a in arrivals])


def longest_prompt(spec: WorkloadSpec) -> int:
    """The most prompt tokens any one request of `spec` can hold."""
    if spec.mix == "lognormal":
        return lognormal_cap(spec.prompt_len)
    return spec.prompt_len_max or spec.prompt_len


def make_requests(spec: WorkloadSpec, vocab_size: int) -> list[Request]:
    """Draw the requests `spec` describes, reproducibly."""
    if spec.num_requests * longest_prompt(spec) > MAX_WORKLOAD_TOKENS:  # checked before any list
        raise ConfigError(f"{spec.num_requests} requests of up to {longest_prompt(spec)} prompt "
                          f"tokens are past the {MAX_WORKLOAD_TOKENS} a workload may hold")
    rng = np.random.default_rng(spec.seed)
    shape = draw_shape(spec, rng)  # ids come after the lengths from the same seeded stream
    return [Request(id=i, prompt_ids=rng.integers(0, vocab_size, size=p).tolist(),
                    max_tokens=o, arrival_s=a)
            for i, (p, o, a) in enumerate(zip(shape.prompt_lens, shape.output_lens,
                                              shape.arrivals_s))]
