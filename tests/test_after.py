"""The prediction gate's grading and flow, and the after-the-first-pass panels, without a browser:
grading against the thresholds, the storyboard over a real tiny trace, the research prompt, the
practice hints and the inquiry's links."""
from __future__ import annotations

import math
from types import SimpleNamespace

import panel as pn
import pytest
from bokeh.document import Document

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.metrics import summarize
from engine.workload import WorkloadSpec
from lab.after import after_first_pass, demo_state_text
from lab.content import AFTER_PANELS, load_content, to_plain
from lab.prediction import (Verdict, attach_prediction_gate, direction, grade, metric_value,
                            setting_number, spread,
                            pick_control, relative_change)
from lab.runs import RunKey
from lab.state import LabState
from widgets.run_state import RunState
from widgets.inquiry import VisualInquiry, plot_anchor
from widgets.practice import PracticeLoop
from widgets.research_room import ResearchRoom, fill_prompt
from widgets.sources import ClaimReview, SourceCards
from widgets.storyboard import Storyboard, step_counts, step_events


@pytest.fixture(scope="module")
def content():
    return load_content()


@pytest.fixture(scope="module")
def trace():
    """Four requests through a two-seat batch: joins, decodes and leaves all happen."""
    engine = LLMEngine(EngineConfig(model="tiny", block_size=4, max_num_seqs=2,
                                    max_num_batched_tokens=32))
    return engine.run(WorkloadSpec(num_requests=4, prompt_len=20, output_len=5))


def fake_summary(tpot=10.0, ttft=100.0, waste=8, kv_bytes=2e9):
    stats = lambda p50: SimpleNamespace(p50=p50)  # noqa: E731
    return SimpleNamespace(tpot_ms=stats(tpot), ttft_ms=stats(ttft), waste_tokens_peak=waste,
                           kv_bytes_peak=kv_bytes)


# -- grading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("before,after,expected", [
    (10, 20, "up_lot"), (10, 15, "up_lot"), (10, 14.9, "up_little"), (10, 11, "up_little"),
    (10, 10.9, "flat"), (10, 9.1, "flat"), (10, 9, "down"), (10, 2, "down")])
def test_direction_follows_the_thresholds(content, before, after, expected):
    assert direction(relative_change(before, after), content.predictions["thresholds"]) == expected


@pytest.mark.parametrize("observed", ["up_lot", "up_little", "flat", "down"])
@pytest.mark.parametrize("choice", ["up_lot", "up_little", "flat", "down"])
def test_grade_agrees_only_with_the_observed_direction(content, observed, choice):
    after = {"up_lot": 20.0, "up_little": 12.0, "flat": 10.2, "down": 7.0}[observed]
    spec = content.prediction("batch")
    choice_id = next(c["id"] for c in spec["choices"] if c["direction"] == choice)
    v = grade("batch", 8, 16, 10.0, after, choice_id, content)
    assert isinstance(v, Verdict)
    assert v.observed_direction == observed
    assert v.agreed is (choice == observed)
    assert v.explanation == spec["explanations"][observed]
    assert v.numbers["metric_label"] == spec["metric_label"]
    assert (v.numbers["before"], v.numbers["after"]) == (10.0, after)


def test_lowering_a_control_reads_the_move_in_reverse(content):
    # Batch 16 -> 8 halves TPOT: read as the raise 8 -> 16, TPOT doubles, a rise of 100%.
    v = grade("batch", 16, 8, 10.0, 5.0, "tpot_up_lot", content)
    assert v.agreed and v.observed_direction == "up_lot"
    assert v.numbers["lowered"] and v.numbers["change"] == pytest.approx(-0.5)
    assert v.numbers["graded_change"] == pytest.approx(1.0)
    # Lowering the page size while waste grows means raising it would shrink waste.
    v = grade("page", 64, 16, 100, 130, "waste_down", content)
    assert v.agreed and v.observed_direction == "down"
    assert not grade("page", 64, 16, 100, 130, "waste_up_little", content).agreed


@pytest.mark.parametrize("low, high", [(10.0, 14.0), (10.0, 9.5), (10.0, 8.5), (10.0, 16.0),
                                       (0.0, 3.0), (4.0, 0.0)])
def test_raising_and_lowering_over_the_same_runs_mirror(content, low, high):
    """8 -> 16 and 16 -> 8 over the same two runs (metric `low` at batch 8, `high` at 16) are graded
    on one change, measured from the batch-8 run: same direction, same graded number."""
    up = grade("batch", 8, 16, low, high, "tpot_flat", content)
    down = grade("batch", 16, 8, high, low, "tpot_flat", content)
    assert down.observed_direction == up.observed_direction
    assert down.numbers["graded_change"] == up.numbers["graded_change"]
    assert down.agreed is up.agreed


