"""`python -m lab [--page-servers N] [panel serve flags]`: the whole lab with one command.

Starts the engine server (`python -m engine serve`, which measures every run) unless
LAB_ENGINE_URL already names one, or LAB_ENDPOINT names an external deployment to measure instead;
then `panel serve lab/app.py` with the given flags. For a class,
`--page-servers N` starts N page servers on N consecutive ports from `--port`, all sharing the one
engine server, to put behind a proxy that keeps each browser on one of them (docs/classroom.md).
Panel's own `--num-procs` is refused: its processes share one port with no such stickiness, so a
page's websocket can reach a process that did not build it, which then builds the page again (and
takes its stylesheets from a CDN). Stops everything on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from lab.endpoint_config import EndpointConfig
from lab.engine_client import EngineClient, EngineUnavailable
from lab.engine_process import ROOT, start_engine, stop_engine


def main(argv: list[str]) -> int:
    # SIGTERM (a service manager, a test) must stop the children too: turn it into an exit that
    # runs the clean-up below, which the default handler would skip.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    ap = argparse.ArgumentParser(prog="python -m lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--page-servers", type=int, default=1, metavar="N",
                    help="page servers on consecutive ports, sharing the engine server")
    ap.add_argument("--port", type=int, default=5006, help="the first page server's port")
    args, panel_flags = ap.parse_known_args(argv)
    if any(flag.startswith("--num-procs") for flag in panel_flags):
        ap.error("--num-procs is not sticky for Panel pages; use --page-servers N behind a "
                 "proxy (docs/classroom.md)")
    if args.page_servers < 1:
        ap.error("--page-servers must be at least 1")
    try:
        endpoint = EndpointConfig.from_env()
    except ValueError as err:
        print(f"lab: {err}", file=sys.stderr)
        return 2
    engine = None
    if endpoint is None and not os.environ.get("LAB_ENGINE_URL"):
        engine, url = start_engine(port=int(os.environ.get("LAB_ENGINE_PORT", "0")) or None)
        os.environ["LAB_ENGINE_URL"] = url
    if endpoint is not None:  # the endpoint measures; an engine server only hosts a classroom
        print(f"lab: runs go to the endpoint {endpoint.address}"
              + ("" if os.environ.get("LAB_ENGINE_URL") else
                 " (no classroom: that needs an engine server at LAB_ENGINE_URL)"),
              file=sys.stderr, flush=True)
    else:
        try:
            info = EngineClient().wait_ready(timeout_s=180)
        except EngineUnavailable as err:
            print(f"lab: {err}", file=sys.stderr)
            if engine is not None:
                stop_engine(engine)
            return 2
        print(f"lab: engine server at {os.environ['LAB_ENGINE_URL']} measures on {info.device}",
              file=sys.stderr, flush=True)
    pages = [subprocess.Popen([sys.executable, "-m", "panel", "serve",
                               str(ROOT / "lab" / "app.py"), "--port", str(args.port + i),
                               *panel_flags], cwd=ROOT)
             for i in range(args.page_servers)]
    try:
        return max(page.wait() for page in pages)
    except KeyboardInterrupt:
        for page in pages:
            page.terminate()
        return max(page.wait() for page in pages)
    finally:
        for page in pages:
            if page.poll() is None:
                page.terminate()
        if engine is not None:
            stop_engine(engine)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
