"""The repository's import boundaries: no UI libraries anywhere in `engine/`, no torch in
bookkeeping, and imports that run one way between the top-level folders.

The engine boundary is checked twice: statically over every source file's import statements
(including imports inside functions), and dynamically by importing every engine module in a fresh
interpreter. The folders are checked statically: engine <- widgets <- lab, and `tools/` (ops
tooling, not installed) may import all three while nothing in them, nor the tests' app fixtures,
imports it.
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
# What each of the project's folders may import of the others: one way, engine first.
MAY_IMPORT = {"engine": set(), "widgets": {"engine"}, "lab": {"engine", "widgets"},
              "tools": {"engine", "widgets", "lab"}}
# The tests' fixtures that build or serve the app: they stand for the app, so no tools either.
APP_FIXTURES = ["tests/conftest.py", "tests/fakes.py", "tests/serverkit.py",
                "tests/browser/conftest.py"]
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


def test_folders_import_one_way() -> None:
    offenders = {}
    for folder, allowed in MAY_IMPORT.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            bad = imported_roots(f) & (set(MAY_IMPORT) - allowed - {folder})
            if bad:
                offenders[str(f.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_app_fixtures_do_not_import_tools() -> None:
    for name in APP_FIXTURES:
        assert "tools" not in imported_roots(ROOT / name), name


def test_tools_stay_out_of_the_installed_packages_and_the_lab() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    packages = next(line for line in text.splitlines() if line.startswith("packages"))
    assert '"tools' not in packages and '"lab"' in packages
    assert (ROOT / "tools" / "__init__.py").exists()
    leftovers = [f.name for f in (ROOT / "lab").iterdir()
                 if f.stem.startswith(("load", "diagnostics", "gc_"))]  # what moved to tools/
    assert leftovers == []
