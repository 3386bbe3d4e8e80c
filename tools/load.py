"""Load and churn against a running lab server, with real browser sessions.

`python -m tools.load --url http://127.0.0.1:5006/app --sessions 40 --moves 3` opens N pages (each
in its own browser context, like N students) in one headless chromium, moves the batch slider with
the keyboard, and times each move from the key press to the summary table showing the new run's
numbers (on the page's clock: a keydown listener and a MutationObserver on the table, so the
client's own polling adds nothing). A warm-up session first visits every setting the moves will
use, so the measured moves are cached settings: what a class pays when everyone moves to a setting
someone already ran.

`--protocol-sessions N` adds N sessions driven over Bokeh's websocket protocol instead of by a
browser (`tools/load_protocol.py`): real server sessions whose clients cost the machine little, so a
small machine can still play a whole class against its own server.

`--churn N` instead opens and closes N sessions in waves and reports, from the server's
/diagnostics endpoint (`--plugins tools.diagnostics`), what is left afterwards.

The client shares the machine with the server when both run on one host; the report gives the whole
machine's CPU use during the moves so a saturated client is visible, not hidden in the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from tools.load_protocol import BATCH_TITLE, DONE_PREFIX, ProtocolClass

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic", "--disable-renderer-backgrounding",
                 "--disable-background-timer-throttling"]

STATUS_GRACE_MS = 5000  # how long the status line may trail the table
PAGE_JS = Path(__file__).with_name("load_page_probe.js")  # read when a session opens


@dataclass
class Tally:
    """What all sessions observed."""

    open_s: list[float] = field(default_factory=list)  # page load to first measured run
    latency_ms: list[float] = field(default_factory=list)  # move to updated summary table
    errors: list[str] = field(default_factory=list)  # failed opens and moves, with the reason
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def error(self, session: int, what: str) -> None:
        self.errors.append(f"session {session}: {what}")


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=float)
    return {"n": len(values), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "max": float(a.max()), "mean": float(a.mean())}


def rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def cpu_ticks(pid: int | None = None) -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine, or (utime+stime, 0) of one process."""
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12]), 0
    numbers = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = numbers[3] + numbers[4]
    return sum(numbers) - idle, sum(numbers)


def machine() -> dict[str, object]:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                 "unknown")
    load1 = Path("/proc/loadavg").read_text().split()[0]  # other work on the machine shows here
    return {"nproc": os.cpu_count(), "cpu_model": model, "loadavg_1min": float(load1)}


def diagnostics(url: str, deep: bool = False) -> dict | None:
    """The server's /diagnostics snapshot, or None when the plugin is not loaded."""
    parts = urlsplit(url)
    base = parts.path.rsplit("/", 1)[0]  # the app's prefix, if any
    target = f"{parts.scheme}://{parts.netloc}{base}/diagnostics" + ("?deep=1" if deep else "")
    try:
        with urllib.request.urlopen(target, timeout=30) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def engine_idle(snapshot: dict) -> bool:
    """The engine server's run queue holds no job (None: the page process has not reached it)."""
    queue = snapshot["engine_queue"]
    return queue is None or not (queue["waiting"] or queue["background"] or queue["running"])