def test_a_change_inside_the_measured_spread_is_flat(content):
    # 15% up: a little against the fixed 10% band, flat when runs of these settings vary by 20%;
    # 8% up is flat against the fixed band but real when the runs agree within 5%.
    assert grade("batch", 8, 16, 10.0, 11.5, "tpot_flat", content).observed_direction == \
        "up_little"
    graded = grade("batch", 8, 16, 10.0, 11.5, "tpot_flat", content, noise=0.2)
    assert graded.observed_direction == "flat" and graded.agreed
    assert graded.numbers["noise"] == 0.2
    assert grade("batch", 8, 16, 10.0, 10.8, "tpot_flat", content,
                 noise=0.05).observed_direction == "up_little"
    assert spread([10.0, 12.0, 11.0]) == pytest.approx(2 / 11) and spread([3.0]) is None


def test_named_controls_and_a_zero_rate_have_a_raising_direction(content):
    assert setting_number("policy", "static") > setting_number("policy", "continuous")
    assert setting_number("rate", 0) > setting_number("rate", 64)  # all at once is the most load
    base = {"model": "cpu-8m", "batch": 8, "context": 128, "page": 16, "output": 64,
            "requests": 8, "rate": 0.0, "mix": "fixed", "kv_mb": 32, "policy": "continuous",
            "chunk": 512}
    assert pick_control(base, {**base, "policy": "static"}) == ("policy", ())
    assert pick_control(base, {**base, "rate": 8.0, "batch": 16}) == ("rate", ("batch",))
    up = grade("policy", "continuous", "static", 100.0, 300.0, "policy_up_lot", content)
    down = grade("policy", "static", "continuous", 300.0, 100.0, "policy_up_lot", content)
    assert up.agreed and down.agreed and down.numbers["lowered"] and not up.numbers["lowered"]
    assert grade("rate", 8.0, 0.0, 50.0, 500.0, "rate_up_lot", content).agreed  # raising


def test_zero_baseline(content):
    assert relative_change(0, 3) == math.inf and relative_change(0, 0) == 0.0
    assert grade("page", 1, 16, 0, 40, "waste_up_lot", content).observed_direction == "up_lot"
    assert grade("page", 1, 16, 0, 0, "waste_flat", content).agreed
    assert grade("page", 16, 1, 0, 40, "waste_down", content).agreed  # lowered from zero


def test_choice_by_direction_and_unknown_choice(content):
    assert grade("output", 32, 64, 1.0, 1.8, "up_lot", content).agreed
    with pytest.raises(KeyError):
        grade("output", 32, 64, 1.0, 1.8, "tpot_up_lot", content)


def test_metric_values_read_the_summary(trace):
    s = summarize(trace)
    assert metric_value(s, "tpot_p50_ms") == s.tpot_ms.p50
    assert metric_value(s, "ttft_p50_ms") == s.ttft_ms.p50
    assert metric_value(s, "waste_tokens") == s.waste_tokens_peak
    assert metric_value(s, "kv_gb") == s.kv_bytes_peak / 1e9
    with pytest.raises(KeyError):
        metric_value(s, "goodput")


def test_pick_control_takes_the_largest_move():
    base = {**LabState().values(), "batch": 8, "context": 128, "page": 16, "output": 64,
            "model": "cpu-8m"}
    assert pick_control(base, dict(base)) is None
    assert pick_control(base, {**base, "model": "cpu-30m", "batch": 16}) is None
    assert pick_control(base, {**base, "batch": 2, "context": 2048, "output": 32}) == (
        "context", ("batch", "output"))


# -- the gate's flow -------------------------------------------------------------------------
class FakeDemo:
    """What attach_prediction_gate uses of a DemoController."""

    def __init__(self) -> None:
        self.state = LabState()
        self.run = RunState()
        self.listeners: list = []
        self.shown_key = None
        self.storyboard_note = None  # the lab's own engine: the storyboard is drawn
        self.fixed_controls = ()  # and every control shapes its runs

    def run_key(self):
        return self.state.key()

    def repeats(self, key) -> list:
        return []  # no repeats measured: the gate falls back to its fixed band

    def finish(self, summary, trace=None) -> object:
        """A run for the current settings finished and was drawn."""
        self.shown_key = self.state.key()
        trace = trace or object()
        for listener in self.listeners:
            listener(trace, summary)
        return trace


@pytest.fixture
def gated(content):
    demo = FakeDemo()
    gate = attach_prediction_gate(demo, content)
    first = demo.finish(fake_summary(tpot=10.0))
    assert gate.revealed and not gate.asking  # the first run needs no prediction
    return demo, gate, first


