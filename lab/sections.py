"""The page's reading sections, built from `content/`: header, concept structure, learning map,
01 Intuition, 02 Math and 03 Code. The code section shows the engine's real source (the analytic
formulas, re-run on the current slider values, and the metrics that summarise every measured run).
"""
from __future__ import annotations

import html
import inspect
import re
from pathlib import Path

import panel as pn

from engine import analytic, metrics
from engine.config import ModelConfig
from lab.content import Content
from lab.state import LabState

# The functions the code section shows, per source file, read with inspect so they cannot drift.
# Every name in a math table's "in the code" column appears in this source (a test checks it).
SHOWN_FUNCTIONS = {
    "engine/analytic.py": (analytic.kv_bytes, analytic.kv_gb, analytic.waste_tokens,
                           analytic.decode_tpot_floor_s, analytic.prefill_ttft_floor_s,
                           analytic.layer_params, analytic.head_params),
    "engine/metrics.py": (metrics.ttft_s, metrics.e2e_s, metrics.tpot_s, metrics.meets,
                          metrics.goodput),
}
# The reference model of the math section: 80 layers, 8 KV heads, d_head 128, fp16.
REFERENCE = {"layers": 80, "h_kv": 8, "d_head": 128, "bytes_per_elem": 2}
# The same 70B-class shape as a whole model (Llama 2 70B's sizes), for the weight and FLOP floors.
REFERENCE_MODEL = ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64,
                              num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
H100_BANDWIDTH = 3.35e12  # bytes/s, an H100 SXM's HBM3 (datasheet)
H100_FLOPS = 989e12  # dense bf16 FLOP/s of an H100 SXM (datasheet)


def shown_source() -> dict[str, str]:
    """The source text the code section shows, per file."""
    return {path: "\n\n".join(inspect.getsource(fn) for fn in fns)
            for path, fns in SHOWN_FUNCTIONS.items()}
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


def symbols_table(formula: dict) -> str:
    """A formula's symbols, their meanings and their names in the code, as an HTML table."""
    rows = "".join(f"<tr><td>{symbol_html(s['symbol'])}</td><td>{html.escape(s['meaning'])}"
                   f"</td><td><code>{html.escape(s['code_name'])}</code></td></tr>"
                   for s in formula["symbols"])
    return ('<table class="symbols"><thead><tr><th>symbol</th><th>meaning</th>'
            f"<th>in the code</th></tr></thead><tbody>{rows}</tbody></table>")


def math_section(content: Content) -> pn.Column:
    """Each formula between two blocks of text: the text between two formulas (one's explanation
    and symbols, the next one's title) is one pane, so a page carries 13 panes here, not 24."""
    blocks = [section_heading(content, "math")]
    text = ""  # what comes before the next formula: the last one's explanation and table
    for f in content.math:
        blocks += [
            pn.pane.Markdown(f"{text}### {f['title']}", sizing_mode="stretch_width",
                             stylesheets=[CSS]),
            pn.pane.LaTeX(f"$${f['latex']}$$", renderer="katex", sizing_mode="stretch_width",
                          css_classes=["formula"], styles={"font-size": "1.25em"}),
        ]
        text = f"{f['explanation']}\n\n{symbols_table(f)}\n\n"
    blocks.append(pn.pane.Markdown(text, sizing_mode="stretch_width", stylesheets=[CSS]))
    return pn.Column(*blocks, sizing_mode="stretch_width", css_classes=["lab-section"])


def code_outputs(state: LabState) -> str:
    """Run the analytic functions on the current sliders; returns markdown with each call and result."""
    T = state.context + state.output
    P = state.page
    B = state.batch
    ref = REFERENCE
    kv = analytic.kv_gb(T, ref["layers"], ref["h_kv"], ref["d_head"], batch=B,
                        bytes_per_elem=ref["bytes_per_elem"])
    waste = analytic.waste_tokens(T, P)
    # A decode step reads every matrix it multiplies by; of the embedding table only B rows.
    weights = (analytic.layer_params(REFERENCE_MODEL)
               + analytic.head_params(REFERENCE_MODEL)) * ref["bytes_per_elem"]
    decode = analytic.decode_tpot_floor_s(weights, analytic.kv_bytes(
        T, ref["layers"], ref["h_kv"], ref["d_head"], batch=B), H100_BANDWIDTH)
    prefill = analytic.prefill_ttft_floor_s(
        analytic.layer_params(REFERENCE_MODEL), state.context, H100_FLOPS,
        head_params=analytic.head_params(REFERENCE_MODEL))
    lines = [
        f"kv_gb(T={T}, layers=80, h_kv=8, d_head=128, batch={B}, bytes_per_elem=2)  # -> {kv:.2f} GB",
        f"waste_tokens(T={T}, P={P})  # -> {waste} empty slots per sequence, {waste * B} in the batch",
        f"decode_tpot_floor_s(weight_bytes={weights / 1e9:.0f}e9, kv_bytes_read=kv_bytes(...), "
        f"bandwidth_bytes_s=3.35e12)  # -> {decode * 1e3:.1f} ms per token",
        f"prefill_ttft_floor_s(layer_params(model), tokens={state.context}, flops_per_s=989e12, "
        f"head_params=head_params(model))  # -> {prefill * 1e3:.2f} ms",
    ]
    return ("With T = context + output = "
            f"{T} tokens, P = {P} and B = {B} from the sliders (the 70B-class reference model of "
            "the math section, Llama 2 70B's shape in fp16; the bandwidth and FLOP rate are an "
            "H100's datasheet figures, not measurements):\n\n"
            "```python\n" + "\n".join(lines) + "\n```")


def code_section(content: Content, state: LabState) -> pn.Column:
    sources = [pn.pane.Markdown(f"From `{path}`:\n\n```python\n{source}```",
                                sizing_mode="stretch_width", css_classes=["code-source"])
               for path, source in shown_source().items()]
    live = pn.pane.Markdown(pn.bind(lambda *_: code_outputs(state), state.param.batch,
                                    state.param.context, state.param.page, state.param.output),
                            sizing_mode="stretch_width", css_classes=["code-output"])
    return pn.Column(
        section_heading(content, "code"),
        pn.pane.Markdown(content.code, sizing_mode="stretch_width"),
        sources[0], live, *sources[1:], sizing_mode="stretch_width", css_classes=["lab-section"])
