"""The lab's client of an external OpenAI-compatible deployment (vLLM, SGLang, TGI, llama.cpp's
server, or `python -m engine serve`), as `EndpointConfig` (lab/endpoint_config.py) names it.

The API key goes only into an Authorization header, never into a message. `EndpointClient` does
the HTTP: what the endpoint offers (`probe`), token counts
(`tokenize`), a scrape of /metrics, and one streamed completion timed chunk by chunk
(`stream_completion`); `Turns` lets its runs go one at a time. Every request has a timeout; every failure is an `EndpointError` with one
sentence for the learner. Only the standard library, on the caller's thread.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lab.endpoint_config import EndpointConfig, split_url
CONNECT_TIMEOUT_S = 10.0  # an answer to a short request (models, tokenize, metrics, the probe)
READ_TIMEOUT_S = 60.0  # the longest silence inside one streamed completion
PROBE_PROMPT = "Hello"


class EndpointError(RuntimeError):
    """The endpoint failed or refused; the message is one sentence a learner can read."""


@dataclass(frozen=True)
class EndpointInfo:
    """What one look at the endpoint found, before any run."""

    model: str
    model_from: str  # where its name came from: "its /v1/models" or "LAB_ENDPOINT_MODEL"
    max_model_len: int | None  # from /v1/models or /tokenize, when the endpoint says
    tokenize: bool  # POST /tokenize counts tokens (vLLM, engine serve)
    ignore_eos: bool  # completions accept ignore_eos: every reply has its full length


@dataclass
class Completion:
    """One streamed completion as the client saw it: when each chunk arrived, since `t0`."""

    sent_s: float
    chunk_times_s: list[float] = field(default_factory=list)
    usage_tokens: int | None = None  # completion_tokens of the usage event, when sent
    finish_reason: str | None = None


class Turns:
    """Runs take turns, first come first served: one at a time per page process, so two
    learners' workloads do not overlap on the endpoint and blur each other's numbers (a learner
    has at most one run waiting: a newer one withdraws the older)."""

    def __init__(self) -> None:
        self._queue: list[object] = []
        self._changed = threading.Condition()

    def wait(self, ticket: object, cancel: threading.Event,
             on_position: Callable[[int], None]) -> bool:
        """Block until `ticket` is first; False when `cancel` came first. `on_position(n)` hears
        how many runs are ahead each time that changes."""
        with self._changed:
            self._queue.append(ticket)
            told = None
            while not cancel.is_set():
                ahead = self._queue.index(ticket)
                if ahead == 0:
                    return True
                if ahead != told:
                    on_position(told := ahead)
                self._changed.wait(0.1)
            self._queue.remove(ticket)
            self._changed.notify_all()
            return False

    def done(self, ticket: object) -> None:
        with self._changed:
            if ticket in self._queue:
                self._queue.remove(ticket)
            self._changed.notify_all()


class EndpointClient:
    """Talks to one external endpoint; shared by every session of a page process."""

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self.scheme, self.host, self.port, self.prefix = split_url(config.url, "LAB_ENDPOINT")
        self._info: EndpointInfo | None = None
        self._lock = threading.Lock()
        self.turns = Turns()

    # -- plumbing ------------------------------------------------------------------------------
    def _connect(self, url_parts: tuple[str, str, int], timeout: float):
        scheme, host, port = url_parts
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        return kind(host, port, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return headers

    def _fail(self, what: str, err: object) -> EndpointError:
        return EndpointError(f"The endpoint {self.config.address} did not answer {what} "
                             f"({type(err).__name__}: {str(err)[:120]}).")

    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float = CONNECT_TIMEOUT_S) -> tuple[int, bytes]:
        """One short request to the endpoint; (status, body). EndpointError on no answer."""
        conn = self._connect((self.scheme, self.host, self.port), timeout)
        try:
            conn.request(method, self.prefix + path,
                         json.dumps(body).encode() if body is not None else None, self._headers())
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as err:
            raise self._fail(f"{method} {path}", err) from None
        finally:
            conn.close()

    # -- what it offers ------------------------------------------------------------------------
    def info(self) -> EndpointInfo:
        """The model, its length limit and what the endpoint accepts (looked up once)."""
        with self._lock:
            if self._info is None:
                self._info = self._probe()
            return self._info

    def forget(self) -> None:
        """Look again before the next run (a failed run may mean the deployment changed)."""
        with self._lock:
            self._info = None

    def _probe(self) -> EndpointInfo:
        status, body = self.request("GET", "/v1/models")
        listed, max_len = None, None
        if status == 200:
            try:
                first = json.loads(body)["data"][0]
                listed, max_len = str(first["id"]), first.get("max_model_len")
            except (ValueError, KeyError, IndexError, TypeError):
                pass
        model = self.config.model or listed
        if model is None:
            raise EndpointError(f"The endpoint {self.config.address} lists no model at /v1/models "
                                f"(HTTP {status}); set LAB_ENDPOINT_MODEL.")
        counted = self._count(model, PROBE_PROMPT)
        if counted is not None and counted[1] is not None:
            max_len = counted[1]
        ignore_eos = self._accepts({"ignore_eos": True}, model)
        if not ignore_eos and not self._accepts({}, model):
            raise EndpointError(f"The endpoint {self.config.address} refused a one-token "
                                f"completion for model {model!r}.")
        named_by = "LAB_ENDPOINT_MODEL" if self.config.model else "its /v1/models"
        return EndpointInfo(model=model, model_from=named_by,
                            max_model_len=int(max_len) if max_len else None,
                            tokenize=counted is not None, ignore_eos=ignore_eos)

    def _accepts(self, extra: dict, model: str) -> bool:
        status, _ = self.request("POST", "/v1/completions", {
            "model": model, "prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0, **extra})
        if status in (401, 403):
            raise EndpointError(f"The endpoint {self.config.address} refused the lab's requests "
                                f"(HTTP {status}): check LAB_ENDPOINT_API_KEY.")
        return status == 200

    def _count(self, model: str, text: str) -> tuple[int, int | None] | None:
        """(tokens, max_model_len) from vLLM's POST /tokenize, or None where it is not offered."""
        status, body = self.request("POST", "/tokenize", {"model": model, "prompt": text})
        if status != 200:
            return None
        try:
            d = json.loads(body)
            return int(d["count"]), d.get("max_model_len")
        except (ValueError, KeyError, TypeError):
            return None

    def tokenize(self, text: str) -> int | None:
        """Tokens the endpoint's model reads in `text` (None: /tokenize is not offered)."""
        counted = self._count(self.info().model, text)
        return counted[0] if counted is not None else None

    def metrics_text(self) -> str:
        """One scrape of the metrics URL; EndpointError when there is none or it fails."""
        url = self.config.metrics_url
        if url is None:
            raise EndpointError("LAB_ENDPOINT_METRICS is off")
        scheme, host, port, path = split_url(url, "LAB_ENDPOINT_METRICS")
        conn = self._connect((scheme, host, port), CONNECT_TIMEOUT_S)
        try:
            conn.request("GET", path or "/", headers=self._headers())
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as err:
            raise self._fail("its metrics URL", err) from None
        finally:
            conn.close()
        if resp.status != 200:
            raise EndpointError(f"{path or '/'} answered HTTP {resp.status}")
        return body.decode("utf-8", "replace")

    # -- one measured request ------------------------------------------------------------------
    def stream_completion(self, prompt: str, max_tokens: int, t0: float,
                          cancel: threading.Event, conn_box: list) -> Completion:
        """Stream one completion and time each chunk (perf_counter - t0). `conn_box` receives the
        connection so another thread can hang up; `cancel` set means the run was stopped."""
        info = self.info()
        body = {"model": info.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        if info.ignore_eos:
            body["ignore_eos"] = True
        conn = self._connect((self.scheme, self.host, self.port), READ_TIMEOUT_S)
        conn_box.append(conn)
        done = Completion(sent_s=time.perf_counter() - t0)
        try:
            conn.request("POST", self.prefix + "/v1/completions", json.dumps(body).encode(),
                         self._headers())
            resp = conn.getresponse()
            if resp.status != 200:
                raise EndpointError(f"The endpoint {self.config.address} answered a completion "
                                    f"with HTTP {resp.status}: {_error_text(resp.read())}")
            while True:
                line = resp.readline()
                now = time.perf_counter() - t0
                if not line:
                    break
                if _read_event(line, now, done):
                    break
        except (OSError, http.client.HTTPException) as err:
            if cancel.is_set():
                return done
            raise self._fail("a streamed completion", err) from None
        finally:
            conn.close()
        return done


def hang_up(conn: http.client.HTTPConnection) -> None:
    """Close a connection from another thread (its reader then returns at once)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_event(line: bytes, now: float, done: Completion) -> bool:
    """Record one server-sent event line; True at `data: [DONE]`."""
    text = line.decode("utf-8", "replace").strip()
    if not text.startswith("data:"):
        return False
    data = text[5:].strip()
    if data == "[DONE]":
        return True
    try:
        event = json.loads(data)
    except ValueError:
        return False
    if not isinstance(event, dict):
        return False
    usage = event.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        done.usage_tokens = usage["completion_tokens"]
    choices = event.get("choices")
    if choices and isinstance(choices[0], dict):
        # Each chunk is one token, as bench serve counts them; the usage event corrects the count.
        done.chunk_times_s.append(now)
        done.finish_reason = choices[0].get("finish_reason") or done.finish_reason
    return False


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:160]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:160]
