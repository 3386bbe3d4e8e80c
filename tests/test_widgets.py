"""Widgets drive without a browser: they build, reset, stream and draw a real tiny run's trace,
and their text equivalents carry the numbers the engine measured."""
from __future__ import annotations

import math
import re
from dataclasses import replace
from html.parser import HTMLParser

import panel as pn
import pytest
from bokeh.document import Document
from bokeh.models import ColumnDataSource
from bokeh.plotting import figure

from engine.analytic import DeviceProbe, RunningBounds, kv_bytes, waste_tokens
from engine.config import PRESETS, SLO, EngineConfig
from engine.llm_engine import LLMEngine
from engine.metrics import summarize
from engine.records import PageSnapshot, RequestRecord, Trace
from engine.workload import Request, WorkloadSpec
from widgets.device_banner import DeviceBanner
from widgets.kv_memory_plot import KVMemoryPlot, reserved_len
from widgets.latency_plot import LatencyPlot
from widgets.notice import Notice
from widgets.page_map import COLS, MAX_CELLS, PageMap, page_grid
from widgets.style import WAITING, RunInfo, fmt_bytes, fmt_num
from widgets.summary_table import CORE_ROWS, DASH, SummaryTable, summary_values
from widgets.timeline_plot import TimelinePlot
from widgets.tpot_batch_plot import TPOTBatchPlot
from widgets.queue_plot import QueuePlot
from widgets.policy_compare import PolicyComparison
from widgets.goodput_rate_plot import GoodputRatePlot

PLOTS = (LatencyPlot, TimelinePlot, KVMemoryPlot, PageMap, TPOTBatchPlot, QueuePlot,
         GoodputRatePlot)
STREAMING = (TimelinePlot, KVMemoryPlot, QueuePlot)


@pytest.fixture(scope="module")
def run():
    """One real run of the tiny model: trace, summary, SLO and run info."""
    eng = LLMEngine(EngineConfig(model="tiny", block_size=16, max_num_seqs=8,
                                 max_num_batched_tokens=256))
    trace = eng.run(WorkloadSpec(num_requests=6, prompt_len=40, output_len=12),
                    on_step=lambda s: None)
    slo = SLO(ttft_ms=50, tpot_ms=5)
    return trace, summarize(trace, slo), slo, RunInfo.from_trace(trace)


def sig_digits(s: str) -> int:
    """Significant digits written in a fixed-notation number (integers count to the units)."""
    return len(s.replace("-", "").replace(".", "").lstrip("0"))


def figures(component) -> list[figure]:
    return [v for v in vars(component).values() if isinstance(v, figure)]


class Rows(HTMLParser):
    """Row header -> cell text of an HTML table."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, str] = {}
        self._tag, self._label = None, None

    def handle_starttag(self, tag, attrs):
        self._tag = tag

    def handle_data(self, data):
        if self._tag == "th":
            self._label = data
        elif self._tag == "td" and self._label is not None:
            self.rows[self._label] = data
            self._label = None


def table_rows(html: str) -> dict[str, str]:
    parser = Rows()
    parser.feed(html)
    return parser.rows


def test_fmt_num_keeps_three_significant_digits():
    assert sig_digits("580") == 3 and sig_digits("0.00393") == 3 and sig_digits("9.53") == 3
    assert fmt_num(0.00393) == "0.00393"
    assert fmt_num(0.000196608) == "0.000197"
    assert fmt_num(571.0034) == "571"
    assert fmt_num(2.0) == "2.00"
    assert fmt_num(0.0) == "0.00"
    assert fmt_num(12) == "12" and fmt_num(123456.7) == "123457"
    assert "e" not in fmt_num(1e-4) and "e" in fmt_num(5e-5)
    assert fmt_bytes(196608) == "0.197 MB" and fmt_bytes(10.74e9) == "10.7 GB"


@pytest.mark.parametrize("cls", PLOTS)
def test_plot_builds_with_text_pane_and_themeable_figures(cls):
    c = cls()
    layout = c.__panel__()
    assert isinstance(layout, pn.Column) and c.text_pane in layout.objects
    assert c.name == c.plot_id and f"{c.plot_id}-text" in c.text_pane.css_classes
    assert c.text == WAITING and c.text_pane.object == WAITING
    for fig in figures(c):
        assert fig.sizing_mode == "stretch_width" and fig.height <= 320
        assert "background_fill_color" not in fig.properties_with_values(include_defaults=False)
        assert any(type(t).__name__ == "HoverTool" for t in fig.tools)
    pn.panel(layout).get_root(Document())  # the Bokeh models build


@pytest.mark.parametrize("cls", PLOTS)
def test_show_then_reset_clears(cls, run):
    trace, summary, slo, _ = run
    c = cls()
    c.show(trace, summary, slo)
    assert c.text != WAITING and c.text_pane.object == c.text
    c.reset()
    assert c.text == WAITING
    for source in (v for v in vars(c).values() if hasattr(v, "stream")):
        assert all(len(col) == 0 for col in source.data.values())


def drawn_state(component) -> list:
    """What a component's figures show, property by property, in a form two builds compare."""
    state = []
    for fig in sorted(figures(component) or component.figs.values(),
                      key=lambda f: f.title.text if f.title else ""):
        ranges = [(r.start, r.end) for r in (fig.x_range, fig.y_range)
                  if type(r).__name__ == "Range1d"]
        spans = [(a.location, a.visible) for a in fig.center if type(a).__name__ == "Span"]
        data = [dict(r.data_source.data) for r in fig.renderers]
        labels = [dict(axis.major_label_overrides) for axis in fig.yaxis]
        state.append((fig.title.text, fig.height, ranges, spans, data, labels))
    return state


