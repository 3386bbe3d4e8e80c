"""The lab against an external OpenAI-compatible endpoint (LAB_ENDPOINT), without a browser:
Prometheus text parsing, seeded Poisson arrivals, synthetic prompts sized by /tokenize, timeouts,
failing and key-protected endpoints, and the demo controller against a real engine server (the
`tiny` model on a thread of this process) standing in for vLLM.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import tornado.web

from engine.config import PRESETS, EngineConfig
from engine.llm_engine import LLMEngine
from engine.metrics import summarize
from engine.records import Outcome
from engine.server.prometheus import ServerMetrics
from engine.server.tokenizer import for_model
from lab import endpoint_client
from lab.endpoint_client import Completion, EndpointClient
from lab.endpoint_config import EndpointConfig
from lab.endpoint_demo import EndpointDemoController, banner_text, check_endpoint_run
from lab.endpoint_prompts import OPENING, WORDS, PromptMaker
from lab.endpoint_run import EndpointRun, record, shape
from lab.prometheus_text import (MetricsUnreadable, interval_mean, parse, read_sample)
from lab.runs import Limits, RunKey
from lab.state import LabState
from lab.ticker import Ticker
from tests.labkit import settle
from tests.serverkit import AppThread, ThreadServer

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-70B"} 12.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-70B"} 10.0
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-70B"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-70B"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-70B"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-70B"} 0.25
vllm:num_preemptions_total{engine="0",model_name="m"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 3.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 3.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.6
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="9000",odd="a \\"q\\" b"} 1.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} NaN
"""
SGLANG_TEXT = """\
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen"} 0.42
sglang:num_running_reqs{model_name="qwen"} 7
sglang:num_queue_reqs{model_name="qwen"} 2 1700000000000
sglang:time_to_first_token_seconds_sum{model_name="qwen"} 2.5
sglang:time_to_first_token_seconds_count{model_name="qwen"} 10
"""
TINY = dict(model="tiny", device="cpu", block_size=4, max_num_seqs=8,
            kv_budget_bytes=64 * 4 * 512, max_model_len=128)


# -- /metrics text ----------------------------------------------------------------------------
def test_vllm_text_is_read_per_engine_and_summed_across_data_parallel_ranks():
    samples = parse(VLLM_TEXT)
    assert samples[0].labels == {"engine": "0", "model_name": "meta-llama/Llama-3.1-70B"}
    assert next(s for s in samples if s.name == "vllm:cache_config_info").labels["odd"] == 'a "q" b'
    s = read_sample(VLLM_TEXT, 1.5)
    assert (s.running, s.waiting, s.kv_usage, s.preemptions) == (22.0, 3.0, 0.375, 4.0)
    assert s.ttft == (0.6, 3.0) and s.block_size == 16 and s.t_s == 1.5
    assert s.itl is None  # a NaN sum and no count: not a histogram the lab can use


def test_sglang_names_and_timestamps_are_read():
    s = read_sample(SGLANG_TEXT, 0.0)
    assert (s.kv_usage, s.running, s.waiting) == (0.42, 7.0, 2.0)
    assert s.ttft == (2.5, 10.0) and s.preemptions is None and s.block_size is None


@pytest.mark.parametrize("text", ["<html><body>Not Found</body></html>", "up 1\nfoo{a=\"b\"} x",
                                  "# only comments\nprocess_cpu_seconds_total 3.2\n"])
def test_text_without_the_lab_series_is_unreadable(text):
    with pytest.raises(MetricsUnreadable):
        read_sample(text, 0.0)


def test_the_engine_servers_own_metrics_parse_and_give_an_interval_mean():
    metrics = ServerMetrics("tiny", 4, 64)
    metrics.set_state(running=3, waiting=1, kv_usage=0.25)
    before = read_sample(metrics.render().decode(), 0.0)
    metrics.ttft.observe(0.2)
    metrics.ttft.observe(0.4)
    after = read_sample(metrics.render().decode(), 1.0)
    assert (after.running, after.waiting, after.kv_usage, after.block_size) == (3, 1, 0.25, 4)
    mean, count = interval_mean(before.ttft, after.ttft)
    assert count == 2 and mean == pytest.approx(0.3)
    assert interval_mean(after.ttft, after.ttft) is None  # nothing observed in between


