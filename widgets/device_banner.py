"""A one-line banner naming the device and model that produced every number, and what the device
can do at best (measured bandwidth and matmul throughput) once the probe has run.
"""
from __future__ import annotations

from typing import Any

import panel as pn
import param

from engine.analytic import DeviceProbe
from widgets.style import fmt_num

PENDING = "Measuring device: not known yet."
CSS = """
:host {border-left: 4px solid #56B4E9; padding-left: 10px;}
"""


def describe(device: str, model: str, probe: DeviceProbe | None) -> str:
    """The banner's sentence."""
    text = f"**Measured on {device}** · model **{model}**"
    if probe is not None:
        text += (f" · memory bandwidth {fmt_num(probe.bandwidth_gbs)} GB/s"
                 f" · matmul {fmt_num(probe.matmul_tflops)} TFLOP/s")
    return text


class DeviceBanner(pn.viewable.Viewer):
    """Which device and model measured the numbers on this page."""

    plot_id = "device"

    text = param.String(default=PENDING, doc="The banner's sentence.")

    def __init__(self, **params: Any) -> None:
        params.setdefault("name", self.plot_id)
        super().__init__(**params)
        self.pane = pn.pane.Markdown(self.text, css_classes=["device-banner"],
                                     name="device-banner", stylesheets=[CSS],
                                     sizing_mode="stretch_width", margin=(5, 10))

    def __panel__(self) -> pn.pane.Markdown:
        return self.pane

    @param.depends("text", watch=True)
    def _sync(self) -> None:
        self.pane.object = self.text

    def update(self, device: str, model: str, probe: DeviceProbe | None = None) -> None:
        """Name the device and model; add the probe's peak numbers when measured."""
        self.text = describe(device, model, probe)
