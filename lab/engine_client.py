"""The page process's client of the engine server (`python -m engine serve`): the lab measures
nothing itself.

`EngineClient.info()` fetches the device and its probed limits once (GET /lab/info). `stream()`
posts runs to POST /lab/runs and reads the newline-delimited events on a daemon thread, handing each
to a callback as a plain dict; `RunStream.close()` hangs up, which withdraws the runs from the
server's queue. Only the standard library: the page process never imports torch.

Traces arrive as JSON and are kept, per page process, in a `TraceCache`, so a setting this process
has seen (a repeat, a sweep point, the other policy) is drawn without asking again.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from engine.analytic import DeviceProbe
from engine.config import element_bytes
from engine.records import Trace

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
INFO_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # the server writes a keep-alive line every 15 s while a run waits


class EngineUnavailable(RuntimeError):
    """No engine server answers at the configured address (a message a learner can act on)."""


@dataclass(frozen=True)
class EngineInfo:
    """What the engine server measures on: its device and that device's probed limits."""

    device_type: str  # "cpu" or "cuda"
    device: str  # "CPU: 1 thread", a GPU's name
    probe: DeviceProbe
    kv_cap_bytes: int
    max_run_s: float

    @classmethod
    def from_json(cls, d: dict) -> "EngineInfo":
        p = d["probe"]
        return cls(device_type=d["device_type"], device=d["device"],
                   probe=DeviceProbe(device=p["device"], bandwidth_gbs=p["bandwidth_gbs"],
                                     matmul_tflops=p["matmul_tflops"],
                                     read_samples_gbs=tuple(p["read_samples_gbs"])),
                   kv_cap_bytes=int(d["kv_cap_bytes"]), max_run_s=float(d["max_run_s"]))

    @property
    def bytes_per_elem(self) -> int:
        """KV and weight element size, as the engine loads them on this device."""
        return element_bytes(self.device_type)


class RunStream:
    """One POST /lab/runs in flight, read on its own daemon thread."""

    def __init__(self, conn: http.client.HTTPConnection, on_event: Callable[[dict], None]) -> None:
        self._conn = conn
        self._on_event = on_event
        self._closed = threading.Event()
        self.thread = threading.Thread(target=self._read, name="lab-run-stream", daemon=True)

    def _read(self) -> None:
        try:
            resp = self._conn.getresponse()
            if resp.status != 200:
                body = resp.read()
                try:
                    message = json.loads(body)["error"]
                except (ValueError, KeyError, TypeError):
                    message = body.decode("utf-8", "replace")[:200]
                self._on_event({"event": "error", "run": None,
                                "message": f"The engine server refused the run: {message}"})
                return
            while not self._closed.is_set():
                line = resp.readline()
                if not line:
                    break
                if line.strip():
                    self._on_event(json.loads(line))
        except (OSError, http.client.HTTPException, ValueError) as err:
            if not self._closed.is_set():
                self._on_event({"event": "error", "run": None,
                                "message": f"The connection to the engine server broke ({err})."})
        finally:
            self._conn.close()

    def close(self) -> None:
        """Hang up: the server withdraws whatever this stream still waited for."""
        self._closed.set()
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class EngineClient:
    """Talks to one engine server; shared by every session of a page process."""

    def __init__(self, url: str | None = None) -> None:
        self.url = (url or os.environ.get("LAB_ENGINE_URL") or DEFAULT_URL).rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"LAB_ENGINE_URL must look like http://host:port, not {self.url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self._info: EngineInfo | None = None
        self._lock = threading.Lock()

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def info(self) -> EngineInfo:
        """The server's device and limits (fetched once; EngineUnavailable when none answers)."""
        with self._lock:
            if self._info is None:
                self._info = EngineInfo.from_json(self.get_json("/lab/info"))
            return self._info

    def get_json(self, path: str) -> dict:
        conn = self._connect(INFO_TIMEOUT_S)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise EngineUnavailable(f"The engine server at {self.url} answered {path} with "
                                        f"HTTP {resp.status}.")
            return json.loads(body)
        except (OSError, http.client.HTTPException) as err:
            raise EngineUnavailable(
                f"No engine server answers at {self.url} ({err}). Start one with "
                "`python -m engine serve`, or set LAB_ENGINE_URL.") from None
        finally:
            conn.close()

    def wait_ready(self, timeout_s: float) -> EngineInfo:
        """info(), retried until the server answers or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.info()
            except EngineUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stream(self, session: str, runs: list[dict], on_event: Callable[[dict], None],
               background: bool = False, max_run_s: float | None = None) -> RunStream:
        """Post `runs` and call `on_event(event)` on a reader thread for each event."""
        body = {"session": session, "runs": runs, "background": background}
        if max_run_s is not None:
            body["max_run_s"] = max_run_s
        conn = self._connect(READ_TIMEOUT_S)
        stream = RunStream(conn, on_event)
        try:
            conn.request("POST", "/lab/runs", json.dumps(body).encode(),
                         {"Content-Type": "application/json"})
        except OSError as err:
            conn.close()
            on_event({"event": "error", "run": None,
                      "message": f"No engine server answers at {self.url} ({err})."})
            return stream
        stream.thread.start()
        return stream


class TraceCache:
    """The traces this page process has received, by run key, least recently used first out."""

    def __init__(self, size: int = 512) -> None:
        self._traces: OrderedDict[object, Trace] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: object) -> Trace | None:
        with self._lock:
            trace = self._traces.get(key)
            if trace is not None:
                self._traces.move_to_end(key)
            return trace

    def put(self, key: object, trace: Trace) -> None:
        with self._lock:
            self._traces[key] = trace
            self._traces.move_to_end(key)
            while len(self._traces) > self._size:
                self._traces.popitem(last=False)
