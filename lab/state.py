"""The demo's controls as param parameters: the sliders' values (where a run stands is
`widgets.run_state.RunState`).

UI-free on purpose: tests drive it with plain pytest, and the page builds its widgets from these
parameters with `from_param`. Bounds here are the sliders' ranges.
"""
from __future__ import annotations

from dataclasses import fields

import param

from engine.config import PRESETS, SLO
from lab.runs import RunKey

LAB_MODELS = ("cpu-8m", "cpu-30m", "gpu-1b")  # presets a learner may pick (tiny is for tests)


class LabState(param.Parameterized):
    """One learner's settings."""

    batch = param.Integer(default=8, bounds=(1, 64),
                          doc="Most sequences running at once (max_num_seqs)")
    context = param.Integer(default=128, bounds=(16, 8192),
                            doc="Prompt length in tokens (the mean, for mixed lengths)")
    page = param.Integer(default=16, bounds=(1, 256), doc="Tokens per KV page (block size)")
    output = param.Integer(default=64, bounds=(1, 512),
                           doc="Tokens generated per request (the mean, for mixed lengths)")
    ttft_slo = param.Number(default=500.0, bounds=(1.0, 60000.0), doc="TTFT target (ms)")
    tpot_slo = param.Number(default=50.0, bounds=(0.1, 10000.0), doc="TPOT target (ms)")
    model = param.Selector(default="cpu-8m", objects=list(LAB_MODELS), doc="Model preset")
    requests = param.Integer(default=8, bounds=(1, 256), doc="Requests in the workload")
    rate = param.Number(default=0.0, bounds=(0.0, 64.0),
                        doc="Arrivals per second (Poisson, seeded); 0 sends every request at once")
    mix = param.Selector(default="fixed", objects=["fixed", "mixed"],
                         doc="Fixed lengths, or lognormal lengths around context and output")
    kv_mb = param.Integer(default=32, bounds=(1, 256),
                          doc="Memory the KV cache may use (MB); the server's cap still applies")
    policy = param.Selector(default="continuous", objects=["continuous", "static"],
                            doc="Continuous (iteration-level) or static (request-level) batching")
    chunk = param.Integer(default=512, bounds=(16, 4096),
                          doc="Prefill tokens per step (max_num_batched_tokens)")

    # Every control, declared once here; the RunKey fields are the ones that shape a run.
    RUN_CONTROLS = tuple(f.name for f in fields(RunKey) if f.name != "repeat")
    CONTROLS = (*RUN_CONTROLS, "ttft_slo", "tpot_slo")
    CHOICES = ("model", "mix", "policy")  # controls that take a name, not a number

    def key(self, repeat: int = 0) -> RunKey:
        return RunKey(**{name: getattr(self, name) for name in self.RUN_CONTROLS}, repeat=repeat)

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
            if name in self.CHOICES:
                if raw in p.objects:
                    clean[name] = raw
                else:
                    notes.append(f"{name} {str(raw)[:40]!r} is not offered here; kept "
                                 f"{getattr(self, name)}")
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
