"""Serving Lab's engine: a small, real LLM serving engine (torch + numpy only).

Importing it changes nothing in the process: entry points set threads and environment
(`engine.cpu_threads.quiet_openmp`, `set_blas_threads`).
"""