class Client:
    """One headless chromium and the pages it holds for the run."""

    def __init__(self, url: str, timeout_s: float, tally: Tally, light: bool = False) -> None:
        self.url, self.timeout_ms, self.tally, self.light = url, timeout_s * 1000, tally, light
        self.browser = None

    async def open(self, i: int):
        """A new session: its own context, loaded until its first run is measured."""
        context = await self.browser.new_context(viewport={"width": 1280, "height": 900})
        await context.add_init_script(path=PAGE_JS)
        page = await context.new_page()
        page.on("console", lambda m: self.tally.console_errors.append(
            f"session {i}: {m.text} ({m.location.get('url', '')[:120]})")
            if m.type == "error" else None)
        page.on("pageerror", lambda e: self.tally.page_errors.append(f"session {i}: {e}"))
        start = time.monotonic()
        try:
            await page.goto(self.url, timeout=self.timeout_ms, wait_until="domcontentloaded")
            await page.wait_for_function(f"window.__lab.status().startsWith('{DONE_PREFIX}')",
                                         polling=250, timeout=self.timeout_ms)
        except Exception as err:  # a timeout or a closed page: count it, keep the others going
            self.tally.error(i, f"open failed: {type(err).__name__}: {str(err)[:200]}")
            await context.close()
            return None
        self.tally.open_s.append(time.monotonic() - start)
        if self.light:
            await page.evaluate("window.__lab.hidePlots()")
        return page

    async def close(self, i: int, page) -> None:
        """Close a session's page and context, as a student closing the tab."""
        try:
            await asyncio.wait_for(page.context.close(), self.timeout_ms / 1000)
        except Exception as err:  # a hung close must not stall the run
            self.tally.error(i, f"close failed: {type(err).__name__}: {str(err)[:200]}")

    async def move(self, i: int, page, key: str) -> float | None:
        """Press `key` on the batch slider; milliseconds until the table shows the new run."""
        handle = page.locator(".bk-input-group").filter(has_text=BATCH_TITLE).locator(
            ".noUi-handle")
        try:
            await page.evaluate("window.__lab.arm()")
            await handle.press(key, timeout=self.timeout_ms)
            await page.wait_for_function("window.__lab.check()", polling=200,
                                         timeout=self.timeout_ms)
            ms = await page.evaluate("window.__lab.doneAt - window.__lab.actAt")
        except Exception as err:
            self.tally.error(i, f"move failed: {type(err).__name__}: {str(err)[:200]}")
            return None
        try:  # the status line is its own pane and may render a moment after the table
            await page.wait_for_function(f"window.__lab.status().startsWith('{DONE_PREFIX}')",
                                         polling=100, timeout=STATUS_GRACE_MS)
        except Exception:
            status = await page.evaluate("window.__lab.status()")
            self.tally.error(i, f"move ended with status {status!r}")
        self.tally.latency_ms.append(ms)
        return ms


