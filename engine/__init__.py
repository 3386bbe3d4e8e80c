"""Serving Lab's engine: a small, real LLM serving engine (torch + numpy only).

On the CPU a run's matrix products go through torch's OpenMP pool (see `engine.cpu_threads`).
OpenMP threads that spin while idle take the core from whatever else wants it, and then every
product waits for the thread that lost its core: with another process busy on a 2-core machine,
`cpu-30m` at batch 1 measured 10-14 ms a token with passive waiting and 49-253 ms with OpenMP's
default spinning. So, unless the user chose otherwise, the threads wait passively. This only takes
effect when the engine is imported before torch (OpenMP reads the setting when torch loads it).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
