"""The page's reading sections, built from `content/`: header, concept structure, learning map,
01 Intuition, 02 Math and 03 Code. The code section shows the engine's real source and re-runs it
on the current slider values.
"""
from __future__ import annotations

import html
import inspect
import re
from pathlib import Path

import panel as pn

from engine import analytic
from lab.content import Content
from lab.state import LabState

# The analytic functions the code section shows, read from their source so they cannot drift.
SHOWN_FUNCTIONS = (analytic.kv_bytes, analytic.kv_gb, analytic.waste_tokens,
                   analytic.decode_tpot_floor_s)
# The reference model of the math section: 80 layers, 8 KV heads, d_head 128, fp16.
REFERENCE = {"layers": 80, "h_kv": 8, "d_head": 128, "bytes_per_elem": 2}
CSS = Path(__file__).with_name("lab.css").read_text()


GREEK = {r"\tau": "τ", r"\beta": "β", r"\lambda": "λ", r"\cdot": "·"}


def symbol_html(latex: str) -> str:
    """A table-cell rendering of a one-symbol LaTeX snippet (KaTeX panes are too heavy per cell):
    roman text unwrapped, Greek letters as characters, subscripts as <sub>."""
    text = html.escape(latex)
    for macro, char in GREEK.items():
        text = text.replace(macro, char)
    text = re.sub(r"\\(?:mathrm|text|operatorname)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"_\{([^{}]*)\}", r"<sub>\1</sub>", text)
    text = re.sub(r"_(\w)", r"<sub>\1</sub>", text)
    return f'<span class="symbol">{text}</span>'


def html_pane(markup: str, **kwargs) -> pn.pane.HTML:
    """An HTML block styled by lab.css (each Panel pane lives in its own shadow root)."""
    return pn.pane.HTML(markup, sizing_mode="stretch_width", stylesheets=[CSS], **kwargs)


def section_heading(content: Content, section_id: str) -> pn.pane.HTML:
    s = content.section(section_id)
    number = f"<span class=\"section-number\">{html.escape(s['number'])}</span> " if s["number"] else ""
    return html_pane(
        f'<h2 id="{section_id}" class="section-heading">{number}{html.escape(s["heading"])}</h2>'
        f'<p class="section-subtitle">{html.escape(s["subtitle"])}</p>',
        css_classes=["section-head"])


def header(content: Content, links: dict[str, str], theme: str) -> pn.pane.HTML:
    """Breadcrumb, title, summary, neighbours and the light/dark switch."""
    page = content.page
    prereq = links.get("prerequisite") or page["prerequisite"]["href"]
    nxt = links.get("next") or page["next"]["href"]
    other = "light" if theme == "dark" else "dark"
    return html_pane(f"""
<header class="lab-header">
  <nav class="breadcrumb" aria-label="breadcrumb">{html.escape(page["breadcrumb"])}</nav>
  <h1 class="lab-title">{html.escape(page["title"])}</h1>
  <p class="lab-summary">{html.escape(page["summary"])}</p>
  <p class="lab-neighbours">
    <span>Before this: <a class="prereq-link" href="{html.escape(prereq)}">{html.escape(page["prerequisite"]["title"])}</a></span>
    <span>Next: <a class="next-link" href="{html.escape(nxt)}">{html.escape(page["next"]["title"])}</a></span>
    <a class="theme-link" href="?theme={other}">{other.capitalize()} theme</a>
  </p>
</header>""")


def structure(content: Content) -> pn.pane.HTML:
    """The concept's four moves and the learning-map bridge."""
    s, lm = content.page["structure"], content.page["learning_map"]
    moves = "".join(f'<li class="move"><strong>{html.escape(m["label"])}</strong>'
                    f'<span>{html.escape(m["description"])}</span></li>' for m in s["moves"])
    return html_pane(f"""
<section class="structure">
  <h3>{html.escape(s.get("heading", "Concept structure"))}</h3>
  <ol class="moves">{moves}</ol>
  <h3>{html.escape(lm.get("heading", "Learning map"))}</h3>
  <p class="bridge">{html.escape(lm["bridge"])}</p>
</section>""")


def intuition(content: Content) -> pn.Column:
    return pn.Column(section_heading(content, "intuition"),
                     pn.pane.Markdown(content.intuition, sizing_mode="stretch_width"),
                     sizing_mode="stretch_width", css_classes=["lab-section"])


def math_section(content: Content) -> pn.Column:
    blocks = [section_heading(content, "math")]
    for f in content.math:
        rows = "".join(f"<tr><td>{symbol_html(s['symbol'])}</td><td>{html.escape(s['meaning'])}"
                       f"</td><td><code>{html.escape(s['code_name'])}</code></td></tr>"
                       for s in f["symbols"])
        blocks += [
            pn.pane.Markdown(f"### {f['title']}", sizing_mode="stretch_width"),
            pn.pane.LaTeX(f"$${f['latex']}$$", renderer="katex", sizing_mode="stretch_width",
                          css_classes=["formula"], styles={"font-size": "1.25em"}),
            pn.pane.Markdown(f["explanation"], sizing_mode="stretch_width"),
            html_pane('<table class="symbols"><thead><tr><th>symbol</th><th>meaning</th>'
                      f"<th>in the code</th></tr></thead><tbody>{rows}</tbody></table>"),
        ]
    return pn.Column(*blocks, sizing_mode="stretch_width", css_classes=["lab-section"])


def code_outputs(state: LabState) -> str:
    """Run the shown functions on the current sliders; returns markdown with each call and result."""
    T = state.context + state.output
    P = state.page
    B = state.batch
    ref = REFERENCE
    kv = analytic.kv_gb(T, ref["layers"], ref["h_kv"], ref["d_head"], batch=B,
                        bytes_per_elem=ref["bytes_per_elem"])
    waste = analytic.waste_tokens(T, P)
    weights = 70e9 * 2  # a 70B-parameter model in fp16
    bandwidth = 3.35e12  # an H100 SXM's HBM3, in bytes/s
    floor = analytic.decode_tpot_floor_s(int(weights), analytic.kv_bytes(
        T, ref["layers"], ref["h_kv"], ref["d_head"], batch=B), bandwidth)
    lines = [
        f"kv_gb(T={T}, layers=80, h_kv=8, d_head=128, batch={B}, bytes_per_elem=2)  # -> {kv:.2f} GB",
        f"waste_tokens(T={T}, P={P})  # -> {waste} empty slots per sequence, {waste * B} in the batch",
        f"decode_tpot_floor_s(weight_bytes=140e9, kv_bytes_read=kv_bytes(...), bandwidth_bytes_s=3.35e12)"
        f"  # -> {floor * 1e3:.1f} ms per token",
    ]
    return ("With T = context + output = "
            f"{T} tokens, P = {P} and B = {B} from the sliders (the 70B-class reference model of "
            "the math section; the bandwidth is an H100's datasheet figure, not a measurement):\n\n"
            "```python\n" + "\n".join(lines) + "\n```")


def code_section(content: Content, state: LabState) -> pn.Column:
    source = "\n\n".join(inspect.getsource(fn) for fn in SHOWN_FUNCTIONS)
    live = pn.pane.Markdown(pn.bind(lambda *_: code_outputs(state), state.param.batch,
                                    state.param.context, state.param.page, state.param.output),
                            sizing_mode="stretch_width", css_classes=["code-output"])
    return pn.Column(
        section_heading(content, "code"),
        pn.pane.Markdown(content.code, sizing_mode="stretch_width"),
        pn.pane.Markdown(f"From `engine/analytic.py`:\n\n```python\n{source}```",
                         sizing_mode="stretch_width", css_classes=["code-source"]),
        live, sizing_mode="stretch_width", css_classes=["lab-section"])
