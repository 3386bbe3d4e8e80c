"""The page's prose, math and data, read from `content/` (markdown and yaml) and checked once.

This module knows the shape of each content file and nothing about Panel, so tests can load it fast.
It returns one read-only `Content`: mappings are `MappingProxyType`, lists are tuples, because the
cached object is shared by every browser session. Prose lives in the files, never here. A missing
file, a missing key or a broken cross-reference raises `ValueError` naming the file and the key.
"""
from __future__ import annotations

import functools
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from lab.state import LabState

CONTENT_DIR = Path(__file__).resolve().parents[1] / "content"
PLOT_IDS = ("latency", "timeline", "kv_memory", "page_map", "queue", "policy", "tpot_batch",
            "goodput_rate")
# The run-shaping controls a prediction question may ask about: LabState's, but the model.
CONTROLS = tuple(name for name in LabState.RUN_CONTROLS if name != "model")
# What a preset sets: every control but the model.
PRESET_CONTROLS = tuple(name for name in LabState.CONTROLS if name != "model")
DIRECTIONS = ("up_lot", "up_little", "flat", "down")
PROMPT_FIELDS = ("object_kind", "object_label", "object_key", "question", "next_action",
                 "demo_state")
MARKDOWN_FILES = ("intuition", "code", "demo", "storyboard")
AFTER_PANELS = ("storyboard", "inquiry", "sources", "claims", "practice", "research")
GATE_MESSAGES = ("idle", "placeholder", "lowered", "several", "committed", "agreed", "disagreed",
                 "skipped", "no_result")

# Required keys per yaml file. A dict lists a mapping's keys; a one-item list means "a non-empty
# list whose items all have this shape"; None means any value that is present and not null.
SCHEMAS: dict[str, Any] = {
    "page.yaml": {
        "breadcrumb": None, "title": None, "summary": None,
        "prerequisite": {"title": None}, "next": {"title": None},  # href defaults to #<key>
        "structure": {"moves": [{"id": None, "label": None, "description": None}]},
        "learning_map": {"bridge": None},
        "sections": [{"id": None, "heading": None, "subtitle": None}],
    },
    "math.yaml": [{"id": None, "title": None, "latex": None, "explanation": None,
                   "symbols": [{"symbol": None, "meaning": None, "code_name": None}]}],
    "presets.yaml": {"default": None, "presets": [{
        "id": None, "label": None, "description": None,
        "values": dict.fromkeys(PRESET_CONTROLS)}]},
    "predictions.yaml": {
        "thresholds": {"flat_below": None, "little_below": None, "description": None},
        "controls": [{"control": None, "question": None, "metric": None, "metric_label": None,
                      "choices": [{"id": None, "label": None, "direction": None}],
                      "explanations": dict.fromkeys(DIRECTIONS)}],
    },
    "sources.yaml": [{"id": None, "role": None, "title": None, "authors": None, "venue": None,
                      "year": None, "url": None, "summary": None, "supports": [None],
                      "does_not_support": [None], "facts": [None]}],
    "claims.yaml": [{"id": None, "text": None, "source_ids": [None], "scope": None,
                     "caveats": None, "review": {"badge": None, "reviewer": None, "note": None}}],
    "practice.yaml": [{"id": None, "prompt": None, "hints": [None], "rubric": [None]}],
    "inquiry.yaml": {"question": None, "prompt": None,
                     "cues": [{"id": None, "label": None, "plot": None, "feedback": None}]},
    "research.yaml": {
        "object_key": None, "object_label": None, "context": None, "intro": None,
        "object_kinds": [{"kind": None, "label": None, "example_key": None}],
        "default_question": None, "evidence": [None], "resolution": [None],
        "prompt_template": None,
    },
    "after.yaml": {"intro": None, "panels": [{"id": None, "heading": None, "intro": None}],
                   "gate": dict.fromkeys(GATE_MESSAGES)},
}


@dataclass(frozen=True)
class Content:
    """Everything the page says, one attribute per content file (markdown files as strings)."""

    root: Path
    page: Mapping[str, Any]
    intuition: str
    math: tuple[Mapping[str, Any], ...]
    code: str
    demo: str
    storyboard: str
    presets: tuple[Mapping[str, Any], ...]
    default_preset: str
    predictions: Mapping[str, Any]  # keys: thresholds, controls
    sources: tuple[Mapping[str, Any], ...]
    claims: tuple[Mapping[str, Any], ...]
    practice: tuple[Mapping[str, Any], ...]
    inquiry: Mapping[str, Any]
    research: Mapping[str, Any]
    after: Mapping[str, Any]  # keys: intro, panels, gate (the after-the-first-pass panels)

    def formula(self, formula_id: str) -> Mapping[str, Any]:
        """The math block with this id."""
        return _by_key(self.math, "id", formula_id, "math.yaml")

    def preset(self, preset_id: str | None = None) -> Mapping[str, Any]:
        """The preset with this id, or the default one."""
        return _by_key(self.presets, "id", preset_id or self.default_preset, "presets.yaml")

    def source(self, source_id: str) -> Mapping[str, Any]:
        """The source card with this id."""
        return _by_key(self.sources, "id", source_id, "sources.yaml")

    def prediction(self, control: str) -> Mapping[str, Any]:
        """The prediction question for one control (one of CONTROLS)."""
        return _by_key(self.predictions["controls"], "control", control, "predictions.yaml")

    def section(self, section_id: str) -> Mapping[str, Any]:
        """The heading and subtitle of one page section."""
        return _by_key(self.page["sections"], "id", section_id, "page.yaml")

    def panel(self, panel_id: str) -> Mapping[str, Any]:
        """The heading and introduction of one after-the-first-pass panel."""
        return _by_key(self.after["panels"], "id", panel_id, "after.yaml")


