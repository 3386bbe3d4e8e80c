"""engine/cpu_threads.py: numpy's BLAS pool is sized at run time and the device name follows it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.cpu_threads import blas_threads, set_blas_threads, usable_cores
from engine.llm_engine import describe_device


def test_blas_pool_size_is_set_and_reported() -> None:
    before = blas_threads()
    try:
        assert set_blas_threads(1) == 1 == blas_threads()
        assert describe_device(torch.device("cpu")) == "CPU: 1 thread"
        a = np.ones((64, 64), dtype=np.float32)
        assert float((a @ a)[0, 0]) == 64.0  # BLAS still computes on one thread
        if usable_cores() >= 2:
            assert set_blas_threads(2) == 2
            assert describe_device(torch.device("cpu")) == "CPU: 2 threads"
    finally:
        set_blas_threads(before)


def test_a_pool_of_no_threads_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        set_blas_threads(0)
