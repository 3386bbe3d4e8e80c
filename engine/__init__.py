"""Serving Lab's engine: a small, real LLM serving engine (torch + numpy only).

On the CPU the engine mixes torch's OpenMP threads with numpy's BLAS threads (see model.linear);
OpenMP threads that spin while idle starve BLAS on a small machine, so unless the user chose
otherwise they wait passively. This only takes effect when the engine is imported before torch.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