def draw_all(component, run_tuple) -> None:
    trace, summary, slo, _ = run_tuple
    if isinstance(component, PolicyComparison):
        component.show("continuous", trace, slo)
        component.show("static", trace, slo)
        return
    component.show(trace, summary, slo)
    if isinstance(component, TPOTBatchPlot):
        component.show_sweep([(1, 2.0), (4, 3.0)], [(1, 0.5, 0.1), (4, 0.8, 0.4)], 4,
                             pending=True, ridge=2.5)
    if isinstance(component, GoodputRatePlot):
        component.show_sweep({0.5: trace, 2.0: trace}, 3, slo)
    if isinstance(component, QueuePlot):
        component.set_bounds(RunningBounds(batch_cap=8, at_full_length=6, on_prompt=12,
                                           num_blocks=64, blocks_full=10.0))


@pytest.mark.parametrize("cls", PLOTS + (PolicyComparison,))
def test_a_plot_drawn_before_it_is_shown_opens_on_what_was_drawn(cls, run):
    """The demo's closed tabs build their figures only when opened; until then every run is
    drawn into the plot's sources and small models alone. Opened late, a plot shows exactly
    what one built from the start shows."""
    early, late = cls(), cls()
    early.parts()
    assert early.built and not late.built
    draw_all(early, run)
    draw_all(late, run)
    assert not late.built  # drawing makes no figure
    late.parts()
    assert late.built and drawn_state(late) == drawn_state(early) != []


@pytest.mark.parametrize("cls", STREAMING)
def test_streaming_in_chunks_matches_show(cls, run, monkeypatch):
    trace, summary, slo, info = run
    streamed, shown, other = cls(), cls(), cls()
    calls = []
    original = ColumnDataSource.stream

    def spy(source, data, *args, **kwargs):
        calls.append(source)
        return original(source, data, *args, **kwargs)

    monkeypatch.setattr(ColumnDataSource, "stream", spy)
    for i in range(0, len(trace.steps), 5):
        streamed.add_steps(trace.steps[i:i + 5], info)
    streamed.add_steps([], info)
    assert calls == [streamed.source] * math.ceil(len(trace.steps) / 5)
    assert len(streamed.source.data["step"]) == len(trace.steps)
    assert other.source.data["step"] == []  # no column lists shared between instances
    shown.show(trace, summary, slo)
    assert streamed.text == shown.text
    for key, column in shown.source.data.items():
        assert [x if x == x else None for x in streamed.source.data[key]] == \
            [x if x == x else None for x in column], key


