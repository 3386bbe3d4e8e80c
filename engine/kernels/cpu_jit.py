"""Numba for the CPU decode step's two loops that no library call does well: small-batch weight
products and paged attention. This module is the only place that imports numba.

Why compiled loops: a decode step multiplies a few rows by every weight matrix and reads each
sequence's K/V pages. torch's BLAS (MKL) copies ("packs") a matrix into blocks on every call
before multiplying, and numpy's attention had to gather each sequence's pages into a fresh array
first; both read and write the bytes that a decode step should only read once (the figures are in
docs/benchmarks.md, "Compiled loops"). A loop compiled for this machine reads each weight (packed
once into panels, `cpu_products`) and each K/V row (in place) once a step.

How they are compiled:
- `kernel` is numba's `njit` with the options every kernel here uses: threads over the outer
  loop (`prange`), fast floating point (sums may be reordered, as any BLAS does), no bounds
  checks, and an on-disk cache next to the source, so only the first process compiles.
  `serial` is the same on one thread, for a layer's small elementwise work, and `inline` for
  helpers that numba pastes into the kernels calling them.
- Wide vectors: on CPUs with AVX-512, LLVM prefers 256-bit vectors unless told otherwise, which
  halves what one instruction does. `wide_vectors` tells numba the host's features with that
  preference removed, through numba's documented `NUMBA_CPU_FEATURES`. It must run before numba is
  imported, so it runs at the top of this module; a user who set the variable keeps it.
- The cache: `keyed_cache` names numba's cache folder after every kernel module's source, so an
  edit to a module that others paste code from recompiles them too.
- Threads: numba's pool is sized per calling thread (`set_threads`); `engine.cpu_threads`
  sizes it with torch's for each run.
- Vector tiles: where a loop must keep its sums in vector registers and read ahead of itself,
  which numba's loops do not say, `engine.kernels.cpu_tiles` writes the LLVM instructions itself,
  as numba intrinsics (`intrinsic`, `types`, re-exported here).
- `warm_up` compiles (or loads) every kernel once with tiny inputs, so that the first measured
  step does not pay for compilation.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import shutil
import sys
import time


@functools.cache
def has_avx512() -> bool:
    """Whether the compiled loops run with 32 vector registers of 16 floats (AVX-512): the
    features numba compiles for (`NUMBA_CPU_FEATURES`, where set), else the host's."""
    import llvmlite.binding as llvm

    features = os.environ.get("NUMBA_CPU_FEATURES") or llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


def kernel_sources_digest(folder: pathlib.Path) -> str:
    """A short hash of every kernel module's source in `folder` (`cpu_*.py`)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("cpu_*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def keyed_cache() -> None:
    """Keep numba's compiled kernels in a folder named after the kernels' sources.

    numba's cache checks only the file of the function it compiled, but these kernels paste in
    code from other modules (the vector tiles of `cpu_tiles`, the exponential of `cpu_math`):
    after an edit there, numba would load the old machine code. Through numba's documented
    `NUMBA_CACHE_DIR`, the cache lives in `__pycache__/numba-<hash of every cpu_*.py>` beside
    the sources (or under ~/.cache/serving-lab where that folder cannot be written), so any edit
    starts a fresh folder; older folders there are removed. A user who set the variable keeps it."""
    if "NUMBA_CACHE_DIR" in os.environ:
        return
    here = pathlib.Path(__file__).resolve().parent
    name = f"numba-{kernel_sources_digest(here)}"
    for base in (here / "__pycache__", pathlib.Path.home() / ".cache" / "serving-lab"):
        try:
            (base / name).mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if not os.access(base / name, os.W_OK):
            continue
        for old in base.glob("numba-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        os.environ["NUMBA_CACHE_DIR"] = str(base / name)
        return


def wide_vectors() -> None:
    """Let LLVM use 512-bit vectors where the CPU has them (see the module docstring)."""
    if "NUMBA_CPU_FEATURES" in os.environ:
        return
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features().flatten()
    if has_avx512():
        os.environ["NUMBA_CPU_FEATURES"] = features + ",-prefer-256-bit"


wide_vectors()
keyed_cache()

import numba  # noqa: E402  (after wide_vectors and keyed_cache, on purpose)
from numba import types  # noqa: E402,F401  (for engine.kernels.cpu_tiles)
from numba.extending import intrinsic  # noqa: E402,F401  (likewise)

kernel = functools.partial(numba.njit, parallel=True, fastmath=True, cache=True, nogil=True,
                           boundscheck=False)
prange = numba.prange
# A loop too small to share out over threads (waking a thread costs more than it saves).
serial = functools.partial(numba.njit, fastmath=True, cache=True, nogil=True, boundscheck=False)
# A small compiled helper that kernels call: numba pastes its body into the caller.
inline = functools.partial(numba.njit, inline="always", fastmath=True, cache=True,
                           boundscheck=False)
COMPILE_NOTE_S = 8.0  # a warm-up slower than this compiled (a cold compile took 19 s, loading 2.7 s)


def threads() -> int:
    """The compiled loops' threads for the calling thread."""
    return numba.get_num_threads()


def set_threads(n: int) -> int:
    """Size numba's pool for the calling thread at `n` (at most what it was started with);
    returns the size it had."""
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    return before


@functools.cache
def warm_up() -> None:
    """Compile or load every kernel once in this process (the first call of each compiles).
    A compile (the first start after an install or an edit) takes seconds, and says so."""
    import numpy as np
    import torch

    from engine.kernels import cpu_layer_ops as ops
    from engine.kernels.cpu_attention import paged_attention
    from engine.kernels.cpu_products import WeightProduct

    started = time.perf_counter()
    rows = np.ones((5, 8), np.float32)
    WeightProduct(torch.ones((6, 8)))(rows)
    cache = np.ones((3, 2, 1, 8), np.float32)  # (pages, page size, K/V heads, head size)
    q = np.ones((2, 1, 2, 8), np.float32)
    ints = np.array([3, 1], np.int64)
    paged_attention(q, cache, cache, np.zeros((2, 2), np.int64), ints, np.empty_like(q))
    ops.rms_norm_into(rows, rows[0], 1e-5, np.empty_like(rows))
    ops.add_rms_norm(rows[:2].copy(), rows[:2], rows[0], 1e-5, np.empty((2, 8), np.float32))
    ops.rope_into_cache(np.ones((2, 32), np.float32), rows, rows, ints, ints, cache, cache,
                        np.float32(1), np.empty((2, 2, 8), np.float32))
    ops.swiglu_into(rows, np.empty((5, 4), np.float32))
    took = time.perf_counter() - started
    if took > COMPILE_NOTE_S:
        print(f"[engine] compiled the CPU decode loops in {took:.1f} s; numba keeps them beside "
              "their source, so later starts load them in a few seconds", file=sys.stderr,
              flush=True)
