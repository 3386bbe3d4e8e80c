"""The demo's state as param parameters: the sliders' values and what the page says about a run.

UI-free on purpose: tests drive it with plain pytest, and the page builds its widgets from these
parameters with `from_param`. Bounds here are the sliders' ranges.
"""
from __future__ import annotations

import param

from engine.config import PRESETS, SLO
from lab.runs import RunKey

LAB_MODELS = ("cpu-8m", "cpu-30m", "gpu-1b")  # presets a learner may pick (tiny is for tests)


class LabState(param.Parameterized):
    """One learner's settings and the status of their latest run."""

    batch = param.Integer(default=8, bounds=(1, 64), doc="Requests sent at once (batch size)")
    context = param.Integer(default=128, bounds=(16, 8192), doc="Prompt length in tokens")
    page = param.Integer(default=16, bounds=(1, 256), doc="Tokens per KV page (block size)")
    output = param.Integer(default=64, bounds=(1, 512), doc="Tokens generated per request")
    ttft_slo = param.Number(default=500.0, bounds=(1.0, 60000.0), doc="TTFT target (ms)")
    tpot_slo = param.Number(default=50.0, bounds=(0.1, 10000.0), doc="TPOT target (ms)")
    model = param.Selector(default="cpu-8m", objects=list(LAB_MODELS), doc="Model preset")

    status = param.Selector(default="idle",
                            objects=["idle", "queued", "running", "done", "refused", "failed"],
                            doc="Where the latest run stands")
    notice = param.String(default="", doc="What the learner should know about the last change")
    queue_position = param.Integer(default=0, bounds=(0, None), doc="Jobs ahead of ours")
    steps_done = param.Integer(default=0, bounds=(0, None), doc="Steps streamed so far")

    CONTROLS = ("batch", "context", "page", "output", "ttft_slo", "tpot_slo", "model")

    def key(self) -> RunKey:
        return RunKey(self.model, self.batch, self.context, self.page, self.output)

    def slo(self) -> SLO:
        return SLO(ttft_ms=self.ttft_slo, tpot_ms=self.tpot_slo)

    def values(self) -> dict:
        """The controls' current values, for presets, links and prompts."""
        return {name: getattr(self, name) for name in self.CONTROLS}

    def apply(self, values: dict) -> list[str]:
        """Set controls from untrusted values (a URL, a preset): clamp what is out of range, drop
        what is malformed, and return one note per value that was changed or dropped."""
        notes: list[str] = []
        clean: dict = {}
        for name, raw in values.items():
            if name not in self.CONTROLS:
                continue
            p = self.param[name]
            if name == "model":
                if raw in p.objects:
                    clean[name] = raw
                else:
                    notes.append(f"model {raw!r} is not offered here; kept {self.model}")
                continue
            try:
                number = float(raw)
                if number != number or number in (float("inf"), float("-inf")):
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                notes.append(f"{name}={str(raw)[:40]!r} is not a usable number; "
                             f"kept {getattr(self, name)}")
                continue
            low, high = p.bounds
            clamped = min(max(number, low), high)
            if isinstance(p, param.Integer):
                clamped = int(round(clamped))
            if clamped != number:
                notes.append(f"{name}={raw} is outside {low}..{high}; used {clamped}")
            clean[name] = clamped
        self.param.update(**clean)
        return notes

    def model_max_positions(self) -> int:
        return PRESETS[self.model].max_position_embeddings