# -- the workload ----------------------------------------------------------------------------
def test_arrivals_are_seeded_poisson_at_the_rate_and_all_at_once_at_rate_zero():
    key = RunKey("cpu-8m", 8, 64, 16, 8, requests=256, rate=8.0)
    arrivals = shape(key).arrivals_s
    assert arrivals == shape(key).arrivals_s and arrivals[0] == 0.0  # the same run twice
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8, rel=0.15)
    cv = (sum((g - 1 / 8) ** 2 for g in gaps) / len(gaps)) ** 0.5 * 8
    assert 0.8 < cv < 1.2  # exponential gaps: their spread equals their mean
    assert set(shape(key.replace(rate=0.0)).arrivals_s) == {0.0}


def test_a_run_whose_arrivals_outlast_the_run_limit_is_refused_before_anything_is_sent():
    key = RunKey("cpu-8m", 8, 64, 16, 8, requests=64, rate=0.5)
    assert "to arrive" in check_endpoint_run(key, Limits(max_run_s=20))
    assert check_endpoint_run(key.replace(rate=64.0), Limits(max_run_s=20)) is None
    assert "at least 1" in check_endpoint_run(key.replace(output=0), Limits())


def test_prompts_are_synthetic_words_of_the_asked_token_count():
    codec = for_model("tiny", PRESETS["tiny"])
    maker = PromptMaker(lambda text: len(codec.encode(text)))
    prompts, vocab = maker.prompts([5, 40, 40, 120], seed=0)
    assert vocab.counted and len(set(prompts)) == 4
    assert [len(codec.encode(p)) for p in prompts] == [5, 40, 40, 120]
    allowed = {OPENING, *WORDS}
    assert all(set(p.split()) <= allowed for p in prompts)  # nothing but the lab's own words
    again, _ = maker.prompts([40, 40])  # each run draws afresh: no prefix shared past one word
    assert again[0].split()[1:11] != prompts[1].split()[1:11]
    assert maker.check(prompts[1], 40) is None and maker.check(prompts[1], 41) == 40
    approx, vocab = PromptMaker(lambda text: None).prompts([10], seed=0)
    assert not vocab.counted and len(approx[0].split()) == 10


def test_a_records_token_times_follow_the_usage_count_and_an_empty_reply_is_a_miss():
    exact = record(0, 8, 3, Completion(sent_s=1.0, chunk_times_s=[1.2, 1.3, 1.4], usage_tokens=3))
    assert exact.finished and exact.token_times_s == [1.2, 1.3, 1.4] and exact.first_token_s == 1.2
    merged = record(1, 8, 4, Completion(sent_s=0.0, chunk_times_s=[0.2, 0.5], usage_tokens=4))
    assert merged.token_times_s == [0.2, 0.5, 0.5, 0.5] and len(merged.output_ids) == 4
    extra = record(2, 8, 2, Completion(sent_s=0.0, chunk_times_s=[0.2, 0.3, 0.4], usage_tokens=2))
    assert extra.token_times_s == [0.2, 0.4] and extra.finish_s == 0.4  # the last chunk ends it
    assert record(3, 8, 2, Completion(sent_s=0.0)).rejected == "the endpoint sent no tokens"
    assert not record(4, 8, 2, None).finished


def test_the_banner_says_when_prompt_lengths_are_approximated():
    from engine.records import Trace

    trace = Trace(device="the endpoint h:1", model="m", config={}, requests=[], steps=[],
                  block_size=0, num_blocks=0, block_bytes=0, kv_bytes_capacity=0)
    text = banner_text(trace, {"prompt_tokens": "approximate", "ignore_eos": False})
    assert "approximated from text" in text and "ignore_eos" in text and "h:1" in text
    assert "approximated" not in banner_text(trace, {"prompt_tokens": "counted",
                                                     "ignore_eos": True})


