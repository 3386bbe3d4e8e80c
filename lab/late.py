"""Panel objects made for a page already being served, styled like the objects made with it.

The page is a Bootstrap template. The objects a session's page holds when it is built take the
template's styling when the page is served: Panel's theme stylesheet for Bootstrap, one shared
link per shadow root. An object made later, in a session callback (a plot tab or an "after the
first pass" panel opened for the first time), is made while the template's design is the
session's design, and renders with that design's stand-alone stylesheets instead: Bootstrap's
whole CSS loaded into its shadow root, and its headings at Bootstrap's sizes (a plot card's h3 at
28 px beside 14 px on the card built with the page). Made with no design set, it is styled by the
template when it joins the page, exactly as the objects made with the page are.

Measured in headless Chromium on 2026-11-30, in one page: opening the storyboard, the visual
inquiry and the practice panel put Bootstrap's whole CSS into 26 shadow roots; made through
`made_late`, into none.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import panel as pn

T = TypeVar("T")


def made_late(build: Callable[[], T]) -> T:
    """Run `build` (which makes Panel objects for a page already served) with no design set,
    so that the page's template styles what it makes when it is added to the page."""
    with pn.config.set(design=None):
        return build()