def test_latency_plot_counts_and_colours_by_slo(run):
    trace, summary, slo, _ = run
    c = LatencyPlot()
    c.show(trace, summary, slo)
    good = round(summary.slo_attainment * len(trace.requests))
    assert f"{good} of {len(trace.requests)} requests met both SLOs" in c.text
    assert f"goodput {fmt_num(summary.goodput_rps)} req/s" in c.text
    assert f"TTFT p50 {fmt_num(summary.ttft_ms.p50)} ms" in c.text
    assert f"TPOT p50 {fmt_num(summary.tpot_ms.p50)} ms" in c.text
    assert c.source.data["status"].count("met both SLOs") == good
    assert c.ttft_span.location == 50 and c.tpot_span.location == 5
    c.parts()  # the figures, built on the range the run set
    assert c.ttft_fig.y_range.end >= max(c.source.data["ttft_ms"] + [50])
    loose = SLO(ttft_ms=1e6, tpot_ms=1e6)
    c.show(trace, summarize(trace, loose), loose)
    assert f"{len(trace.requests)} of {len(trace.requests)} requests met" in c.text
    c.show(trace, summary, SLO())
    assert not c.ttft_span.visible and "no targets set" in c.text


def test_latency_plot_leaves_one_token_requests_out_of_tpot():
    """A one-token reply has no TPOT: no mark at 0 ms, but it still meets the TPOT target."""
    def req(i, times):
        return RequestRecord(id=i, prompt_ids=[1], max_tokens=len(times), arrival_s=0.0,
                             scheduled_s=0.0, first_token_s=times[0], token_times_s=times,
                             output_ids=[0] * len(times), finish_s=times[-1])

    trace = Trace(device="CPU: test", model="tiny", config={}, block_size=16, num_blocks=4,
                  block_bytes=1024, kv_bytes_capacity=4096, duration_s=1.0, steps=[],
                  requests=[req(0, [0.1, 0.2, 0.3]), req(1, [0.1])])
    slo = SLO(tpot_ms=150)
    c = LatencyPlot()
    c.show(trace, summarize(trace, slo), slo)
    assert c.source.data["tpot_ms"][0] == pytest.approx(100)
    assert math.isnan(c.source.data["tpot_ms"][1])
    assert c.source.data["status"] == ["met both SLOs", "met both SLOs"]
    assert "TPOT p50 100 ms" in c.text and "1 request(s) generated a single token" in c.text
    only_one = replace(trace, requests=[trace.requests[1]])  # no request has a TPOT at all
    rows = summary_values(summarize(only_one, slo))
    assert rows["TPOT p50 (ms)"] == rows["TPOT p90 (ms)"] == DASH  # not a measured 0


def test_timeline_text_names_largest_step(run):
    trace, summary, slo, _ = run
    c = TimelinePlot()
    c.show(trace, summary, slo)
    big = max(trace.steps, key=lambda s: s.duration_s)
    assert f"{len(trace.steps)} engine steps" in c.text
    assert f"#{big.index} took {fmt_num(big.duration_s * 1e3)} ms with {big.prefill_tokens}" \
        in c.text
    assert "Median decode-only step" in c.text


def test_kv_memory_measured_and_formula(run):
    trace, summary, slo, info = run
    c = KVMemoryPlot()
    c.show(trace, summary, slo)
    peak = max(trace.steps, key=lambda s: s.kv_bytes_used)
    ref = kv_bytes(T=peak.tokens_stored, layers=80, h_kv=8, d_head=128)
    assert fmt_bytes(peak.kv_bytes_used) in c.text and fmt_bytes(ref) in c.text
    assert fmt_bytes(trace.kv_bytes_capacity) in c.text
    assert "Measured (this model" in c.text and "reference 80-layer model" in c.text
    i = c.source.data["step"].index(peak.index)
    assert c.source.data["reference"][i] == pytest.approx(ref)
    assert c.source.data["stored"][i] == pytest.approx(peak.tokens_stored * info.bytes_per_token)


