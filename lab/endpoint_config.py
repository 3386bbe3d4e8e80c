"""Where the external deployment is: LAB_ENDPOINT and its companions, read from the server's
environment at start-up.

`EndpointConfig.from_env` reads LAB_ENDPOINT, LAB_ENDPOINT_MODEL, LAB_ENDPOINT_METRICS and
LAB_ENDPOINT_API_KEY. Nothing a learner sends (a URL key, a widget, an instructor's action) reaches
it: it is server configuration only. The key is kept out of the config's repr.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit


def split_url(url: str, what: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of an http(s) URL; a ValueError naming `what` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must look like http://host:port, not {url[:80]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


@dataclass(frozen=True)
class EndpointConfig:
    """Where the external deployment is; read once from the environment at start-up."""

    url: str  # LAB_ENDPOINT, e.g. http://10.0.0.5:8000 (a path prefix before /v1 is kept)
    model: str | None = None  # LAB_ENDPOINT_MODEL; None: the first id /v1/models lists
    metrics_url: str | None = None  # LAB_ENDPOINT_METRICS; None: no /metrics is read ("off")
    api_key: str | None = field(default=None, repr=False)  # LAB_ENDPOINT_API_KEY, never shown

    def __post_init__(self) -> None:
        split_url(self.url, "LAB_ENDPOINT")
        if self.metrics_url is not None:
            split_url(self.metrics_url, "LAB_ENDPOINT_METRICS")

    @property
    def address(self) -> str:
        """host:port, as the page names the endpoint."""
        _scheme, host, port, _path = split_url(self.url, "LAB_ENDPOINT")
        return f"{host}:{port}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "EndpointConfig | None":
        """The configured endpoint, or None when LAB_ENDPOINT is unset (the lab's own engine)."""
        env = os.environ if env is None else env
        url = env.get("LAB_ENDPOINT", "").strip().rstrip("/")
        if not url:
            return None
        metrics = env.get("LAB_ENDPOINT_METRICS", "").strip()
        if metrics.lower() in ("off", "none", "no", "0"):
            metrics_url = None
        else:
            metrics_url = metrics or url + "/metrics"
        return cls(url=url, model=env.get("LAB_ENDPOINT_MODEL", "").strip() or None,
                   metrics_url=metrics_url, api_key=env.get("LAB_ENDPOINT_API_KEY") or None)
