"""The Triton paged decode-attention kernel against the torch reference.

On a machine without CUDA the kernel runs in triton's CPU interpreter (TRITON_INTERPRET=1, set here
before anything builds a kernel), in fp32 and fp16 only: the interpreter computes bf16 wrongly. With
CUDA the same cases run compiled on the GPU, plus bf16 and the runner's choice of kernel. Shapes stay tiny because
the interpreter executes every program in Python.
"""
import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is built, so this must come first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is an optional extra: pip install -e '.[triton]'")

from engine.kernels import triton_paged_attention as tpa  # noqa: E402
from engine.kernels.paged_attention import paged_decode_attention_ref  # noqa: E402
from engine.runner import triton_attention  # noqa: E402

INTERPRETING = tpa._interpreting()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING,
                                                 reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")),
]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_case(batch: int, group: int, n_kv: int, d_head: int, block_size: int, max_len: int,
              dtype: torch.dtype, device: str, seed: int = 0,
              table_dtype: torch.dtype = torch.int32) -> tuple[torch.Tensor, ...]:
    """Random q and caches with ragged lengths and shuffled, padded, strided block tables."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen)  # (B,)
    lens[0] = 1  # a sequence holding only the new token
    if batch > 1:
        lens[-1] = max_len
    max_blocks = math.ceil(int(lens.max()) / block_size)
    num_blocks = batch * max_blocks + 2  # spare pages, so padding ids point at pages of no one
    pages = torch.randperm(num_blocks, generator=gen)[:batch * max_blocks]
    pages = pages.reshape(batch, max_blocks)  # (B, max_blocks) shuffled physical pages
    used = (lens + block_size - 1) // block_size  # (B,) pages each sequence owns
    pad = torch.arange(max_blocks)[None, :] >= used[:, None]
    pages = pages.masked_fill(pad, int(pages[-1, 0]))  # padding: a valid id the kernel must skip
    # A column slice of a wider table: row stride != width, as when a runner trims its table.
    wide = torch.zeros(batch, max_blocks + 3, dtype=table_dtype)
    wide[:, 1:max_blocks + 1] = pages
    tables = wide.to(device)[:, 1:max_blocks + 1]  # (B, max_blocks), non-contiguous
    shape = (num_blocks, block_size, n_kv, d_head)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    q = torch.randn(batch, n_kv * group, d_head, generator=gen).to(device, dtype)  # (B, Hq, D)
    return q, k_cache, v_cache, tables, lens.to(device)


def check(case: tuple[torch.Tensor, ...], num_splits: int | None = None,
          tile: tpa.TileConfig = tpa.TileConfig()) -> None:
    """Run kernel and reference on the same inputs and compare within the dtype's tolerance."""
    q, k_cache, v_cache, tables, lens = case
    scale = q.shape[-1] ** -0.5
    out = tpa.paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale,
                                            num_splits=num_splits, tile=tile)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    assert out.shape == ref.shape and out.dtype == q.dtype
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# (batch, group, n_kv, d_head, block_size, max_len, num_splits): every page size, batch size and
# group size appears, lengths are ragged, and the split path runs with several chunk counts.
CASES = [
    (3, 2, 2, 16, 1, 40, None),
    (8, 4, 1, 16, 3, 50, None),
    (3, 1, 2, 64, 16, 100, 1),
    (1, 4, 2, 64, 256, 300, None),
    (3, 2, 1, 64, 3, 200, 3),
    (8, 1, 2, 16, 16, 130, 4),
    (1, 2, 1, 16, 256, 700, 5),
    (2, 8, 1, 128, 16, 150, None),
    (3, 3, 2, 32, 5, 77, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,group,n_kv,d_head,block_size,max_len,num_splits", CASES,
                         ids=[f"b{c[0]}-g{c[1]}-d{c[3]}-page{c[4]}-split{c[6]}" for c in CASES])
def test_matches_reference(device, dtype, batch, group, n_kv, d_head, block_size, max_len,
                           num_splits):
    check(make_case(batch, group, n_kv, d_head, block_size, max_len, dtype, device), num_splits)


@pytest.mark.parametrize("device", DEVICES)
def test_smoke(device):
    """One small case: the GPU check's dry run runs only this."""
    check(make_case(2, 2, 2, 16, 3, 20, torch.float32, device), num_splits=2)


@pytest.mark.parametrize("device", DEVICES)
def test_lengths_on_page_edges(device):
    """Lengths that fill their last page exactly, and ones that open a new page by one token."""
    q, k_cache, v_cache, tables, lens = make_case(4, 2, 1, 16, 16, 64, torch.float32, device)
    lens = torch.tensor([16, 17, 32, 64], device=device)
    check((q, k_cache, v_cache, tables, lens))


@pytest.mark.parametrize("device", DEVICES)
def test_int64_tables_and_other_tiles(device):
    """int64 block tables, and tile shapes other than the default (tiles straddle pages)."""
    case = make_case(3, 2, 2, 16, 3, 90, torch.float32, device, seed=1, table_dtype=torch.int64)
    check(case, tile=tpa.TileConfig(block_n=16, num_warps=2, num_stages=1))
    check(case, num_splits=2, tile=tpa.TileConfig(block_n=32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs the GPU: the interpreter "
                    "computes bf16 wrongly")
@pytest.mark.parametrize("num_splits", [1, None])
def test_bf16_on_cuda(num_splits):
    check(make_case(8, 4, 2, 128, 16, 2000, torch.bfloat16, "cuda"), num_splits)


def test_runner_offers_the_kernel_on_cuda_only():
    assert triton_attention(torch.device("cpu")) is None  # even where the interpreter could run it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the runner uses triton on CUDA only")
def test_runner_attends_with_the_kernel_on_cuda():
    assert triton_attention(torch.device("cuda")) is tpa.paged_decode_attention_triton
    q, k_cache, v_cache, tables, lens = make_case(3, 2, 2, 64, 16, 100, torch.float16, "cuda")
    out = triton_attention(q.device)(q, k_cache, v_cache, tables, lens, 0.125)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-3, rtol=3e-3)


def test_default_splits_fill_the_gpu(monkeypatch):
    """Few long sequences are split; many sequences, short contexts and the CPU are not."""
    monkeypatch.setattr(tpa, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert tpa.default_num_splits(1, 8, 32768, cuda) == 33
    assert tpa.default_num_splits(64, 8, 32768, cuda) == 1
    assert tpa.default_num_splits(1, 8, 200, cuda) == 1
    assert tpa.default_num_splits(1, 1, 10**6, cuda) == tpa.MAX_SPLITS
    assert tpa.default_num_splits(1, 8, 32768, torch.device("cpu")) == 1


def test_tile_config_rejects_bad_shapes():
    with pytest.raises(ValueError):
        tpa.TileConfig(block_n=48)
    with pytest.raises(ValueError):
        tpa.TileConfig(num_warps=3)


AOT_COMPILE = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile
from triton.runtime.jit import JITFunction
from engine.kernels import triton_paged_attention as tpa

def build(fn, types, consts, **options):
    kernel = JITFunction(fn)
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in kernel.arg_names}
    return triton_compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32),
                          options=options)

