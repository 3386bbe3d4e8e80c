"""Content files: they load, match the sliders and formulas, and are written in our own words."""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lab.content import CONTENT_DIR, CONTROLS, DIRECTIONS, PLOT_IDS, SCHEMAS, load_content, to_plain

REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/concept-page.txt"
SLIDER_RANGES = {"batch": (1, 64), "context": (16, 8192), "page": (1, 256), "output": (1, 512)}


@pytest.fixture(scope="module")
def content():
    return load_content()


def test_every_file_loads(content):
    assert content.page["title"] == "LLM Serving at Scale: Prefill, Decode & Continuous Batching"
    assert content.page["breadcrumb"] == "LLM Systems"
    assert [m["id"] for m in content.page["structure"]["moves"]] == [
        "picture", "notation", "implementation", "manipulation"]
    assert {s["id"] for s in content.page["sections"]} >= {"intuition", "math", "code", "demo"}
    for text in (content.intuition, content.code, content.demo, content.storyboard):
        assert len(text.split()) > 20
    assert 250 <= len(content.intuition.split()) <= 450
    assert load_content() is content  # cached


def test_content_is_read_only(content):
    with pytest.raises(TypeError):
        content.preset()["values"]["batch"] = 99
    plain = to_plain(content.preset())
    plain["values"]["batch"] = 99  # a copy, so the shared object is untouched
    assert content.preset()["values"]["batch"] != 99


def test_presets_lie_in_slider_ranges(content):
    from lab.state import LabState

    assert 3 <= len(content.presets) <= 8
    for preset in content.presets:
        values = preset["values"]
        for name, (low, high) in SLIDER_RANGES.items():
            assert low <= values[name] <= high, (preset["id"], name)
        # every control set, each to a value the sliders offer: a preset always gives one run
        assert set(values) == set(LabState.CONTROLS) - {"model"}, preset["id"]
        state = LabState()
        assert state.apply(dict(values)) == [], preset["id"]
        assert values["ttft_slo"] > 0 and values["tpot_slo"] > 0
        # Small enough for a 2-core CPU: one long-context preset may trade batch for context.
        assert values["batch"] * values["context"] <= 8192 or (
            values["context"] <= 2048 and values["batch"] <= 2), preset["id"]


def test_each_prediction_control_has_choices_and_explanations(content):
    thresholds = content.predictions["thresholds"]
    assert 0 < thresholds["flat_below"] < thresholds["little_below"]
    for control in CONTROLS:
        question = content.prediction(control)
        assert question["metric"] and question["question"].endswith("?")
        directions = [choice["direction"] for choice in question["choices"]]
        assert sorted(directions) == sorted(DIRECTIONS)
        assert len({choice["id"] for choice in question["choices"]}) == len(DIRECTIONS)
        assert all(len(question["explanations"][d].split()) >= 10 for d in DIRECTIONS)


def test_math_has_the_named_formulas(content):
    ids = {block["id"] for block in content.math}
    assert {"latency", "kv_memory", "goodput", "paging_waste", "roofline"} <= ids
    codes = {s["code_name"] for block in content.math for s in block["symbols"]}
    assert {"n_out", "batch", "layers", "T", "h_kv", "d_head", "bytes_per_elem",
            "slo.ttft_ms", "slo.tpot_ms", "P", "head_params"} <= codes
    assert "first token" in content.formula("tpot")["explanation"]


def test_kv_check_values_match_the_formula(content):
    text = content.formula("kv_memory")["explanation"]
    for T in (2048, 8192, 32768, 131072):
        assert f"{2 * 16 * 80 * T * 8 * 128 * 2 / 1e9:.2f} GB" in text


def test_paging_check_values_match_the_formula(content):
    text = content.formula("paging_waste")["explanation"]
    for T in (2000, 8192, 20000):
        waste = math.ceil(T / 256) * 256 - T
        assert re.search(rf"T = {T}\b.*?\*\*{waste}\*\*", text), T


def test_claims_cite_known_sources(content):
    source_ids = {source["id"] for source in content.sources}
    assert {"yu-2022-orca", "kwon-2023-pagedattention"} <= source_ids
    assert 3 <= len(content.claims) <= 5
    for claim in content.claims:
        assert claim["source_ids"] and set(claim["source_ids"]) <= source_ids
        caveats = " ".join(claim["caveats"].split())
        assert "toy witness" in caveats and "this device" in caveats, caveats
        assert re.search(r"not (a )?production benchmark", caveats), caveats


def test_primary_sources(content):
    assert content.source("yu-2022-orca")["url"] == (
        "https://www.usenix.org/conference/osdi22/presentation/yu")
    assert content.source("kwon-2023-pagedattention")["url"] == "https://arxiv.org/abs/2309.06180"


