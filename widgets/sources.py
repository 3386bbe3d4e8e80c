"""Source grounding and claim review, drawn from content/sources.yaml and content/claims.yaml.

`SourceCards` shows each paper: title, venue and year, authors, what the page takes from it, what it
supports and what it does not; the url is a plain text link. `ClaimReview` shows each claim with
its source ids, review badge, scope and caveats. Both are static HTML; colours come from the theme.
"""
from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import panel as pn
import param

CSS = """
.cards {display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px;}
.card {border: 1px solid color-mix(in srgb, currentColor 22%, transparent); border-radius: 8px;
  padding: 10px 14px; font-size: .92rem;}
.card p {font-size: inherit;}
.claim .claim-text {font-size: 1rem; font-weight: 600; line-height: 1.35; margin: 6px 0;}
.card h4 {margin: 4px 0; font-size: 1.02rem; line-height: 1.3;}
.card .meta {font-size: .85rem; opacity: .8; margin: 0 0 6px;}
.card h5 {margin: 8px 0 2px; font-size: .9rem;}
.card ul {margin: 2px 0 4px 1.1em; padding: 0;}
.card .url {font-size: .85rem; word-break: break-all;}
.chip {display: inline-block; border-radius: 999px; padding: 1px 9px; margin: 0 4px 2px 0;
  font-size: .78rem; border: 1px solid color-mix(in srgb, currentColor 35%, transparent);}
.chip.primary {border-color: #0072B2;}
.supports li::marker {content: "✓ ";}
.not-supports li::marker {content: "✗ ";}
.badge {display: inline-block; border-radius: 4px; padding: 1px 8px; font-size: .8rem;
  font-weight: 600; color: #fff;}
.badge.source-checked {background: #00795a;}
.badge.toy-witness {background: #9a6700;}
.badge.needs-review {background: #b34700;}
.claim p {margin: 4px 0;}
.claim .label {font-weight: 600;}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _list(items: Sequence[str], css: str) -> str:
    return f'<ul class="{css}">' + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def source_card(source: Mapping[str, Any]) -> str:
    """One source as an HTML card."""
    return (
        f'<article class="card source" id="source-{_e(source["id"])}">'
        f'<span class="chip {_e(source["role"])}">{_e(source["role"])}</span>'
        f'<span class="chip">{_e(source["id"])}</span>'
        f'<h4>{_e(source["title"])}</h4>'
        f'<p class="meta">{_e(source["venue"])} · {_e(source["year"])} · {_e(source["authors"])}</p>'
        f'<p>{_e(source["summary"])}</p>'
        f"<h5>What it supports</h5>{_list(source['supports'], 'supports')}"
        f"<h5>What it does not support</h5>{_list(source['does_not_support'], 'not-supports')}"
        f'<p class="url"><a href="{_e(source["url"])}" target="_blank" rel="noopener">'
        f'{_e(source["url"])}</a></p></article>')


def claim_card(claim: Mapping[str, Any], titles: Mapping[str, str]) -> str:
    """One claim with its source chips, review badge, scope and caveats."""
    review = claim["review"]
    badge = review["badge"]
    chips = "".join(f'<span class="chip" title="{_e(titles.get(s, s))}">{_e(s)}</span>'
                    for s in claim["source_ids"])
    return (
        f'<article class="card claim" id="claim-{_e(claim["id"])}">'
        f'<p><span class="badge {_e(badge.replace(" ", "-"))}">{_e(badge)}</span> {chips}</p>'
        f'<p class="claim-text">{_e(claim["text"])}</p>'
        f'<p><span class="label">Review:</span> {_e(review["note"])} '
        f'<span class="meta">({_e(review["reviewer"])})</span></p>'
        f'<p><span class="label">Scope:</span> {_e(claim["scope"])}</p>'
        f'<p><span class="label">Caveats:</span> {_e(claim["caveats"])}</p></article>')


class SourceCards(pn.viewable.Viewer):
    """One card per source."""

    sources = param.List(default=[], doc="content/sources.yaml entries.")

    def __panel__(self) -> pn.pane.HTML:
        return pn.pane.HTML('<div class="cards">' + "".join(map(source_card, self.sources))
                            + "</div>", stylesheets=[CSS], sizing_mode="stretch_width",
                            css_classes=["source-cards"], name="sources")


class ClaimReview(pn.viewable.Viewer):
    """One card per claim, with its sources' ids (their titles on hover)."""

    claims = param.List(default=[], doc="content/claims.yaml entries.")
    sources = param.List(default=[], doc="content/sources.yaml entries, for the chips' titles.")

    def __panel__(self) -> pn.pane.HTML:
        titles = {s["id"]: s["title"] for s in self.sources}
        return pn.pane.HTML('<div class="cards">' + "".join(claim_card(c, titles)
                                                            for c in self.claims) + "</div>",
                            stylesheets=[CSS], sizing_mode="stretch_width",
                            css_classes=["claim-review"], name="claims")