# -- configuration ---------------------------------------------------------------------------
def test_the_endpoint_comes_from_the_environment_only_and_its_key_is_never_shown():
    assert EndpointConfig.from_env({}) is None
    c = EndpointConfig.from_env({"LAB_ENDPOINT": "http://10.0.0.5:8000/", "LAB_ENDPOINT_API_KEY":
                                 "sk-SECRET"})
    assert c.url == "http://10.0.0.5:8000" and c.metrics_url == "http://10.0.0.5:8000/metrics"
    assert c.address == "10.0.0.5:8000" and "SECRET" not in repr(c) and "SECRET" not in str(c)
    off = EndpointConfig.from_env({"LAB_ENDPOINT": "http://h:1", "LAB_ENDPOINT_METRICS": "off"})
    assert off.metrics_url is None
    with pytest.raises(ValueError, match="LAB_ENDPOINT"):
        EndpointConfig.from_env({"LAB_ENDPOINT": "file:///etc/passwd"})


class FakeEndpoint(tornado.web.RequestHandler):
    """An endpoint that lists a model and then misbehaves as `mode` says."""

    def initialize(self, mode: str, seen: list) -> None:
        self.mode, self.seen = mode, seen

    async def get(self) -> None:
        self.seen.append({**self.request.headers, ":path": self.request.path})
        if self.request.path == "/v1/models":
            self.finish({"data": [{"id": "fake"}]})
        elif self.mode == "hang-metrics":
            await asyncio.sleep(30)
        else:
            self.set_status(404)

    async def post(self) -> None:
        self.seen.append({**self.request.headers, ":path": self.request.path})
        body = json.loads(self.request.body)
        if self.request.path == "/tokenize":
            self.set_status(404)
        elif self.mode == "401":
            self.set_status(401)
        elif not body.get("stream"):
            self.finish({"choices": [{"text": "x", "finish_reason": "length"}]})
        elif self.mode == "500":
            self.set_status(500)
            self.finish({"error": {"message": "the GPU caught fire"}})
        else:  # "hang": accept the stream, never send a token
            self.set_header("Content-Type", "text/event-stream")
            self.flush()
            await asyncio.sleep(30)


def fake(mode: str) -> tuple[AppThread, list]:
    seen: list = []
    return AppThread([(r"/.*", FakeEndpoint, {"mode": mode, "seen": seen})]), seen


def run_once(client: EndpointClient, key: RunKey, max_run_s: float = 20) -> Outcome:
    events: list = []
    run = EndpointRun(client, PromptMaker(client.tokenize), key, max_run_s, events.append).start()
    run.thread.join(60)
    assert not run.thread.is_alive()
    return Outcome.from_event(next(e for e in reversed(events)
                                   if e["event"] in ("done", "error", "cancelled")))


KEY = RunKey("cpu-8m", 2, 16, 16, 4, requests=3)


@pytest.mark.parametrize("mode, message", [
    ("500", "HTTP 500: the GPU caught fire"),
    ("401", "LAB_ENDPOINT_API_KEY"),
    ("hang", "stopped after 1 s"),
])
def test_a_failing_endpoint_fails_the_run_with_one_sentence(mode, message):
    app, seen = fake(mode)
    try:
        client = EndpointClient(EndpointConfig(url=app.url, metrics_url=app.url + "/metrics",
                                               api_key="sk-SECRET"))
        start = time.monotonic()
        outcome = run_once(client, KEY, max_run_s=0.5)
        assert message in outcome.error and "SECRET" not in outcome.error
        assert "Traceback" not in outcome.error and time.monotonic() - start < 10
        assert all(h.get("Authorization") == "Bearer sk-SECRET" for h in seen)
    finally:
        app.close()


def test_no_answer_at_all_times_out_with_a_message():
    app, _ = fake("hang-metrics")
    try:
        client = EndpointClient(EndpointConfig(url=app.url))
        start = time.monotonic()
        with pytest.raises(endpoint_client.EndpointError, match="did not answer.*timed out"):
            client.request("GET", "/slow", timeout=0.3)
        assert time.monotonic() - start < 2
    finally:
        app.close()
    refused = EndpointClient(EndpointConfig(url="http://127.0.0.1:9"))
    outcome = run_once(refused, KEY)
    assert "did not answer GET /v1/models" in outcome.error


