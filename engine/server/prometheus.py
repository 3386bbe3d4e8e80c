"""`GET /metrics`: the engine's state and latencies in Prometheus text, under vLLM's names.

Names and labels follow vLLM V1 (`model_name` and `engine` on every series; `vllm:cache_config_info`
as a gauge of 1 whose labels carry the cache shape), so dashboards and clients written for vLLM
(the lab's endpoint mode among them) read this server unchanged. Histogram buckets are vLLM's,
with finer ones added below its smallest: a CPU decode step here takes milliseconds.

The engine loop feeds this from its thread after each step; prometheus_client is thread-safe.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.records import RequestRecord

_FINE = [0.001, 0.002, 0.003, 0.005, 0.0075]
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = _FINE + [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                       5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


class ServerMetrics:
    """One registry per server (never the process-wide default, so tests can start several)."""

    def __init__(self, model_name: str, block_size: int, num_blocks: int) -> None:
        self.registry = CollectorRegistry()
        names = ["model_name", "engine"]
        values = {"model_name": model_name, "engine": "0"}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=self.registry).labels(**values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=self.registry).labels(**values)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets,
                             registry=self.registry).labels(**values)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc",
                              "Fraction of KV-cache blocks in use (1 means all).")
        self.preemptions = counter("vllm:num_preemptions", "Preemptions since the server started.")
        self.prompt_tokens = counter("vllm:prompt_tokens",
                                     "Prompt tokens of requests that produced a first token.")
        self.generation_tokens = counter("vllm:generation_tokens", "Output tokens produced.")
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Arrival to first token, per request.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Gap between consecutive output tokens of one request.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Arrival to last token, per finished request.", E2E_BUCKETS)
        info = Gauge("vllm:cache_config_info", "The KV cache's configuration.",
                     ["block_size", "num_gpu_blocks", "engine"], registry=self.registry)
        info.labels(block_size=str(block_size), num_gpu_blocks=str(num_blocks), engine="0").set(1)

    def set_state(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def tokens(self, record: RequestRecord, new: int) -> None:
        """`new` tokens just appended to `record`: count them and their latencies."""
        times = record.token_times_s
        first = len(times) - new
        for i in range(first, len(times)):
            if i == 0:
                self.ttft.observe(times[0] - record.arrival_s)
                self.prompt_tokens.inc(len(record.prompt_ids))
            else:
                self.itl.observe(times[i] - times[i - 1])
        self.generation_tokens.inc(new)

    def finished(self, record: RequestRecord) -> None:
        self.e2e.observe(record.token_times_s[-1] - record.arrival_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