def test_gate_hides_until_commit_and_grades_the_measurement(gated):
    demo, gate, _ = gated
    demo.state.batch = 16
    assert gate.asking and not gate.revealed
    demo.finish(fake_summary(tpot=11.0))  # +10%: a little
    assert not gate.revealed  # measured, but no choice yet
    gate.commit("tpot_up_little")
    assert gate.revealed and not gate.asking
    assert "agreed" in gate.verdict_text and "did not" not in gate.verdict_text
    html = gate.verdict_pane.object
    assert "median TPOT (ms)" in html and "10.0" in html and "11.0" in html and "8 → 16" in html


def test_commit_first_then_the_run_reveals(gated):
    demo, gate, _ = gated
    demo.state.output = 32
    gate.commit("kv_up_lot")
    assert not gate.revealed  # the run is still going
    demo.finish(fake_summary(kv_bytes=2e9))  # lowered and flat
    assert gate.revealed and "did not agree" in gate.verdict_text
    assert "reverse move" in gate.verdict_pane.object


def test_slo_changes_and_redraws_need_no_prediction(gated):
    demo, gate, first = gated
    demo.state.tpot_slo = 20
    assert gate.revealed and not gate.asking
    demo.state.batch = 12
    for listener in demo.listeners:  # an SLO redraw of the old run is not the answer
        listener(first, fake_summary())
    assert gate.asking and not gate.revealed


def test_skip_reveals_with_a_note_and_the_numbers(gated, content):
    demo, gate, _ = gated
    demo.state.context = 512
    gate.skip()
    assert gate.revealed and "skipped" in gate.verdict_text
    demo.finish(fake_summary(ttft=300.0))
    assert "median TTFT (ms)" in gate.verdict_pane.object
    assert "agreed" not in gate.verdict_text


def test_refused_run_reveals_with_a_note(gated, content):
    demo, gate, _ = gated
    demo.state.batch = 32
    demo.run.status = "failed"
    assert gate.revealed and content.after["gate"]["no_result"] in gate.verdict_text


def test_cover_swaps_placeholder_and_results(gated):
    _, gate, _ = gated
    covered = gate.cover(pn.pane.Markdown("results"))
    placeholder, results = covered.objects
    gate.ask({"control": "batch", "question": "q?", "choices": [
        {"id": "a", "label": "A", "direction": "up_lot"}]}, 8, 16)
    assert placeholder.visible and not results.visible
    gate.reveal()
    assert results.visible and not placeholder.visible


# -- storyboard ------------------------------------------------------------------------------
def test_storyboard_events_join_and_leave(trace):
    events = step_events(trace)
    assert len(events) == len(trace.steps)
    joined = [e.request_id for step in events for e in step if e.kind == "joined"]
    left = [e.request_id for step in events for e in step if e.kind == "finished"]
    assert sorted(joined) == sorted(left) == [r.id for r in trace.requests]
    for step, evs in zip(trace.steps, events):  # a join is a request's first appearance
        assert {e.request_id for e in evs if e.kind == "finished"} == set(step.finished)


def test_storyboard_steps_through_the_records(trace):
    sb = Storyboard()
    sb.show(trace)
    assert sb.slider.end == len(trace.steps) - 1
    seen = []
    for i, step in enumerate(trace.steps):
        assert sb.position == i
        assert len(sb.source.data["row"]) == len(step.scheduled)
        assert sum(sb.source.data["tokens"]) == step.prefill_tokens + step.decode_seqs
        counts = step_counts(step, trace.num_blocks)
        assert counts["prefill tokens"] == str(step.prefill_tokens)
        assert counts["KV pages in use"].startswith(str(step.kv_blocks_used))
        assert counts["pages handed out"] == f"+{step.blocks_allocated}"
        assert f"{i + 1} of {len(trace.steps)}" in sb.counter.object
        seen.append(sb.text)
        sb.step_by(1)
    assert sb.position == len(trace.steps) - 1  # stays on the last step
    assert "joined the batch" in seen[0] and any("left the batch" in t for t in seen)
    sb.step_by(-100)
    assert sb.position == 0
    sb.jump_to_peak()
    peak = max(s.kv_blocks_used for s in trace.steps)
    assert trace.steps[sb.position].kv_blocks_used == peak
    sb.slider.value = 3
    assert sb.position == 3


def test_storyboard_play_stops_at_the_end(trace):
    sb = Storyboard()
    sb.show(trace)
    sb.playing = True
    assert sb._callback is None  # no server, no periodic callback
    for _ in range(len(trace.steps) + 2):
        sb.advance()
    assert not sb.playing and sb.position == len(trace.steps) - 1
    sb.close()
    assert sb._callback is None