def test_after_a_failed_run_the_endpoint_is_looked_at_again():
    app, seen = fake("500")
    try:
        client = EndpointClient(EndpointConfig(url=app.url))
        for _ in range(2):
            assert "HTTP 500" in run_once(client, KEY).error
        assert [h[":path"] for h in seen].count("/v1/models") == 2  # asked before each run
    finally:
        app.close()


# -- against a real engine server ----------------------------------------------------------
@pytest.fixture(scope="module")
def engine_endpoint():
    engine = LLMEngine(EngineConfig(**TINY))
    srv = ThreadServer(engine, for_model("tiny", engine.model_config))
    url = f"http://127.0.0.1:{srv.port}"
    yield EndpointClient(EndpointConfig(url=url, metrics_url=url + "/metrics"))
    srv.close()


def test_a_run_is_timed_per_request_and_its_prompts_have_exactly_the_asked_tokens(engine_endpoint):
    key = RunKey("cpu-8m", 3, 24, 16, 6, requests=6, rate=40.0, mix="mixed")
    engine_endpoint.info()  # its one-token probe comes before the run (and its first scrape)
    before = read_sample(engine_endpoint.metrics_text(), 0.0)
    outcome = run_once(engine_endpoint, key)
    trace, plan = outcome.trace, shape(key)
    assert outcome.error is None and trace.model == "tiny" and trace.steps == []
    facts = trace.config["endpoint"]
    assert facts["prompt_tokens"] == "counted" and facts["ignore_eos"] and not facts["metrics_error"]
    after = read_sample(engine_endpoint.metrics_text(), 0.0)
    assert interval_mean(before.ttft, after.ttft)[1] == 6  # the server saw these six requests
    for r, at, out in zip(trace.requests, plan.arrivals_s, plan.output_lens):
        assert r.finished and len(r.output_ids) == out  # ignore_eos: every reply at full length
        assert r.arrival_s >= at - 1e-3  # sent no earlier than its Poisson arrival
        assert r.arrival_s <= r.first_token_s <= r.finish_s
    summary = summarize(trace)
    assert summary.completed == 6 and summary.ttft_ms.mean > 0 and summary.tpot_ms.mean > 0
    assert len(facts["samples"]) >= 2 and facts["samples"][0]["block_size"] == 4


def test_the_prompt_tokens_the_server_counts_are_the_workloads(engine_endpoint):
    status, body = engine_endpoint.request("POST", "/tokenize", {"prompt": "The cat"})
    answer = json.loads(body)
    assert status == 200 and answer["count"] == len(answer["tokens"]) >= 2
    assert answer["max_model_len"] == 128
    def total() -> float:
        return next(s.value for s in parse(engine_endpoint.metrics_text())
                    if s.name == "vllm:prompt_tokens_total")
    key = RunKey("cpu-8m", 4, 32, 16, 2, requests=4, mix="mixed")
    first = total()
    assert run_once(engine_endpoint, key).error is None
    assert total() - first == sum(shape(key).prompt_lens)


def test_runs_of_one_page_process_take_turns_and_a_waiting_run_can_be_withdrawn(engine_endpoint):
    key = RunKey("cpu-8m", 2, 16, 16, 8, requests=4)
    events: dict[str, list] = {"a": [], "b": [], "c": []}
    runs = {name: EndpointRun(engine_endpoint, PromptMaker(engine_endpoint.tokenize),
                              key.replace(repeat=i), 20, events[name].append).start()
            for i, name in enumerate("abc")}
    # Withdrawn while it waits its turn: as soon as it says it is queued (behind a and b). A fixed
    # sleep here failed once a and b came to finish inside it.
    deadline = time.monotonic() + 30
    while not any(e["event"] == "queued" for e in list(events["c"])):
        assert time.monotonic() < deadline, events
        time.sleep(0.001)
    runs["c"].close()
    for run in runs.values():
        run.thread.join(60)
    kinds = {name: [e["event"] for e in evs] for name, evs in events.items()}
    assert kinds["a"][-1] == kinds["b"][-1] == "done" and kinds["c"][-1] == "cancelled"
    assert "queued" not in kinds["a"] and {"event": "queued", "run": 0, "position": 1} in events["b"]
    assert "progress" not in kinds["c"]  # it never sent a request
    assert engine_endpoint.turns._queue == []


