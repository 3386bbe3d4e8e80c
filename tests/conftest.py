"""Process-wide settings every test needs before torch or triton is first imported."""
import os

# Without a GPU, Triton kernels run in its CPU interpreter. The flag must be set before triton is
# imported anywhere in the process (the engine's boundary tests import every engine module), and
# never on a GPU machine, where the kernel tests compile for real.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.cpu_threads import quiet_openmp  # noqa: E402  (imports no torch)

quiet_openmp()  # timed tests run with the entry points' thread setting, set before torch loads