def test_kv_memory_formula_names_B_and_T_and_the_contiguous_reservation(run):
    """T in the math is tokens per sequence, with B sequences: the legend and text use both, and
    the contiguous baseline says what it reserves (the model's maximum length)."""
    trace, summary, slo, info = run
    c = KVMemoryPlot()
    c.show(trace, summary, slo)
    c.parts()
    legend = [item.label.value for item in c.reference_fig.legend[0].items]
    assert any("2·B·L·T·H_kv·d_head·s" in label for label in legend), legend
    peak = max(trace.steps, key=lambda s: s.kv_bytes_used)
    i = c.source.data["step"].index(peak.index)
    assert c.source.data["seqs"][i] == peak.running
    assert c.source.data["T"][i] * peak.running == pytest.approx(peak.tokens_stored)
    assert f"B = {peak.running} sequences" in c.text
    max_len = PRESETS["tiny"].max_position_embeddings  # no max_model_len set: the model's limit
    assert f"the model's maximum length, {max_len} tokens" in c.text
    assert reserved_len(c.source.data, info) == max_len


def test_page_map_waste_agrees_with_formula(run):
    trace, summary, slo, _ = run
    snap = trace.peak_snapshot
    c = PageMap()
    c.show(trace, summary, slo)
    formula = sum(waste_tokens(t, snap.block_size) for t in snap.tokens.values())
    assert c.waste_measured == c.waste_formula == formula
    assert f"Measured waste: {formula} tokens" in c.text and "they agree" in c.text
    used = sum(len(b) for b in snap.tables.values())
    cells = c.cells.data
    assert len(cells["block"]) % COLS == 0
    assert len(cells["block"]) - cells["owner"].count("free") == used
    assert len(c.waste.data["block"]) == sum(snap.waste(r) > 0 for r in snap.tables)
    rows = table_rows(c.table.object)
    assert rows[f"all {len(snap.tables)}"] == str(sum(snap.tokens.values()))


def test_page_map_and_summary_report_one_waste():
    """The page map draws the first step of peak KV use; the summary's waste row is that step's
    waste, even when another step left more slots empty (here request 1's 17th token, step 8)."""
    eng = LLMEngine(EngineConfig(model="tiny", block_size=16, max_num_seqs=8,
                                 max_num_batched_tokens=256))
    trace = eng.run([Request(0, list(range(63)), 3, 0.0), Request(1, list(range(9)), 12, 0.0)])
    summary = summarize(trace)
    assert max(s.waste_tokens for s in trace.steps) > summary.waste_tokens_peak  # steps differ
    c = PageMap()
    c.show(trace, summary, SLO())
    assert c.waste_measured == summary.waste_tokens_peak == 8
    rows = summary_values(summary)
    assert rows["Waste tokens (measured)"] == str(c.waste_measured)
    assert f"Measured waste: {c.waste_measured} tokens** at this step of peak KV use" in c.text


def test_page_grid_caps_cells_and_sizes_overlays():
    snap = PageSnapshot(step_index=0, block_size=16, num_blocks=5000,
                        tables={0: [3, 4], 7: [2000]}, tokens={0: 20, 7: 16})
    cells, waste, shown = page_grid(snap)
    assert shown == MAX_CELLS and len(cells["block"]) == MAX_CELLS
    assert waste["block"] == [4] and waste["width"][0] == pytest.approx(0.92 * 12 / 16)
    assert cells["slots"][3] == "16/16" and cells["slots"][4] == "4/16"


def test_tpot_batch_sweep_and_current_point(run):
    trace, summary, slo, _ = run
    c = TPOTBatchPlot()
    floors = [(1, 0.5, 0.1), (2, 0.6, 0.2), (4, 0.7, 0.8)]  # compute overtakes memory at 4
    c.show_sweep([(2, 2.5), (1, 2.0)], floors, 2, pending=True, ridge=3.4)
    assert c.measured.data["batch"] == [1, 2] and len(c.floor.data["batch"]) == 3
    assert c.floor.data["floor_ms"] == [0.5, 0.6, 0.8]  # the higher of the two floors
    assert c.current.data == {"batch": [2], "tpot_ms": [2.5]}
    assert "still running" in c.title.text and "batch 1: 2.00 ms (floor 0.500 ms" in c.text
    assert c.ridge_span.visible and c.ridge_span.location == 3.4 and "cross" in c.text
    c.show_sweep([(1, 2.0), (2, 2.5), (4, 3.0)], floors, 2, False)
    assert "still" not in c.text and "batch 4: 3.00 ms (floor 0.800 ms" in c.text
    assert not c.ridge_span.visible
    c.show(trace, summary, slo)  # the highlight is the sweep's own point: the same workload
    assert c.current.data["tpot_ms"] == [2.5]
    assert "Current batch 2: TPOT 2.50 ms" in c.text


