"""The engine's import boundary: no UI libraries anywhere in `engine/`, no torch in bookkeeping.

Checked twice: statically over every source file's import statements (including imports inside
functions), and dynamically by importing every engine module in a fresh interpreter.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
UI = {"panel", "bokeh", "param"}
# Plain-Python bookkeeping (STYLE.md: "no torch in bookkeeping").
BOOKKEEPING = ["block_manager", "config", "metrics", "records", "sampling_params", "scheduler",
               "sequence", "workload"]


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a file imports anywhere in its body."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_scanner_sees_nested_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import panel as pn\n    from bokeh.models import X\n")
    assert imported_roots(probe) == {"panel", "bokeh"}


def test_no_engine_source_imports_ui_libraries() -> None:
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) >= 10
    offenders = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & UI) for f in files}
    assert {f: bad for f, bad in offenders.items() if bad} == {}


def test_bookkeeping_modules_do_not_import_torch() -> None:
    for name in BOOKKEEPING:
        assert "torch" not in imported_roots(ENGINE / f"{name}.py"), name


def test_importing_every_engine_module_loads_no_ui_library() -> None:
    script = (
        "import importlib, json, pkgutil, sys\n"
        "import engine\n"
        "names = [m.name for m in pkgutil.walk_packages(engine.__path__, 'engine.')\n"
        "         if not m.name.endswith('__main__')]\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "loaded = sorted({k.split('.')[0] for k in sys.modules} & {'panel', 'bokeh', 'param'})\n"
        "print(json.dumps({'modules': names, 'ui': loaded}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"engine.llm_engine", "engine.cli", "engine.model", "engine.analytic"} <= set(
        result["modules"])
    assert result["ui"] == []
