"""Ops tooling for the lab and the engine: load clients, the diagnostics plugin, the GC policy,
the GPU check and report scripts.

Not installed with the app (pyproject's `packages` leaves it out); run from the repository root,
e.g. `python -m tools.load`. Tools may import `engine`, `widgets` and `lab`; none of those imports
`tools` (tests/test_engine_boundary.py checks both directions).
"""