async def wait_idle(url: str, warm_page, timeout_s: float) -> None:
    """Until the server's engine has nothing queued (or, without diagnostics, the sweep is done)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = diagnostics(url)
        if d is not None and engine_idle(d):
            return
        if d is None:
            text = await warm_page.locator(".tpot_batch-text").first.inner_text()
            if "still filling" not in text and "Measured TPOT" in text:
                return
        await asyncio.sleep(1.0)


async def load(url: str, sessions: int, moves: int, server_pid: int | None, stagger_s: float,
               opening: int, think_s: float, burst: bool, timeout_s: float, seed: int,
               light: bool, protocol: int = 0) -> dict:
    from playwright.async_api import async_playwright
    tally = Tally()
    client = Client(url, timeout_s, tally, light)
    keys = ["ArrowRight" if m % 2 == 0 else "ArrowLeft" for m in range(moves)]
    rng = random.Random(seed)
    async with async_playwright() as p:
        client.browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        warm = await client.open(-1)  # visits every setting first, so measured moves are cached
        if warm is None:
            raise SystemExit(f"could not open {url}: {tally.errors}")
        for key in keys[:2]:
            await client.move(-1, warm, key)
        await wait_idle(url, warm, timeout_s * 4)
        tally.open_s.clear()  # the warm-up measured uncached settings: none of it counts
        tally.latency_ms.clear()
        tally.errors.clear()
        rss_before = rss_kb(server_pid)
        diag_before = diagnostics(url)

        gate = asyncio.Semaphore(opening)  # students arrive over a minute, not in one instant

        async def open_one(i: int):
            await asyncio.sleep(i * stagger_s)
            async with gate:
                return await client.open(i)

        t0 = time.monotonic()
        server_open_before = cpu_ticks(server_pid)[0] if server_pid else 0
        # Protocol sessions (tools/load_protocol.py) play the rest of the class from one thread:
        # they open alongside the browsers and move with them; their latencies are kept apart.
        others = ProtocolClass(url, protocol, moves, think_s, timeout_s, stagger_s, seed) \
            if protocol else None
        pages = await asyncio.gather(*(open_one(i) for i in range(sessions)))
        if others is not None:
            await asyncio.to_thread(others.wait_opened)
        open_wall = time.monotonic() - t0
        open_cpu = (cpu_ticks(server_pid)[0] - server_open_before) / os.sysconf("SC_CLK_TCK") \
            if server_pid else None
        rss_open = rss_kb(server_pid)
        live = [(i, pg) for i, pg in enumerate(pages) if pg is not None]
        machine_before, server_before = cpu_ticks(), cpu_ticks(server_pid)[0] if server_pid else 0

        async def walk(i: int, page) -> None:
            for key in keys:
                await asyncio.sleep(0 if burst else rng.uniform(0.5, 1.5) * think_s)
                await client.move(i, page, key)

        t1 = time.monotonic()
        protocol_job = None
        if others is not None:
            others.start()
            protocol_job = asyncio.ensure_future(asyncio.to_thread(others.join))
        if burst:  # the whole class moves at the same moment, move after move
            for key in keys:
                await asyncio.gather(*(client.move(i, pg, key) for i, pg in live))
        else:
            await asyncio.gather(*(walk(i, pg) for i, pg in live))
        protocol_tally = await protocol_job if protocol_job is not None else None
        moves_wall = time.monotonic() - t1
        machine_after = cpu_ticks()
        server_cpu = (cpu_ticks(server_pid)[0] - server_before) / os.sysconf("SC_CLK_TCK") \
            if server_pid else None
        rss_moves = rss_kb(server_pid)
        diag_after = diagnostics(url)
        await client.browser.close()
    busy = (machine_after[0] - machine_before[0]) / max(1, machine_after[1] - machine_before[1])
    opened = len(live) + (protocol_tally.opened if protocol_tally is not None else 0)
    mb = (lambda kb: None if kb is None else round(kb / 1024, 1))
    return {
        "url": url, "sessions": sessions, "opened": len(live), "moves_per_session": moves,
        "mode": ("burst" if burst else f"spread (think {think_s} s)")
        + (", light" if light else ""),
        "open_s": stats(tally.open_s), "open_wall_s": round(open_wall, 1),
        "latency_ms": stats(tally.latency_ms), "moves_wall_s": round(moves_wall, 1),
        "errors": len(tally.errors), "error_samples": tally.errors[:10],
        "console_errors": len(tally.console_errors), "console_samples": tally.console_errors[:5],
        "page_errors": len(tally.page_errors), "page_error_samples": tally.page_errors[:5],
        "server": {"pid": server_pid, "rss_before_mb": mb(rss_before),
                   "rss_after_open_mb": mb(rss_open), "rss_after_moves_mb": mb(rss_moves),
                   "per_session_mb": None if rss_before is None or not opened else
                   round((rss_open - rss_before) / 1024 / opened, 2),
                   "cpu_s_during_moves": None if server_cpu is None else round(server_cpu, 1),
                   "cpu_s_during_opening": None if open_cpu is None else round(open_cpu, 1)},
        "machine_cpu_busy_during_moves": round(busy, 2),
        "protocol": None if protocol_tally is None else {
            "sessions": protocol, "opened": protocol_tally.opened,
            "open_s": stats(protocol_tally.open_s),
            "latency_ms": stats(protocol_tally.latency_ms),
            "all_latency_ms": stats(protocol_tally.latency_ms + tally.latency_ms),
            "errors": len(protocol_tally.errors), "error_samples": protocol_tally.errors[:10],
            "client_cpu_s": round(protocol_tally.client_cpu_s, 1)},
        "diagnostics_before": diag_before, "diagnostics_after": diag_after,
        "machine": machine(),
    }


async def settle(url: str, timeout_s: float) -> dict:
    """Wait until the server holds no session and no queued job; the last snapshot."""
    deadline = time.monotonic() + timeout_s
    while True:
        d = diagnostics(url)
        if d is None:
            raise SystemExit("--churn needs the server's /diagnostics endpoint "
                             "(panel serve ... --plugins tools.diagnostics)")
        if (d["sessions"] == 0 and engine_idle(d)) or time.monotonic() > deadline:
            return diagnostics(url, deep=True)
        await asyncio.sleep(0.5)


async def churn(url: str, total: int, wave: int, timeout_s: float, settle_s: float) -> dict:
    """Open and close `total` sessions, `wave` at a time; compare the server before and after."""
    from playwright.async_api import async_playwright
    tally = Tally()
    client = Client(url, timeout_s, tally)
    async with async_playwright() as p:
        client.browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        first = await client.open(-1)  # starts the thread pool, loads the model, caches the run
        if first is None:
            raise SystemExit(f"could not open {url}: {tally.errors}")
        await client.close(-1, first)
        before = await settle(url, settle_s)
        peak_rss = before["rss_kb"]
        t0 = time.monotonic()
        for start in range(0, total, wave):
            pages = await asyncio.gather(*(client.open(i)
                                           for i in range(start, min(total, start + wave))))
            peak_rss = max(peak_rss, diagnostics(url)["rss_kb"])
            for i, pg in enumerate(pages, start):
                if pg is not None:
                    await client.close(i, pg)
            print(f"churn: {min(total, start + wave)} of {total} opened and closed "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
        wall = time.monotonic() - t0
        await client.browser.close()
    after = await settle(url, settle_s)
    return {"url": url, "sessions": total, "wave": wave, "opened": len(tally.open_s),
            "wall_s": round(wall, 1), "errors": len(tally.errors),
            "error_samples": tally.errors[:10], "console_errors": len(tally.console_errors),
            "console_samples": tally.console_errors[:5], "page_errors": len(tally.page_errors),
            "page_error_samples": tally.page_errors[:5], "before": before, "after": after,
            "rss_before_mb": round(before["rss_kb"] / 1024, 1),
            "rss_peak_mb": round(peak_rss / 1024, 1),
            "rss_after_mb": round(after["rss_kb"] / 1024, 1), "machine": machine()}


def table(result: dict) -> str:
    """The load figures as a small text table."""
    lat, op, srv = result["latency_ms"], result["open_s"], result["server"]
    rows = [("sessions opened", f"{result['opened']} of {result['sessions']}"),
            ("mode", result["mode"]),
            ("open to first result p50 / p95 (s)",
             f"{op.get('p50', 0):.1f} / {op.get('p95', 0):.1f}"),
            ("moves measured", str(lat["n"])),
            ("move to updated table p50 / p95 / max (ms)",
             f"{lat.get('p50', 0):.0f} / {lat.get('p95', 0):.0f} / {lat.get('max', 0):.0f}"),
            ("errors / console errors / page errors",
             f"{result['errors']} / {result['console_errors']} / {result['page_errors']}"),
            ("server RSS before / after open / after moves (MB)",
             f"{srv['rss_before_mb']} / {srv['rss_after_open_mb']} / {srv['rss_after_moves_mb']}"),
            ("server memory per session (MB)", str(srv["per_session_mb"])),
            ("server CPU during opening / during moves (s)",
             f"{srv['cpu_s_during_opening']} / {srv['cpu_s_during_moves']}"),
            ("machine CPU busy during moves", f"{result['machine_cpu_busy_during_moves']:.0%}"),
            ("machine", f"{result['machine']['nproc']} x {result['machine']['cpu_model']}, "
                        f"load average {result['machine']['loadavg_1min']} at the end")]
    proto = result.get("protocol")
    if proto:
        plat, alat = proto["latency_ms"], proto["all_latency_ms"]
        rows += [("protocol sessions opened", f"{proto['opened']} of {proto['sessions']}"),
                 ("protocol moves p50 / p95 / max (ms)",
                  f"{plat.get('p50', 0):.0f} / {plat.get('p95', 0):.0f} / "
                  f"{plat.get('max', 0):.0f} ({plat['n']} moves)"),
                 ("all moves p50 / p95 (ms)",
                  f"{alat.get('p50', 0):.0f} / {alat.get('p95', 0):.0f} ({alat['n']} moves)"),
                 ("protocol errors", str(proto["errors"])),
                 ("protocol client CPU, all sessions (s)", str(proto["client_cpu_s"]))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:5006/app")
    ap.add_argument("--sessions", type=int, default=40)
    ap.add_argument("--moves", type=int, default=3, help="slider moves per session")
    ap.add_argument("--server-pid", type=int, help="read the server's memory from /proc/PID")
    ap.add_argument("--stagger", type=float, default=1.0, help="seconds between session opens")
    ap.add_argument("--opening", type=int, default=4, help="sessions loading at the same time")
    ap.add_argument("--think", type=float, default=2.0, help="mean seconds between moves")
    ap.add_argument("--burst", action="store_true", help="every session moves at the same moment")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds one open or move may take")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--churn", type=int, metavar="N", help="open and close N sessions instead")
    ap.add_argument("--wave", type=int, default=10, help="sessions open at once while churning")
    ap.add_argument("--settle", type=float, default=60.0,
                    help="seconds to wait for the server to drop closed sessions")
    ap.add_argument("--light", action="store_true",
                    help="hide the figures after load (updates still arrive; nothing is drawn)")
    ap.add_argument("--nice", type=int, default=0,
                    help="lower this client's (and chromium's) CPU priority by N, so a server on "
                         "the same machine is not starved by the browsers")
    ap.add_argument("--protocol-sessions", type=int, default=0, metavar="N",
                    help="N more sessions over Bokeh's websocket protocol, without a browser "
                         "(tools/load_protocol.py): a class on a machine too small for N browsers")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # chromium inherits it
    if args.churn:
        result = asyncio.run(churn(args.url, args.churn, args.wave, args.timeout, args.settle))
        print(json.dumps(result, indent=2))
        return 0 if result["errors"] == 0 else 1
    result = asyncio.run(load(args.url, args.sessions, args.moves, args.server_pid, args.stagger,
                              args.opening, args.think, args.burst, args.timeout, args.seed,
                              args.light, args.protocol_sessions))
    print(json.dumps(result, indent=2) if args.json else table(result))
    failed = result["errors"] + (result["protocol"] or {}).get("errors", 0)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
