"""The Code section shows the project's real source, and the Math tables' "in the code" names are
in it: each table's code names are searched, as whole identifiers, in the shown source text."""
from __future__ import annotations

import re

import pytest

from engine import analytic
from lab.content import load_content
from lab.sections import REFERENCE, REFERENCE_MODEL, code_outputs, shown_source
from lab.state import LabState

CONTENT = load_content()
SOURCE = "\n".join(shown_source().values())


def identifier(name: str) -> re.Pattern[str]:
    """`name` (dotted names allowed) as a whole identifier, not part of a longer one."""
    return re.compile(rf"(?<![\w.]){re.escape(name)}(?!\w)")


@pytest.mark.parametrize("block", CONTENT.math, ids=lambda b: b["id"])
def test_every_code_name_is_in_the_shown_source(block):
    missing = [s["code_name"] for s in block["symbols"]
               if not identifier(s["code_name"]).search(SOURCE)]
    assert not missing, f"{block['id']}: {missing} not in the Code section's source"


def test_the_code_section_shows_the_metrics_functions():
    metrics = shown_source()["engine/metrics.py"]
    for name in ("ttft_s", "tpot_s", "e2e_s", "goodput"):
        assert re.search(rf"^def {name}\(", metrics, re.M), name


def test_live_outputs_use_the_shown_functions():
    state = LabState()
    text = code_outputs(state)
    T = state.context + state.output
    kv = analytic.kv_gb(T, REFERENCE["layers"], REFERENCE["h_kv"], REFERENCE["d_head"],
                        batch=state.batch)
    assert f"-> {kv:.2f} GB" in text
    floor = analytic.prefill_ttft_floor_s(analytic.layer_params(REFERENCE_MODEL), state.context,
                                          989e12, analytic.head_params(REFERENCE_MODEL))
    assert f"-> {floor * 1e3:.2f} ms" in text