# -- the other panels ------------------------------------------------------------------------
def test_research_prompt_carries_the_key_and_the_demo_state(content):
    state = LabState()
    room = ResearchRoom(research=to_plain(content.research),
                        demo_state=lambda: demo_state_text(state))
    room.draft.question = "Why is decode memory-bound here?"
    room.draft.next_action = "Rerun with batch 32"
    assert "concept:llm-systems/llm-serving" in room.prompt
    assert ("model=cpu-8m batch=8 context=128 page=16 output=64 requests=8 rate=0 mix=fixed "
            "kv_mb=32 policy=continuous chunk=512 ttft_slo=500 tpot_slo=50") in room.prompt
    assert "Why is decode memory-bound here?" in room.prompt and "Rerun with batch 32" in room.prompt
    state.batch = 32
    room.kind = "demo state"
    assert room.object_label.startswith("demo:model=cpu-8m,batch=32,context=128")
    assert "Kind of object: demo state" in room.prompt
    assert room.draft.storage_key == "serving-lab:research:concept:llm-systems/llm-serving"
    filled = fill_prompt(content.research, "concept", "x", "", "", "batch=1")
    assert content.research["default_question"] in filled and "{" not in filled


def test_practice_hints_reveal_one_at_a_time(content):
    loop = PracticeLoop(items=to_plain(content.practice))
    hints = content.practice[0]["hints"]
    assert loop.visible_hints() == [] and loop.hint_button.label == "Show hint 1 of 3"
    for n in range(1, 4):
        loop.show_hint()
        assert loop.visible_hints() == list(hints[:n])
    assert loop.hint_button.disabled and "All 3 hints" in loop.hint_button.label
    loop.show_hint()
    assert len(loop.visible_hints()) == 3
    loop.rubric.value = list(content.practice[0]["rubric"][:2])
    assert "2 of 3" in loop.score.object
    loop.answer.value = "KV doubles"
    loop.index = 1
    assert loop.visible_hints() == [] and loop.rubric.value == [] and loop.answer.value == ""
    loop.index = 0
    assert loop.answer.value == "KV doubles"


def test_inquiry_feedback_points_at_the_plot(content):
    inquiry = VisualInquiry(inquiry=to_plain(content.inquiry))
    assert inquiry.feedback.object == ""
    for cue in content.inquiry["cues"]:
        inquiry.buttons.value = cue["id"]
        assert inquiry.cue == cue["id"]
        assert f'href="#{plot_anchor(cue["plot"])}"' in inquiry.feedback.object
        assert cue["feedback"][:40] in inquiry.feedback.object
    inquiry.cue = "prefill-spikes"
    assert 'href="#plot-timeline"' in inquiry.feedback.object


def test_sources_and_claims_show_support_and_limits(content):
    sources = SourceCards(sources=to_plain(content.sources)).__panel__().object
    for s in content.sources:
        assert s["title"] in sources and s["url"] in sources and s["venue"] in sources
    assert "OSDI 2022" in sources and "SOSP 2023" in sources
    assert sources.count("What it does not support") == len(content.sources)
    claims = ClaimReview(claims=to_plain(content.claims),
                         sources=to_plain(content.sources)).__panel__().object
    for c in content.claims:
        assert c["review"]["badge"] in claims and c["scope"] in claims
        assert all(sid in claims for sid in c["source_ids"])
    assert "toy witness" in claims


def test_after_section_has_every_anchor_and_follows_the_demo(content, trace):
    demo = FakeDemo()
    demo.trace = None
    section = after_first_pass(demo, content)
    root = section.get_root(Document())
    closed = len(list(root.references()))
    markup = " ".join(str(p.object) for p in section.select(pn.pane.HTML))
    for pid in AFTER_PANELS:
        assert f'id="{pid}"' in markup  # every anchor is there before any panel is opened
    assert demo.listeners == []  # nothing built, nothing following the demo yet
    for panel in section.panels.values():
        panel.open()
    assert len(list(section.get_root(Document()).references())) > 2 * closed
    section.storyboard = section.panels["storyboard"].views[1]
    summary = summarize(trace)
    for listener in demo.listeners:
        listener(trace, summary)
    assert section.storyboard.trace is trace
    section.storyboard.step_by(2)
    for listener in demo.listeners:  # an SLO redraw keeps the learner's place
        listener(trace, summary)
    assert section.storyboard.position == 2


def test_picking_a_cue_opens_the_plot_tab_its_link_points_into(content):
    from lab.demo_view import PLOT_GROUPS
    from lab.page import build_page
    from lab.runs import Limits
    from tests.fakes import FakeClient
    from tests.labkit import TEST_ENGINE
    page = build_page(FakeClient(TEST_ENGINE), Limits(), query={}, classroom=False)
    tabs = page.demo.plot_tabs
    section = next(o for o in page.main[0] if hasattr(o, "panels"))
    section.panels["inquiry"].open()
    inquiry = section.panels["inquiry"].views[0]
    assert tabs.active == 0
    for cue in content.inquiry["cues"]:
        inquiry.cue = cue["id"]
        label, plot_ids = PLOT_GROUPS[tabs.active]
        assert cue["plot"] in plot_ids, (cue["id"], label)
