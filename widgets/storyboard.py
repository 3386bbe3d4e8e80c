"""The mechanism storyboard: a step-by-step replay of the last engine trace.

For the current step it draws the batch (one bar per request, coloured prefill or decode, as long as
the tokens that request fed the model), the step's counts (prefill tokens, decodes, running,
waiting, KV pages used, handed out and given back) and its events (requests that joined, finished
and left, or were evicted), with a text equivalent. Play runs at most one periodic callback per
storyboard; pause, a new trace and `close()` stop it.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import panel as pn
import param
from bokeh.models import ColumnDataSource, FactorRange, Range1d
from bokeh.transform import factor_cmap

from engine.records import StepRecord, Trace
from widgets.base import served
from widgets.style import (DECODE, PREFILL, WAITING, add_hover, empty, fmt_ms, make_figure)

KINDS = ["prefill chunk", "decode"]
COLUMNS = ("row", "tokens", "kind", "context_len", "label")
EVENT_TEXT = {
    "joined": "request {r} joined the batch",
    "rejoined": "request {r} came back after its eviction: it recomputes the {n} tokens it had "
                "cached (prompt and output so far) as prefill",
    "finished": "request {r} finished and left the batch",
    "preempted": "request {r} was evicted to free KV pages: its cache is dropped, and {n} tokens "
                 "will have to be computed again",
}
CSS = """
.sb-counts {display: grid; grid-template-columns: repeat(auto-fill, minmax(130px, 1fr));
  gap: 6px; margin: 4px 0 8px; padding: 0;}
.sb-counts li {list-style: none; border: 1px solid color-mix(in srgb, currentColor 22%, transparent);
  border-radius: 6px; padding: 4px 8px;}
