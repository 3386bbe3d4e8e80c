"""`python -m lab [panel serve flags]`: the whole lab with one command.

Starts the engine server (`python -m engine serve`, which measures every run) unless
LAB_ENGINE_URL already names one, then `panel serve lab/app.py` with the given flags (for a class,
`--num-procs N`: every page process shares the one engine server). Stops both on Ctrl-C.
"""
from __future__ import annotations

import os
import subprocess
import sys

from lab.engine_client import EngineClient, EngineUnavailable
from lab.engine_process import ROOT, start_engine, stop_engine


def main(argv: list[str]) -> int:
    engine = None
    if not os.environ.get("LAB_ENGINE_URL"):
        engine, url = start_engine(port=int(os.environ.get("LAB_ENGINE_PORT", "0")) or None)
        os.environ["LAB_ENGINE_URL"] = url
    try:
        info = EngineClient().wait_ready(timeout_s=180)
    except EngineUnavailable as err:
        print(f"lab: {err}", file=sys.stderr)
        if engine is not None:
            stop_engine(engine)
        return 2
    print(f"lab: engine server at {os.environ['LAB_ENGINE_URL']} measures on {info.device}",
          file=sys.stderr, flush=True)
    panel = subprocess.Popen([sys.executable, "-m", "panel", "serve", str(ROOT / "lab" / "app.py"),
                              *argv], cwd=ROOT)
    try:
        return panel.wait()
    except KeyboardInterrupt:
        panel.terminate()
        return panel.wait()
    finally:
        if engine is not None:
            stop_engine(engine)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
