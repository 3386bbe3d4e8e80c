"""The server under many clients and under garbage, run on a thread of this process so that the
test can read the engine's block manager afterwards.

- 200 streaming requests from 32 concurrent clients, a quarter of them hanging up mid-stream, with
  a KV cache small enough that requests are preempted: afterwards nothing runs, the cache is
  empty, every block is back on the free list, and every client that stayed got all its tokens.
- Arbitrary JSON bodies (hypothesis) never get a 5xx.
Loopback only; bounded counts and waits.
"""
from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.server.tokenizer import for_model
from serverkit import HOST, ThreadServer, metric, stream, wait_until

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server():
    # 24 blocks of 4 tokens for up to 8 sequences of ~14 tokens (4 blocks each): preemptions.
    config = EngineConfig(model="tiny", device="cpu", block_size=4, max_num_seqs=8,
                          kv_budget_bytes=24 * 4 * 512, max_model_len=64)
    engine = LLMEngine(config)
    srv = ThreadServer(engine, for_model("tiny", engine.model_config), max_waiting=1000)
    yield srv
    srv.close()


def test_200_streams_32_clients_a_quarter_hanging_up(server):
    def client(i: int) -> tuple[int, list[dict], bool]:
        leave = i % 4 == 0
        body = {"prompt": [1 + i % 50, 2, 3, 4, 5, 6], "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "temperature": 0,
                "stream_options": {"include_usage": True}}
        events, done = stream(server.port, "/v1/completions", body,
                              hang_up_after=2 if leave else None, timeout=60)
        return i, events, done

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(client, range(200)))

    assert wait_until(lambda: metric(server.port, "vllm:num_requests_running") == 0
                      and metric(server.port, "vllm:num_requests_waiting") == 0
                      and metric(server.port, "vllm:kv_cache_usage_perc") == 0, timeout=30)
    blocks = server.engine.blocks
    assert blocks.num_free == blocks.num_blocks and not blocks.block_tables
    stayed = [(events, done) for i, events, done in results if i % 4]
    assert len(stayed) == 150
    for events, done in stayed:
        tokens = [e for e in events if e["choices"]]
        assert done and len(tokens) == MAX_TOKENS
        assert tokens[-1]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert metric(server.port, "vllm:num_preemptions_total") > 0  # the cache did bind


def test_a_client_that_hangs_up_frees_its_blocks_at_once(server):
    before = metric(server.port, "vllm:generation_tokens_total")
    stream(server.port, "/v1/completions",
           {"prompt": [1, 2, 3], "max_tokens": 60, "ignore_eos": True}, hang_up_after=1)
    blocks = server.engine.blocks
    assert wait_until(lambda: blocks.num_free == blocks.num_blocks
                      and metric(server.port, "vllm:num_requests_running") == 0)
    # Aborted, not run to the end: far fewer than 60 tokens were made.
    assert metric(server.port, "vllm:generation_tokens_total") - before < 40


def post_status(port: int, path: str, data: bytes) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
          "seed", "n", "stream", "stream_options", "ignore_eos", "return_token_ids", "top_p"]
scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats()
           | st.text(max_size=30) | st.sampled_from(["tiny", "user", "\ud800", "<|user|>"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(["role", "content", "include_usage",
                                                         "type", "text", "x"]), inner,
                                        max_size=3), max_leaves=8)
small_ids = st.lists(st.integers(0, 600), min_size=0, max_size=6)
bodies = (st.dictionaries(st.sampled_from(FIELDS), values | small_ids, max_size=6)
          | st.fixed_dictionaries({"prompt": st.text(max_size=20) | small_ids},
                                  optional={"max_tokens": st.integers(-2, 70),
                                            "temperature": st.floats(-1, 3),
                                            "stream": st.booleans()})
          | values)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, chat=st.booleans(), raw=st.booleans())
def test_arbitrary_json_bodies_never_get_a_5xx(server, body, chat, raw):
    data = json.dumps(body).encode()
    if raw:  # cut the body short: no longer valid JSON
        data = data[: len(data) // 2]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    assert post_status(server.port, path, data) < 500
