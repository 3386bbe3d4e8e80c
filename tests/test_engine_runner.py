"""The runner's choice of execution path: one function, by device and batch shape, and the only
place that knows the paths exist."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.kernels.cpu_decode import CpuDecoder
from engine.llm_engine import LLMEngine
from engine.runner import ExecutionPath, choose_path
from engine.workload import WorkloadSpec

ENGINE = Path(__file__).resolve().parent.parent / "engine"
GRAPHS, NUMPY, TRITON, TORCH = (ExecutionPath.DECODE_GRAPHS, ExecutionPath.NUMPY_DECODE,
                                ExecutionPath.TORCH_TRITON, ExecutionPath.TORCH)


@pytest.mark.parametrize("device, decodes, prefills, graph_max, numpy_step, triton, want", [
    # CUDA with graphs up to 8 and triton: decodes-only steps that fit replay, the rest run eagerly.
    ("cuda", 1, 0, 8, False, True, GRAPHS),
    ("cuda", 8, 0, 8, False, True, GRAPHS),
    ("cuda", 9, 0, 8, False, True, TRITON),  # past the ladder
    ("cuda", 3, 1, 8, False, True, TRITON),  # a prefill chunk in the step
    ("cuda", 0, 2, 8, False, True, TRITON),
    ("cuda", 4, 0, 0, False, True, TRITON),  # graphs turned off
    ("cuda", 4, 0, 0, False, False, TORCH),  # no triton
    # The CPU: decodes-only steps go to numpy when the runner has the numpy step.
    ("cpu", 1, 0, 0, True, False, NUMPY),
    ("cpu", 32, 0, 0, True, False, NUMPY),
    ("cpu", 3, 1, 0, True, False, TORCH),
    ("cpu", 0, 1, 0, True, False, TORCH),
    ("cpu", 3, 0, 0, False, False, TORCH),  # bf16 on the CPU, or a test's stand-in model
    ("cpu", 3, 0, 4, True, False, GRAPHS),  # the padded graph path run eagerly, as tests do
])
def test_choose_path(device: str, decodes: int, prefills: int, graph_max: int, numpy_step: bool,
                     triton: bool, want: ExecutionPath) -> None:
    assert choose_path(device, decodes, prefills, graph_max, numpy_step, triton) is want


def _engine_imports(name: str) -> set[str]:
    """Modules of `engine` that engine/<name> imports anywhere in its body."""
    tree = ast.parse((ENGINE / name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("engine")}
    return found


@pytest.mark.parametrize("name", ["model.py", "kernels/paged_attention.py",
                                  "kernels/cpu_decode.py", "kernels/triton_paged_attention.py",
                                  "cuda_graphs.py", "kernels/cpu_backend.py"])
def test_only_the_runner_knows_the_paths(name: str) -> None:
    paths = {"engine.runner", "engine.cuda_graphs", "engine.kernels.cpu_decode",
             "engine.kernels.triton_paged_attention", "engine.kernels.paged_attention"}
    own = "engine." + name.removesuffix(".py").replace("/", ".")
    assert _engine_imports(name) & (paths - {own}) == set()


def test_a_cpu_engine_decodes_with_numpy_and_prefills_with_torch(monkeypatch) -> None:
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", max_num_seqs=4,
                                    max_model_len=64, kv_budget_bytes=1 << 20))
    calls: list[int] = []
    real = CpuDecoder.__call__

    def counting(self, ids, *rest):
        calls.append(len(ids))
        return real(self, ids, *rest)

    monkeypatch.setattr(CpuDecoder, "__call__", counting)
    trace = engine.run(WorkloadSpec(num_requests=3, prompt_len=5, output_len=4))
    decode_steps = [s for s in trace.steps if s.prefill_tokens == 0]
    assert decode_steps and calls == [s.decode_seqs for s in decode_steps]


def test_the_closed_loop_runs_every_step_through_step(monkeypatch) -> None:
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", max_num_seqs=2,
                                    max_model_len=64, kv_budget_bytes=1 << 20))
    records = []
    real = LLMEngine.step

    def counting(self):
        records.append(real(self))
        return records[-1]

    monkeypatch.setattr(LLMEngine, "step", counting)
    trace = engine.run(WorkloadSpec(num_requests=3, prompt_len=6, output_len=3))
    assert trace.steps == [r for r in records if r is not None] and len(trace.steps) >= 3