def _by_key(items: Sequence[Mapping[str, Any]], key: str, value: str,
            file: str) -> Mapping[str, Any]:
    for item in items:
        if item[key] == value:
            return item
    raise KeyError(f"{file}: no entry with {key} {value!r}")


def _check(value: Any, schema: Any, file: Path, where: str) -> None:
    """Walk `value` against `schema`; the error names the file and the dotted path of the key."""
    place = where or "the top level"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{file}: {place} must be a mapping")
        for key, sub in schema.items():
            if value.get(key) is None:
                raise ValueError(f"{file}: missing key {key!r} in {place}")
            _check(value[key], sub, file, f"{where}.{key}" if where else key)
    elif isinstance(schema, list):
        if not isinstance(value, list) or not value:
            raise ValueError(f"{file}: {place} must be a non-empty list")
        for i, item in enumerate(value):
            if item is None:
                raise ValueError(f"{file}: empty item {where}[{i}]")
            _check(item, schema[0], file, f"{where}[{i}]")


def _unique(items: list[dict], key: str, file: Path) -> None:
    seen = [item[key] for item in items]
    duplicates = sorted({x for x in seen if seen.count(x) > 1})
    if duplicates:
        raise ValueError(f"{file}: duplicate {key} {', '.join(map(str, duplicates))}")


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path}: content file is missing")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid yaml: {exc}") from None
    _check(data, SCHEMAS[path.name], path, "")
    return data


def _read_markdown(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: content file is missing")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{path}: content file is empty")
    return text


def _cross_check(root: Path, d: dict[str, Any]) -> None:
    """References between files: ids that must exist, and fixed vocabularies the widgets rely on."""
    for name, items, key in (
            ("math.yaml", d["math"], "id"), ("sources.yaml", d["sources"], "id"),
            ("claims.yaml", d["claims"], "id"), ("inquiry.yaml", d["inquiry"]["cues"], "id"),
            ("presets.yaml", d["presets"]["presets"], "id"),
            ("predictions.yaml", d["predictions"]["controls"], "control")):
        _unique(items, key, root / name)
    if d["presets"]["default"] not in {p["id"] for p in d["presets"]["presets"]}:
        raise ValueError(f"{root / 'presets.yaml'}: key 'default' names an unknown preset")
    source_ids = {s["id"] for s in d["sources"]}
    for claim in d["claims"]:
        unknown = set(claim["source_ids"]) - source_ids
        if unknown:
            raise ValueError(f"{root / 'claims.yaml'}: claim {claim['id']!r} key 'source_ids' "
                             f"names unknown sources {sorted(unknown)}")
    for cue in d["inquiry"]["cues"]:
        if cue["plot"] not in PLOT_IDS:
            raise ValueError(f"{root / 'inquiry.yaml'}: cue {cue['id']!r} key 'plot' must be "
                             f"one of {', '.join(PLOT_IDS)}")
    controls = {c["control"] for c in d["predictions"]["controls"]}
    if controls != set(CONTROLS):
        raise ValueError(f"{root / 'predictions.yaml'}: key 'controls' must cover exactly "
                         f"{', '.join(CONTROLS)}")
    for c in d["predictions"]["controls"]:
        if {ch["direction"] for ch in c["choices"]} - set(DIRECTIONS):
            raise ValueError(f"{root / 'predictions.yaml'}: control {c['control']!r} key "
                             f"'direction' must be one of {', '.join(DIRECTIONS)}")
    fields = {f for _, f, _, _ in string.Formatter().parse(d["research"]["prompt_template"]) if f}
    if fields != set(PROMPT_FIELDS):
        raise ValueError(f"{root / 'research.yaml'}: key 'prompt_template' must use exactly the "
                         f"placeholders {', '.join(PROMPT_FIELDS)}")
    if [p["id"] for p in d["after"]["panels"]] != list(AFTER_PANELS):
        raise ValueError(f"{root / 'after.yaml'}: key 'panels' must list, in order, "
                         f"{', '.join(AFTER_PANELS)}")


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def to_plain(value: Any) -> Any:
    """A mutable dict/list copy of any part of `Content`, for JSON or for a Bokeh source."""
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    return value


@functools.lru_cache(maxsize=4)
def load_content(root: Path | None = None) -> Content:
    """Read, check and freeze every content file under `root` (default: the repo's content/)."""
    root = Path(root) if root is not None else CONTENT_DIR
    d = {path.stem: _read_yaml(path) for path in (root / name for name in SCHEMAS)}
    _cross_check(root, d)
    for key in ("prerequisite", "next"):
        d["page"][key].setdefault("href", f"#{key}")
    frozen = {key: _freeze(value) for key, value in d.items()}
    return Content(
        root=root, page=frozen["page"], math=frozen["math"],
        presets=frozen["presets"]["presets"], default_preset=d["presets"]["default"],
        predictions=frozen["predictions"], sources=frozen["sources"], claims=frozen["claims"],
        practice=frozen["practice"], inquiry=frozen["inquiry"], research=frozen["research"],
        after=frozen["after"],
        **{name: _read_markdown(root / f"{name}.md") for name in MARKDOWN_FILES},
    )