.sb-counts b {display: block; font-size: 1.15rem; font-variant-numeric: tabular-nums;}
.sb-counts span {font-size: .8rem; opacity: .8;}
.sb-events {margin: 2px 0 6px 1.1em; padding: 0;}
.sb-events li.joined, .sb-events li.rejoined {color: #009E73;}
.sb-events li.preempted {color: #D55E00;}
.sb-counter {font-weight: 600; font-variant-numeric: tabular-nums;}
"""
PERIOD_MS = 700  # one step per 0.7 s: slow enough to read the event list


@dataclass(frozen=True)
class Event:
    """Something that happened to one request at one step."""

    kind: str  # joined, rejoined, finished or preempted
    request_id: int
    tokens: int = 0  # evicted: cached tokens dropped; rejoined: tokens it must compute again

    def text(self) -> str:
        return EVENT_TEXT[self.kind].format(r=self.request_id, n=self.tokens)


def step_events(trace: Trace) -> list[list[Event]]:
    """Per step, in order: requests seen for the first time (joined), back after an eviction
    (rejoined), finished this step, or evicted this step."""
    seen: set[int] = set()
    evicted: dict[int, int] = {}  # request id -> cached tokens it lost
    cached: dict[int, int] = {}  # request id -> tokens in its KV pages after its last step
    out: list[list[Event]] = []
    for step in trace.steps:
        events = []
        for item in step.scheduled:
            rid = item.request_id
            if rid not in seen:
                seen.add(rid)
                events.append(Event("joined", rid))
            elif rid in evicted:
                events.append(Event("rejoined", rid, evicted.pop(rid)))
        events += [Event("finished", r) for r in step.finished]
        for rid in step.preempted:
            # evicted before its token of this step was cached: it loses what it held, plus the
            # token sampled at its last step, which the recompute must also cover
            lost = cached.pop(rid, 0) + 1
            events.append(Event("preempted", rid, lost))
            evicted[rid] = lost
        for item in step.scheduled:
            if item.request_id not in step.preempted:
                cached[item.request_id] = item.context_len
        out.append(events)
    return out


def step_counts(step: StepRecord, num_blocks: int) -> dict[str, str]:
    """The step's numbers, label -> value, as the counts grid shows them."""
    return {"prefill tokens": str(step.prefill_tokens), "decode sequences": str(step.decode_seqs),
            "running after": str(step.running), "waiting after": str(step.waiting),
            "KV pages in use": f"{step.kv_blocks_used} of {num_blocks}",
            "pages handed out": f"+{step.blocks_allocated}",
            "pages given back": f"−{step.blocks_freed}" if step.blocks_freed else "0", "step time": fmt_ms(step.duration_s * 1e3)}


def describe_step(step: StepRecord, position: int, total: int, events: list[Event],
                  num_blocks: int) -> str:
    """A plain-language equivalent of one step's picture."""
    items = "; ".join(
        f"request {i.request_id} " + (f"prefilling {i.num_tokens} prompt tokens" if i.is_prefill
                                      else "decoding 1 token") + f" ({i.context_len} in cache)"
        for i in sorted(step.scheduled, key=lambda i: i.request_id)) or "no request"
    happened = "; ".join(e.text() for e in events) or "nobody joined or left"
    return (f"Engine step {step.index} ({position + 1} of {total}), "
            f"{fmt_ms(step.duration_s * 1e3)}. In the batch: {items}. "
            f"{step.prefill_tokens} prompt tokens and {step.decode_seqs} decodes; afterwards "
            f"{step.running} running and {step.waiting} waiting. KV pages: {step.kv_blocks_used} "
            f"of {num_blocks} in use, {step.blocks_allocated} handed out and {step.blocks_freed} "
            f"given back. Events: {happened}.")


class Storyboard(pn.viewable.Viewer):
    """Replay a trace one engine step at a time: play, pause, step and scrub."""

    position = param.Integer(default=0, bounds=(0, None), doc="Index into the trace's steps.")
    playing = param.Boolean(default=False, doc="Advance one step per period while True.")
    text = param.String(default=WAITING, doc="The current step in words.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.trace: Trace | None = None
        self.events: list[list[Event]] = []
        self._callback = None  # the one periodic callback, only while playing
        self.source = ColumnDataSource(data=empty(COLUMNS))
        self.fig = make_figure("Requests in this step", "tokens fed to the model", "",
                               y_range=FactorRange(), x_range=Range1d(0, 1))
        bars = self.fig.hbar(y="row", right="tokens", height=0.7, source=self.source,
                             legend_field="kind", color=factor_cmap("kind", [PREFILL, DECODE], KINDS))
        self.fig.text(x="tokens", y="row", text="label", source=self.source, x_offset=4,
                      text_baseline="middle", text_font_size="11px", text_color="grey")
        add_hover(self.fig, [bars], [("request", "@row"), ("kind", "@kind"),
                                     ("tokens fed", "@tokens"), ("in cache after", "@context_len")])
        self.fig.legend.location = "bottom_right"
        self.fig.ygrid.grid_line_alpha = 0
        self.counter = pn.pane.HTML(f'<span class="sb-counter">{WAITING}</span>',
                                    stylesheets=[CSS], css_classes=["storyboard-counter"])
        self.play_button = pn.widgets.Toggle.from_param(self.param.playing, label="▶ Play",
                                                        color="primary", width=100)
        self.back_button = pn.widgets.Button(label="◀ Step back", width=120,
                                             css_classes=["storyboard-back"])
        self.forward_button = pn.widgets.Button(label="Step forward ▶", width=130,
                                                css_classes=["storyboard-forward"])
        self.peak_button = pn.widgets.Button(label="Jump to peak memory", width=170)
        self.eviction_button = pn.widgets.Button(label="Next eviction", width=130,
                                                 css_classes=["storyboard-eviction"])
        self.slider = pn.widgets.IntSlider(label="Engine step", start=0, end=1, value=0,
                                           disabled=True, sizing_mode="stretch_width")
        self.back_button.on_click(lambda _e: self.step_by(-1))
        self.forward_button.on_click(lambda _e: self.step_by(1))
        self.peak_button.on_click(lambda _e: self.jump_to_peak())
        self.eviction_button.on_click(lambda _e: self.jump_to_eviction())
        self.slider.param.watch(lambda e: setattr(self, "position", e.new), "value")
        self.counts = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width")
        self.event_list = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width",
                                       css_classes=["storyboard-events"])
        self.text_pane = pn.pane.Markdown(self.text, sizing_mode="stretch_width",
                                          css_classes=["plot-text", "storyboard-text"])
        self._set_enabled(False)
        self._layout = pn.Column(
            pn.Row(self.play_button, self.back_button, self.forward_button, self.peak_button,
                   self.eviction_button, self.counter, sizing_mode="stretch_width", css_classes=["storyboard-controls"]),
            self.slider, self.fig, self.counts, self.event_list, self.text_pane,
            sizing_mode="stretch_width", css_classes=["storyboard"], name="storyboard")

    def __panel__(self) -> pn.Column:
        return self._layout

    def show(self, trace: Trace) -> None:
        """Load a new trace and go to its first step."""
        self.playing = False
        self.trace = trace
        self.events = step_events(trace)
        rows = max((len(s.scheduled) for s in trace.steps), default=1)
        widest = max((i.num_tokens for s in trace.steps for i in s.scheduled), default=1)
        self.fig.height = min(700, 70 + 22 * rows)
        self.fig.x_range.update(start=0, end=widest * 1.45)
        last = max(len(trace.steps) - 1, 0)
        self._set_enabled(bool(trace.steps))
        self.slider.param.update(end=max(last, 1), value=0, disabled=last == 0)
        self.position = 0
        self._draw()

    def step_by(self, delta: int) -> None:
        """Move `delta` steps, staying inside the trace."""
        if self.trace is not None and self.trace.steps:
            self.position = min(max(self.position + delta, 0), len(self.trace.steps) - 1)

    def jump_to_peak(self) -> None:
        """Go to the step where the KV cache held the most pages."""
        if self.trace is not None and self.trace.steps:
            steps = self.trace.steps
            self.position = max(range(len(steps)), key=lambda i: steps[i].kv_blocks_used)

    def jump_to_eviction(self) -> None:
        """Go to the next step that evicted a sequence (from the start again after the last)."""
        if self.trace is None:
            return
        evicting = [i for i, s in enumerate(self.trace.steps) if s.preempted]
        later = [i for i in evicting if i > self.position]
        if evicting:
            self.position = (later or evicting)[0]

    def advance(self) -> None:
        """One tick of play: the next step, or stop at the end."""
        if self.trace is None or self.position >= len(self.trace.steps) - 1:
            self.playing = False
        else:
            self.position += 1

    def close(self) -> None:
        """Stop the periodic callback (the session ended)."""
        self.playing = False
        self._stop()

    @param.depends("position", watch=True)
    def _draw(self) -> None:
        if self.trace is None or not self.trace.steps:
            return
        pos = min(self.position, len(self.trace.steps) - 1)
        step = self.trace.steps[pos]
        items = sorted(step.scheduled, key=lambda i: i.request_id)
        rows = [f"req {i.request_id}" for i in items]
        self.fig.y_range.factors = rows[::-1]  # lowest id on top
        self.source.data = {
            "row": rows, "tokens": [i.num_tokens for i in items],
            "kind": [KINDS[0] if i.is_prefill else KINDS[1] for i in items],
            "context_len": [i.context_len for i in items],
            "label": [f"{i.num_tokens} prompt" if i.is_prefill else "1 decode" for i in items]}
        self.slider.value = pos
        total = len(self.trace.steps)
        self.counter.object = (f'<span class="sb-counter">Engine step {step.index} · '
                               f"{pos + 1} of {total}</span>")
        self.counts.object = '<ul class="sb-counts">' + "".join(
            f"<li><b>{html.escape(v)}</b><span>{html.escape(k)}</span></li>"
            for k, v in step_counts(step, self.trace.num_blocks).items()) + "</ul>"
        events = self.events[pos]
        self.event_list.object = ('<ul class="sb-events">' + "".join(
            f'<li class="{e.kind}">{html.escape(e.text())}</li>' for e in events) + "</ul>"
            if events else '<ul class="sb-events"><li>nobody joined or left</li></ul>')
        self.text = describe_step(step, pos, total, events, self.trace.num_blocks)
        self.text_pane.object = self.text

    @param.depends("playing", watch=True)
    def _on_playing(self) -> None:
        self.play_button.label = "⏸ Pause" if self.playing else "▶ Play"
        if not self.playing:
            self._stop()
            return
        if self.trace is None or not self.trace.steps:
            self.playing = False
            return
        if self.position >= len(self.trace.steps) - 1:
            self.position = 0  # play from the start again
        if self._callback is None and served():
            self._callback = pn.state.add_periodic_callback(self.advance, period=PERIOD_MS)

    def _stop(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None

    def _set_enabled(self, on: bool) -> None:
        for w in (self.play_button, self.back_button, self.forward_button, self.peak_button):
            w.disabled = not on
        self.eviction_button.disabled = not (on and any(s.preempted for s in self.trace.steps))