def test_the_demo_measures_the_endpoint_and_says_what_it_cannot_show(engine_endpoint):
    state = LabState(batch=2, context=16, output=4, requests=4)
    demo = EndpointDemoController(state, engine_endpoint, Limits(), ticker=Ticker(250))
    demo.start()
    assert settle(demo, timeout=60) and demo.run.status == "done", demo.notice.message
    rows = demo.summary.values
    assert rows["KV GB (measured)"] == rows["Waste tokens (measured)"] == "not exposed"
    assert float(rows["TTFT mean, client (ms)"]) > 0 and "(sampled)" in rows["Peak running"]
    assert float(rows["ITL mean, endpoint's /metrics (ms)"]) > 0
    assert "127.0.0.1" in demo.banner.text and "tiny" in demo.banner.text
    assert "/tokenize" in demo.banner.text and "approximated" not in demo.banner.text
    assert "does not expose" in demo.page_map.text and "does not expose" in demo.timeline.text
    assert "Peak KV cache use" in demo.kv_memory.text and "peak running" in demo.queue.text
    assert "blocks of 4 tokens" in demo.kv_memory.text
    shown = demo.trace
    state.page = 64  # the deployment's setting: the same run, drawn from the cache
    assert demo.trace is shown and demo.run.status == "done"
    demo.close()


def test_an_endpoint_without_metrics_still_measures_and_says_the_kv_panel_is_empty(
        engine_endpoint):
    config = EndpointConfig(url=engine_endpoint.config.url,
                            metrics_url=engine_endpoint.config.url + "/no-such-metrics")
    demo = EndpointDemoController(LabState(batch=2, context=16, output=4, requests=2),
                                  EndpointClient(config), Limits(), ticker=Ticker(250))
    demo.start()
    assert settle(demo, timeout=60) and demo.run.status == "done", demo.notice.message
    assert "missing or unreadable" in demo.kv_memory.text
    assert "missing or unreadable" in demo.queue.text
    assert demo.summary.values["Peak running"] == "not exposed"
    assert float(demo.summary.values["TPOT mean, client (ms)"]) > 0
    demo.close()


def test_no_query_key_reaches_the_endpoint_and_the_deployments_controls_are_fixed():
    import panel as pn

    from lab.page import build_page

    client = EndpointClient(EndpointConfig(url="http://127.0.0.1:9"))
    query = {"embed": "demo", "endpoint": "http://evil.example:80", "LAB_ENDPOINT": "http://x:1",
             "page": "64", "batch": "4"}
    page = build_page(None, Limits(), query=query, endpoint=client, classroom=False)
    demo = page.demo
    assert demo.endpoint is client and client.config.url == "http://127.0.0.1:9"
    assert demo.state.batch == 4 and demo.run_key().page == LabState.param["page"].default
    sliders = {w.name: w.disabled for root in page.main for w in root.select(pn.widgets.Widget)
               if w.name}
    assert sliders["Page size (tokens per block)"] and sliders["KV memory (MB)"]
    assert not sliders["Batch size (most running at once)"]


def test_the_whole_page_builds_against_an_endpoint_and_the_storyboard_says_why_it_is_empty():
    import panel as pn

    from lab.page import build_page

    client = EndpointClient(EndpointConfig(url="http://127.0.0.1:9"))
    page = build_page(None, Limits(), query={}, endpoint=client, classroom=False)
    after = next(obj for root in page.main for obj in root.select(pn.Column)
                 if hasattr(obj, "panels"))  # the "After the first pass" section
    views = after.panels["storyboard"].open()
    assert "does not expose its steps" in views[0].object


def test_the_whole_page_still_builds_against_the_labs_own_engine():
    from lab.page import build_page
    from tests.labkit import lab_engine

    with lab_engine() as (client, _lab):
        page = build_page(client, Limits(), query={"batch": "4"}, classroom=False)
        assert type(page.demo).__name__ == "DemoController" and page.demo.storyboard_note is None


def test_the_endpoint_mode_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, lab.page, lab.shared, lab.endpoint_demo, lab.endpoint_run; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
