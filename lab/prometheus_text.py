"""What the lab reads from a serving engine's `/metrics`: Prometheus text, parsed by hand.

`parse` turns the text exposition format into samples (name, labels, value); `read_sample` picks the
few series the lab plots, under vLLM's names or SGLang's equivalents, into one `MetricsSample`.
A name the endpoint does not export is None, never zero: the plots say what is missing instead of
drawing a line at zero. Only the standard library: the page process never imports torch, and the
lab needs no Prometheus client to read a few gauges.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

# One line of the text format: a name, optional {labels}, a value, an optional timestamp.
_LINE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?\s*')

# The series the lab reads, each under the names engines export it as (first match wins).
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
PREEMPTIONS = ("vllm:num_preemptions_total",)
TTFT = ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds")
ITL = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds",
       "sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds")
CACHE_INFO = "vllm:cache_config_info"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class MetricsUnreadable(ValueError):
    """The text is not Prometheus exposition format (a web page, an error, garbage)."""


def _unescape(value: str) -> str:
    return value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def parse(text: str) -> list[Sample]:
    """Every sample in `text`; comment lines (# HELP, # TYPE) and blank lines are skipped."""
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise MetricsUnreadable(f"line {number} is not a Prometheus sample: {line[:60]!r}")
        name, raw_labels, raw_value = m.groups()
        labels = {k: _unescape(v) for k, v in _LABEL.findall(raw_labels[1:-1])} \
            if raw_labels else {}
        try:
            value = float(raw_value)  # also "NaN", "+Inf", "-Inf"
        except ValueError:
            raise MetricsUnreadable(f"line {number} has no number: {line[:60]!r}") from None
        samples.append(Sample(name, labels, value))
    return samples


def _values(samples: list[Sample], names: tuple[str, ...]) -> list[float] | None:
    """The values of the first of `names` present (one per label set: an engine, a rank)."""
    for name in names:
        found = [s.value for s in samples if s.name == name and math.isfinite(s.value)]
        if found:
            return found
    return None


def total(samples: list[Sample], names: tuple[str, ...]) -> float | None:
    """The sum over label sets (several data-parallel engines add up), or None if absent."""
    found = _values(samples, names)
    return sum(found) if found is not None else None


def mean(samples: list[Sample], names: tuple[str, ...]) -> float | None:
    """The mean over label sets (a fraction per engine), or None if absent."""
    found = _values(samples, names)
    return sum(found) / len(found) if found else None


def histogram(samples: list[Sample], names: tuple[str, ...]) -> tuple[float, float] | None:
    """A histogram's (sum, count), added over label sets, or None if absent."""
    for name in names:
        parts = total(samples, (name + "_sum",)), total(samples, (name + "_count",))
        if parts[0] is not None and parts[1] is not None:
            return parts
    return None


def cache_block_size(samples: list[Sample]) -> int | None:
    """The KV block size vLLM reports in `cache_config_info`'s labels, if it does."""
    for s in samples:
        if s.name == CACHE_INFO and s.labels.get("block_size", "").isdigit():
            return int(s.labels["block_size"])
    return None


@dataclass(frozen=True)
class MetricsSample:
    """One scrape of an endpoint's /metrics, at `t_s` seconds into a run."""

    t_s: float
    kv_usage: float | None  # fraction of KV cache in use, 0-1
    running: float | None
    waiting: float | None
    preemptions: float | None  # the counter's value since the server started
    ttft: tuple[float, float] | None  # the TTFT histogram's (sum, count) since the server started
    itl: tuple[float, float] | None  # the inter-token latency histogram's (sum, count)
    block_size: int | None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "MetricsSample":
        return cls(**{**d, "ttft": tuple(d["ttft"]) if d.get("ttft") else None,
                      "itl": tuple(d["itl"]) if d.get("itl") else None})


def read_sample(text: str, t_s: float) -> MetricsSample:
    """The lab's series from one scrape; MetricsUnreadable when the text has none of them."""
    samples = parse(text)
    sample = MetricsSample(t_s=t_s, kv_usage=mean(samples, KV_USAGE),
                           running=total(samples, RUNNING), waiting=total(samples, WAITING),
                           preemptions=total(samples, PREEMPTIONS),
                           ttft=histogram(samples, TTFT), itl=histogram(samples, ITL),
                           block_size=cache_block_size(samples))
    if sample.kv_usage is None and sample.running is None and sample.waiting is None:
        raise MetricsUnreadable("it has none of the series the lab reads (KV cache use, running "
                                "and waiting requests, under vLLM's or SGLang's names)")
    return sample


def interval_mean(first: tuple[float, float] | None,
                  last: tuple[float, float] | None) -> tuple[float, int] | None:
    """The mean and count of what a histogram observed between two scrapes, or None."""
    if first is None or last is None:
        return None
    count = last[1] - first[1]
    if count <= 0:
        return None
    return (last[0] - first[0]) / count, int(round(count))
