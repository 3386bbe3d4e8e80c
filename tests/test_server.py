"""`python -m engine serve` through real clients: the openai library, `engine run`'s own tokens,
bad input, the waiting bound, SIGTERM, /metrics and the tokenizer files.

One child server (the `tiny` model) serves most tests; the tests that need other flags start
their own. Loopback only.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import pytest

from serverkit import ROOT, ChildServer, get, metric, post, stream, wait_until

openai = pytest.importorskip("openai")

FLAGS = ("--model", "tiny", "--max-model-len", "256", "--kv-budget-mb", "1",
         "--page-size", "4", "--max-num-seqs", "4")


@pytest.fixture(scope="module")
def server():
    srv = ChildServer(*FLAGS)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                         max_retries=0, timeout=30)


def test_openai_client_streams_a_chat_completion(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is a KV cache?"}],
        max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    content = [c for c in chunks if c.choices]
    assert content[0].object == "chat.completion.chunk"
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 6


def test_openai_client_streams_a_completion(client):
    chunks = list(client.completions.create(
        model="tiny", prompt="Paged attention", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True}))
    texts = [c for c in chunks if c.choices]
    assert len(texts) == 5 and texts[0].object == "text_completion"
    assert texts[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5
    whole = client.completions.create(model="tiny", prompt="Paged attention", max_tokens=5,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].text == "".join(c.choices[0].text for c in texts)


def test_max_completion_tokens_and_usage_without_streaming(client):
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3,
        temperature=0, extra_body={"ignore_eos": True})
    assert answer.object == "chat.completion" and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3 and answer.choices[0].message.role == "assistant"


def test_models_and_health(server):
    status, body = get(server.port, "/v1/models")
    data = json.loads(body)["data"]
    assert status == 200 and data[0]["id"] == "tiny" and data[0]["root"] == "tiny"
    assert get(server.port, "/health")[0] == 200
    status, body = get(server.port, "/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["type"] == "NotFoundError"


def test_greedy_tokens_through_http_equal_engine_run(server):
    done = subprocess.run(
        [sys.executable, "-m", "engine", "run", "--model", "tiny", "--batch", "2",
         "--context", "12", "--output", "10", "--json", "--cpu-threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    for request in json.loads(done.stdout)["requests"]:
        status, answer = post(server.port, "/v1/completions", {
            "prompt": request["prompt_ids"], "max_tokens": 10, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
        assert status == 200, answer
        assert answer["choices"][0]["token_ids"] == request["output_ids"]


def test_sampling_is_reproducible_with_a_seed(server):
    def tokens(seed: int) -> list[int]:
        body = {"prompt": [5, 6, 7], "max_tokens": 12, "temperature": 1.5, "seed": seed,
                "ignore_eos": True, "return_token_ids": True}
        status, answer = post(server.port, "/v1/completions", body)
        assert status == 200, answer
        return answer["choices"][0]["token_ids"]

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)  # 12 draws over 512 ids: equal by chance only ~never


@pytest.mark.parametrize("path, body, code", [
    ("/v1/completions", b"{not json", "400"),
    ("/v1/completions", b"[1, 2]", "400"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, "model_not_found"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 300}, "400"),  # past --max-model-len
    ("/v1/completions", {"prompt": list(range(254)), "max_tokens": 5}, "400"),
    ("/v1/completions", {"prompt": [1, 99999]}, "400"),  # ids outside the vocabulary
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, "400"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "400"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, "400"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "400"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "400"),
    ("/v1/chat/completions", {"messages": []}, "400"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "400"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, path, body, code):
    status, answer = post(server.port, path, body)
    assert status == 400
    assert set(answer["error"]) >= {"message", "type", "code"} and answer["error"]["code"] == code
    assert post(server.port, "/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_a_prompt_that_can_never_fit_the_kv_cache_gets_400():
    # tiny holds 512 bytes of K and V per token (fp32): 4096 bytes are 2 blocks of 4 tokens,
    # and a 6-token prompt plus 4 outputs needs 3.
    srv = ChildServer("--model", "tiny", "--kv-budget-mb", str(4096 / 2**20), "--page-size", "4")
    try:
        status, answer = post(srv.port, "/v1/completions",
                              {"prompt": [1, 2, 3, 4, 5, 6], "max_tokens": 4})
        assert status == 400 and "KV blocks" in answer["error"]["message"]
        assert post(srv.port, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2})[0] == 200
    finally:
        srv.close()


def test_metrics_use_vllms_names(server):
    stream(server.port, "/v1/completions", {"prompt": "x", "max_tokens": 3})
    _, text = get(server.port, "/metrics")
    text = text.decode()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket"):
        assert f'{name}{{' in text, name
    assert 'block_size="4"' in text and "num_gpu_blocks=" in text
    assert metric(server.port, "vllm:generation_tokens_total") >= 3


def test_a_full_waiting_queue_answers_503():
    srv = ChildServer("--model", "tiny", "--kv-budget-mb", "1", "--max-num-seqs", "1",
                      "--max-waiting", "1")
    statuses: list[int] = []
    hang_up = threading.Event()
    try:
        long = {"prompt": [1, 2, 3], "max_tokens": 2000, "ignore_eos": True}
        first = threading.Thread(target=stream, args=(srv.port, "/v1/completions", long),
                                 kwargs={"hang_up": hang_up})
        first.start()
        assert wait_until(lambda: metric(srv.port, "vllm:num_requests_running") == 1)
        waiter = threading.Thread(target=lambda: statuses.append(
            post(srv.port, "/v1/completions", long | {"max_tokens": 50})[0]))
        waiter.start()
        assert wait_until(lambda: metric(srv.port, "vllm:num_requests_waiting") == 1)
        status, answer = post(srv.port, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert status == 503 and answer["error"]["type"] == "ServiceUnavailableError"
        hang_up.set()  # the waiter runs once the first client has gone
        first.join(30)
        waiter.join(60)
        assert statuses == [200]
    finally:
        hang_up.set()
        srv.close()


def test_sigterm_ends_open_streams_cleanly():
    srv = ChildServer("--model", "tiny", "--kv-budget-mb", "1", "--shutdown-grace-s", "0.2")
    got: dict = {}

    def client() -> None:
        got["events"], got["done"] = stream(srv.port, "/v1/completions",
                                            {"prompt": "x", "max_tokens": 2000,
                                             "ignore_eos": True})

    reader = threading.Thread(target=client)
    try:
        reader.start()
        assert wait_until(lambda: metric(srv.port, "vllm:generation_tokens_total") > 0)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        reader.join(10)
        assert got["done"] and got["events"][-1]["choices"][0]["finish_reason"] == "abort"
        assert len(got["events"]) < 2000
    finally:
        srv.close()


def test_tokenizer_files_load_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    subprocess.run([sys.executable, "-m", "engine", "tokenizer", "--model", "tiny", "--out",
                    str(tmp_path)], cwd=ROOT, check=True, timeout=60,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 512 and tok.eos_token == "<|endoftext|>"
    from engine.server.tokenizer import built
    codec = built(512, 8192)
    text = "Prefill reads the prompt; decode writes one token per step. ünïcode ✓"
    assert tok.encode(text, add_special_tokens=False) == codec.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        codec.render_chat(messages)
    assert all(codec.decode([i]) for i in range(4, 512))  # every non-special id has text


def test_a_checkpoint_directorys_own_tokenizer_is_used(tmp_path):
    from engine.config import preset
    from engine.server.tokenizer import built, for_model
    files = dict(built(512, 8192).files)
    config = json.loads(files["tokenizer_config.json"])
    config |= {"eos_token": {"content": "<|user|>"},
               "chat_template": "Q: {{ messages[0]['content'] }}"}
    files["tokenizer_config.json"] = json.dumps(config)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    codec = for_model(str(tmp_path), preset("tiny"))
    assert codec.eos_token_id == 2
    assert codec.render_chat([{"role": "user", "content": "hi"}]) == "Q: hi"


def test_streamed_text_adds_up_to_the_whole_text():
    import random
    from engine.server.handlers import Detokenizer
    from engine.server.tokenizer import built
    codec = built(512, 8192)
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(4, 512) for _ in range(rng.randrange(1, 40))]
        detok = Detokenizer(codec)
        deltas = [detok.add([t], i == len(ids) - 1) for i, t in enumerate(ids)]
        assert "".join(deltas) == codec.decode(ids)


def test_the_lab_routes_probe_the_cpu_on_the_threads_runs_get():
    """The floors the page draws come from this probe: a server started with --cpu-threads 1
    must measure one core's reads and arithmetic, not every core's."""
    from engine.cpu_threads import blas_threads, set_blas_threads
    from engine.server.lab_routes import LabRuns

    before = blas_threads()
    set_blas_threads(1)
    try:
        lab = LabRuns(device="cpu", kv_cap_bytes=64 * 2**20, max_run_s=5.0)
        try:
            assert lab.info()["probe"]["device"] == "CPU: 1 thread"
        finally:
            lab.stop()
    finally:
        set_blas_threads(before)