def test_summary_table_rows(run):
    trace, summary, slo, _ = run
    c = SummaryTable()
    assert isinstance(c.__panel__(), pn.pane.HTML) and "summary-table" in c.html.css_classes
    before = table_rows(c.html.object)
    assert list(before) == list(CORE_ROWS) and set(before.values()) == {DASH}
    c.show(trace, summary, slo)
    rows = table_rows(c.html.object)
    assert rows == summary_values(summary) and set(CORE_ROWS) <= set(rows)
    assert rows["TTFT p50 (ms)"] == fmt_num(summary.ttft_ms.p50)
    assert float(rows["KV GB (measured)"]) == pytest.approx(summary.kv_bytes_peak / 1e9, rel=5e-3)
    assert rows["Waste tokens (measured)"] == str(summary.waste_tokens_peak)
    for label in ("TTFT p50 (ms)", "TPOT p50 (ms)", "KV GB (measured)"):
        assert sig_digits(rows[label]) >= 3 and "e" not in rows[label]
    c.reset()
    assert c.stale and "updating" in c.html.object and table_rows(c.html.object) == rows


def test_device_banner_and_notice():
    b = DeviceBanner()
    b.update("CPU: 2 threads", "tiny", DeviceProbe("CPU: 2 threads", 12.345, 0.1234))
    assert re.search(r"Measured on CPU: 2 threads.*tiny.*12\.3 GB/s.*0\.123 TFLOP/s", b.text)
    assert b.pane.object == b.text
    n = Notice()
    assert not n.alert.visible
    n.show("KV budget too small <b>", "danger")
    assert n.alert.visible and n.alert.alert_type == "danger" and "<b>" not in n.alert.object
    n.clear()
    assert not n.alert.visible
    with pytest.raises(ValueError):
        n.show("x", "loud")


def test_redraws_change_ticks_in_place_instead_of_new_tickers(run):
    """A new Bokeh model per redraw costs every open page a model swap; the tickers stay put."""
    trace, summary, slo, _ = run
    tpot = TPOTBatchPlot()
    tpot.parts()
    ticker = tpot.fig.xaxis[0].ticker
    tpot.show_sweep([(1, 2.0)], [(1, 0.5, 0.1), (2, 0.6, 0.2)], 1, pending=True)
    tpot.show_sweep([(1, 2.0), (4, 3.0)], [(1, 0.5, 0.1), (2, 0.6, 0.2), (4, 0.8, 0.4)], 1,
                    pending=False)
    assert tpot.fig.xaxis[0].ticker is ticker and list(ticker.ticks) == [1, 2, 4]
    pages = PageMap()
    pages.parts()
    row_ticker = pages.fig.yaxis[0].ticker
    pages.show(trace, summary, slo)
    rows = list(row_ticker.ticks)
    pages.show(trace, summary, slo)
    assert pages.fig.yaxis[0].ticker is row_ticker and list(row_ticker.ticks) == rows
    assert rows and rows[0] == 0.5


def test_policy_comparison_table_and_idle_slots(run):
    trace, summary, slo, _ = run
    c = PolicyComparison()
    pn.panel(c.__panel__()).get_root(Document())
    c.show("continuous", trace, slo, pending="static")
    assert "measuring…" in c.table.object and "Measuring the other policy" in c.text
    c.show("static", trace, slo)
    cells = c.table.object
    for row in ("Goodput (req/s)", "TTFT p90 (ms)", "TPOT p90 (ms)", "Throughput (tok/s)",
                "Duration (s)"):
        assert row in cells
    assert ">Static<" in cells and ">Continuous<" in cells and "measuring" not in cells
    cap = trace.config["max_num_seqs"]
    occ = c.sources["static"].data
    assert all(r + i == cap or r > cap for r, i in zip(occ["running"], occ["idle"]))
    assert "Idle batch slots" in c.text
    c.rejudge(SLO(ttft_ms=1e-3, tpot_ms=1e-3))  # nobody meets these: goodput drops to zero
    assert c.value("Goodput (req/s)", "static") == 0.0
    c.reset()
    assert c.values == {} and c.sources["static"].data["t"] == []