def test_inquiry_cues_point_at_known_plots(content):
    assert content.inquiry["question"] == "Which visible object should carry the first intuition?"
    assert 4 <= len(content.inquiry["cues"]) <= 6
    assert all(cue["plot"] in PLOT_IDS for cue in content.inquiry["cues"])
    from widgets.inquiry import PLOT_TITLES
    assert set(PLOT_TITLES) == set(PLOT_IDS)  # every plot a cue may name has its heading


def test_practice_items_have_three_hints_and_three_rubric_items(content):
    assert 1 <= len(content.practice) <= 2
    for item in content.practice:
        assert len(item["hints"]) == 3 and len(item["rubric"]) == 3


def test_research_template_fills(content):
    research = content.research
    filled = research["prompt_template"].format(
        object_kind="concept", object_label=research["object_label"],
        object_key=research["object_key"], question=research["default_question"],
        next_action="rerun", demo_state="batch=8")
    assert research["object_key"] == "concept:llm-systems/llm-serving" and "{" not in filled


@pytest.mark.parametrize("file", sorted(SCHEMAS))
def test_missing_key_names_file_and_key(tmp_path, file):
    root = tmp_path / "content"
    shutil.copytree(CONTENT_DIR, root)
    data = yaml.safe_load((root / file).read_text())
    target = data[0] if isinstance(data, list) else data
    key = next(iter(SCHEMAS[file][0] if isinstance(SCHEMAS[file], list) else SCHEMAS[file]))
    del target[key]
    (root / file).write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=rf"{file}.*{key}"):
        load_content(root)


def _words(text: str) -> str:
    """Lowercase words joined by single spaces: markup, punctuation and line breaks ignored."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _sentences(text: str) -> list[str]:
    return [_words(s) for s in re.split(r"(?<=[.!?;])\s+|\n\s*\n|\n\s*[-*]\s", text)]


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.skipif(not REFERENCE.is_file(), reason="reference page not beside the repository")
def test_no_sentence_is_copied_from_the_reference(content):
    # Names that must stay verbatim: the page's and the papers' titles.
    names = [_words(n) for n in (content.page["title"], *(s["title"] for s in content.sources))]
    texts = [path.read_text() for path in CONTENT_DIR.glob("*.md")]
    texts += [s for path in CONTENT_DIR.glob("*.yaml") for s in _strings(yaml.safe_load(
        path.read_text()))]
    ours = [s for text in texts for s in _sentences(text)]
    reference_text = REFERENCE.read_text()
    theirs = [s for s in _sentences(reference_text) if len(s.split()) > 8 and s not in names]
    reference, joined = f" {_words(reference_text)} ", f" {' '.join(ours)} "
    for sentence in ours:
        if len(sentence.split()) > 8 and sentence not in names:
            assert f" {sentence} " not in reference, sentence
    for sentence in theirs:
        assert f" {sentence} " not in joined, sentence


def test_loader_does_not_import_panel():
    code = "import sys, lab.content; sys.exit('panel' in sys.modules or 'bokeh' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo).returncode == 0


def test_big_pages_text_matches_a_measured_run(content):
    """The big-pages preset's numbers are what the engine measures for its values: every sequence
    in one page, 56 empty slots once the prompt is cached, 9 after the last cached reply token."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.workload import WorkloadSpec

    preset = content.preset("big-pages")
    v, text = preset["values"], " ".join(preset["description"].split())
    assert v.get("mix", "fixed") == "fixed"  # the text's numbers are for one length
    eng = LLMEngine(EngineConfig(model="tiny", block_size=v["page"], max_num_seqs=v["batch"],
                                 max_num_batched_tokens=v.get("chunk", 512)))
    trace = eng.run(WorkloadSpec(num_requests=v.get("requests", v["batch"]),
                                 prompt_len=v["context"], output_len=v["output"]))
    cached = [it.context_len for s in trace.steps for it in s.scheduled
              if it.context_len >= v["context"]]
    assert max(cached) <= v["page"] and min(cached) == v["context"]  # one page; prompt cached
    first, last = v["page"] - v["context"], v["page"] - max(cached)
    assert (first, last) == (56, 9)
    assert f"{first} slots short of full once the prompt is in" in text
    assert f"still {last} short when the last reply token" in text
    assert f"at most {round(100 * first / v['page'])}%" in text and "most of that page" not in text


def test_prediction_controls_are_the_run_shaping_controls():
    from lab.content import CONTROLS
    from lab.state import LabState

    assert set(CONTROLS) == set(LabState.RUN_CONTROLS) - {"model"}
