"""The objects one page process shares on purpose: the engine server's client (or, with
LAB_ENDPOINT, the external endpoint's client and its prompt maker), the traces it has received, the
run limits and the classroom client. Each is made once, by a cached factory, the
first time any session asks."""
from __future__ import annotations

import functools
import os

from lab.classroom import Classroom
from lab.endpoint_client import EndpointClient
from lab.endpoint_config import EndpointConfig
from lab.endpoint_prompts import PromptMaker
from lab.engine_client import EngineClient, TraceCache
from lab.engine_process import start_engine
from lab.runs import Limits


@functools.lru_cache(maxsize=1)
def limits() -> Limits:
    return Limits.from_env()


@functools.lru_cache(maxsize=1)
def engine_client() -> EngineClient:
    """The client of LAB_ENGINE_URL; without it, of an engine server started for this process."""
    if not os.environ.get("LAB_ENGINE_URL"):
        _proc, url = start_engine()
        os.environ["LAB_ENGINE_URL"] = url  # the classroom client reads it too
    client = EngineClient()
    client.wait_ready(timeout_s=120)
    return client


@functools.lru_cache(maxsize=1)
def traces() -> TraceCache:
    return TraceCache()


@functools.lru_cache(maxsize=1)
def classroom() -> Classroom:
    engine_client()  # the hub lives in the engine server, which must be up first
    return Classroom.from_env()


@functools.lru_cache(maxsize=1)
def endpoint() -> EndpointClient | None:
    """The client of LAB_ENDPOINT, or None when the lab measures on its own engine server."""
    config = EndpointConfig.from_env()
    return EndpointClient(config) if config is not None else None


@functools.lru_cache(maxsize=1)
def endpoint_prompts() -> PromptMaker:
    """Prompts for LAB_ENDPOINT, whose vocabulary is measured once per page process."""
    return PromptMaker(endpoint().tokenize)
