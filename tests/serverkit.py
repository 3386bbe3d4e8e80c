"""Helpers for the server tests: start `engine serve` (as a child process or on a thread of this
one), and a small stdlib HTTP client that reads server-sent events and can hang up mid-stream.

Loopback only; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import tornado.netutil

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post(port: int, path: str, body: bytes | dict, timeout: float = 30) -> tuple[int, dict]:
    """POST a body (a dict is sent as JSON); returns the status and the parsed JSON answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def stream(port: int, path: str, body: dict, hang_up_after: int | None = None,
           timeout: float = 30, hang_up: threading.Event | None = None
           ) -> tuple[list[dict], bool]:
    """POST a streaming request; returns its events and whether `data: [DONE]` came.

    The client closes the connection mid-stream after `hang_up_after` events, or at the first
    event after `hang_up` is set.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    events: list[dict] = []
    try:
        conn.request("POST", path, json.dumps(body | {"stream": True}).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        while True:
            line = resp.fp.readline()
            if not line:
                return events, False
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                return events, True
            events.append(json.loads(line[6:]))
            if hang_up_after is not None and len(events) >= hang_up_after:
                return events, False
            if hang_up is not None and hang_up.is_set():
                return events, False
    finally:
        if conn.sock is not None:  # a hard close, as a client that crashed or gave up
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.close()


def metric(port: int, name: str) -> float:
    """One unlabelled-or-single-series value from /metrics."""
    _, text = get(port, "/metrics")
    for line in text.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_until(predicate, timeout: float = 20, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


class ChildServer:
    """`python -m engine serve` in a child process on a free loopback port."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--host", HOST, "--port", str(self.port),
             "--cpu-threads", "1", *flags],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ok = wait_until(self._healthy, timeout=60, every=0.2)
        if not ok:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {self.proc.communicate()[0]}")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited: {self.proc.communicate()[0]}")
        try:
            return get(self.port, "/health", timeout=1)[0] == 200
        except OSError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class ThreadServer:
    """The same app on a thread of this process, so a test can look inside the engine."""

    def __init__(self, engine, codec, model: str = "tiny", max_waiting: int = 256) -> None:
        from engine.server.app import start

        sockets = tornado.netutil.bind_sockets(0, HOST)
        self.port = sockets[0].getsockname()[1]
        self.engine = engine
        self.aio = asyncio.new_event_loop()
        ready = threading.Event()

        async def boot() -> None:
            self.state, self.http = start(engine, codec, model, sockets, max_waiting)
            ready.set()

        self.thread = threading.Thread(target=self.aio.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(boot(), self.aio).result(30)
        ready.wait(30)

    def close(self) -> None:
        self.aio.call_soon_threadsafe(self.http.stop)
        self.state.loop.stop()
        self.aio.call_soon_threadsafe(self.aio.stop)
        self.thread.join(10)


class AppThread:
    """A Tornado application of the given routes on a loopback port, served from a thread of this
    process; `close()` also closes open streams, as a server going away would."""

    def __init__(self, routes: list, port: int = 0) -> None:
        import tornado.httpserver
        import tornado.web

        sockets = tornado.netutil.bind_sockets(port, HOST)
        self.port = sockets[0].getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self.aio = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.aio.run_forever, daemon=True)
        self.thread.start()

        async def boot() -> tornado.httpserver.HTTPServer:
            server = tornado.httpserver.HTTPServer(tornado.web.Application(routes))
            server.add_sockets(sockets)
            return server

        self.http = asyncio.run_coroutine_threadsafe(boot(), self.aio).result(30)

    def call(self, fn, *args):
        """fn(*args) on the server's loop, as its handlers run; returns its result."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.aio).result(10)

    def close(self) -> None:
        """Stop serving and close every connection; a second call does nothing."""
        if not self.thread.is_alive():
            return

        async def stop() -> None:
            self.http.stop()
            await self.http.close_all_connections()

        asyncio.run_coroutine_threadsafe(stop(), self.aio).result(10)
        self.aio.call_soon_threadsafe(self.aio.stop)
        self.thread.join(10)