for split in (False, True):
    consts = dict(GROUP=4, HEAD_DIM=128, BLOCK_G=16, BLOCK_D=128, BLOCK_N=64, SPLIT=split,
                  DOT_PRECISION="tf32")
    types = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", tables_ptr="*i32", lens_ptr="*i32",
                 out_ptr="*fp32" if split else "*bf16", lse_ptr="*fp32", scale_log2="fp32")
    ptx = build(tpa._paged_decode_kernel, types, consts, num_warps=4, num_stages=2).asm["ptx"]
    assert "mma" in ptx, "the score and value products should run on tensor cores"
build(tpa._merge_splits_kernel, dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*bf16"),
      dict(HEAD_DIM=128, BLOCK_S=64, BLOCK_D=128), num_warps=4)
print("compiled")
"""


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter at the repository root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=120, env=env)


def test_compiles_for_hopper():
    """Compile both kernels for sm_90 ahead of time: catches compiled-mode errors without a GPU.

    A fresh process without TRITON_INTERPRET, because the interpreter's patches to triton.language
    break the compiler in the process that ran them.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's warning about a changing default
    done = run_python(AOT_COMPILE, env)
    if "ImportError" in done.stderr or "ModuleNotFoundError" in done.stderr:
        pytest.skip("this triton has no ahead-of-time compile API: " + done.stderr.splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled" in done.stdout


def test_imports_without_triton():
    """With triton absent the module still imports, reports unavailable and refuses to run."""
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "from engine.kernels import triton_paged_attention as tpa\n"
            "assert tpa.available() is False\n"
            "try:\n    tpa.paged_decode_attention_triton(None, None, None, None, None, 1.0)\n"
            "except RuntimeError:\n    print('refused')\n")
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "refused" in done.stdout
