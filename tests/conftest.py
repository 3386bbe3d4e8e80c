"""Process-wide settings every test needs before torch or triton is first imported."""
import os

# Without a GPU, Triton kernels run in its CPU interpreter. The flag must be set before triton is
# imported anywhere in the process (the engine's boundary tests import every engine module), and
# never on a GPU machine, where the kernel tests compile for real.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import engine  # noqa: E402,F401  (sets the engine's thread defaults before torch loads)
