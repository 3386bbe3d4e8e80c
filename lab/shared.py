"""The objects one server process shares on purpose: the engine service, the loaded models, the
run limits and the classroom hub. Each is made once, by a cached factory, the first time any session
asks."""
from __future__ import annotations

import functools

from engine.cpu_threads import set_blas_threads
from lab.classroom import Classroom
from lab.runs import Limits, ModelShelf
from lab.service import EngineService


@functools.lru_cache(maxsize=1)
def limits() -> Limits:
    return Limits.from_env()


@functools.lru_cache(maxsize=1)
def service() -> EngineService:
    return EngineService()


@functools.lru_cache(maxsize=1)
def shelf() -> ModelShelf:
    made = ModelShelf(limits().device)
    if made.device.type == "cpu":  # before any run: the size holds for the whole process
        set_blas_threads(limits().cpu_threads)
    return made


@functools.lru_cache(maxsize=1)
def classroom() -> Classroom:
    return Classroom.from_env()
