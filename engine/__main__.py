"""Entry point for `python -m engine`.

OpenMP's wait policy is set before `engine.cli` is imported, because that import loads torch, and
OpenMP reads the policy only then (see `engine.cpu_threads.quiet_openmp`).
"""
import sys

from engine.cpu_threads import quiet_openmp

quiet_openmp()

from engine.cli import main  # noqa: E402  (after quiet_openmp, on purpose)

sys.exit(main())
