"""The page's formulas as code, and a one-time probe of the device they are compared against.

Symbols match the math section: B sequences, L layers, T tokens, H_kv KV heads, d_head head size,
s bytes per element, P tokens per page. The page shows these functions' own source and runs them
on the slider values, so the formulas cannot drift from what is displayed.
"""
from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass

import torch

from engine.config import ModelConfig


def kv_bytes(T: int, layers: int, h_kv: int, d_head: int, batch: int = 1,
             bytes_per_elem: int = 2) -> int:
    """M_KV = 2 * B * L * T * H_kv * d_head * s: keys and values for every cached token."""
    return 2 * batch * layers * T * h_kv * d_head * bytes_per_elem


def kv_gb(T: int, layers: int, h_kv: int, d_head: int, batch: int = 1,
          bytes_per_elem: int = 2) -> float:
    """The same, in decimal gigabytes (1e9 bytes)."""
    return kv_bytes(T, layers, h_kv, d_head, batch, bytes_per_elem) / 1e9


def waste_tokens(T: int, P: int) -> int:
    """Empty slots in a sequence's last page: ceil(T / P) * P - T, between 0 and P - 1."""
    return math.ceil(T / P) * P - T


def decode_tpot_floor_s(weight_bytes: int, kv_bytes_read: int, bandwidth_bytes_s: float) -> float:
    """A decode step reads every weight and every cached K/V once: it cannot beat bytes / bandwidth."""
    return (weight_bytes + kv_bytes_read) / bandwidth_bytes_s


def prefill_ttft_floor_s(params: int, tokens: int, flops_per_s: float,
                         head_params: int = 0) -> float:
    """Prefill multiplies every prompt token by every layer weight (2 FLOPs each) and only the last
    token by the LM head: TTFT >= 2 * (N * T + N_head) / FLOP/s, with N = `layer_params`."""
    return 2 * (params * tokens + head_params) / flops_per_s


def layer_params(cfg: ModelConfig) -> int:
    """Weights each token is multiplied by inside the decoder layers: the attention and MLP
    projections. The embedding table is a lookup and the norms scale elementwise, so neither
    costs matmul FLOPs; the LM head (`head_params`) runs only where logits are needed."""
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    d, f = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_hidden_layers * (d * q + 2 * d * kv + q * d + 3 * d * f)


def head_params(cfg: ModelConfig) -> int:
    """Weights of the LM head (hidden -> vocabulary logits), applied once per sampled token."""
    return cfg.vocab_size * cfg.hidden_size


@dataclass(frozen=True)
class DeviceProbe:
    """What the device can do at best, measured once: read bandwidth and matmul throughput."""

    device: str
    bandwidth_gbs: float  # GB/s read by a large reduction (decode's traffic is reads)
    matmul_tflops: float  # dense matmul in the engine's dtype
    read_samples_gbs: tuple[float, ...] = ()  # every timed read, so an odd reading shows

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bandwidth_gbs * 1e9

    @property
    def flops_per_s(self) -> float:
        return self.matmul_tflops * 1e12


def _times(fn, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after one warm-up call. The probe takes their
    median, not the best: on a shared host a reading can come out far above what the memory
    sustains (two benchmark runs' probes said 48-51 GB/s on a host whose reads otherwise
    measure 24-32), and a floor resting on the best repeat inherits any such outlier."""
    fn()  # warm caches and allocators
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return times


@functools.lru_cache(maxsize=None)
def probe(device_type: str = "cpu") -> DeviceProbe:
    """Measure the device once per process (the cache is the sharing, on purpose)."""
    device = torch.device(device_type)
    cuda = device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (256 << 20)  # far beyond any cache level
    # Decode streams weights and KV in and writes almost nothing back, so the roofline's
    # bandwidth is the read rate: bytes of a large buffer reduced per second.
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    reads = [n_bytes / t / 1e9 for t in _times(lambda: src.sum(), device, repeats=5)]
    del src
    dtype = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t_mm = statistics.median(_times(lambda: a @ b, device, repeats=5))
    name = torch.cuda.get_device_name(device) if cuda else f"CPU: {torch.get_num_threads()} threads"
    return DeviceProbe(device=name, bandwidth_gbs=statistics.median(reads),
                       matmul_tflops=2 * n**3 / t_mm / 1e12, read_samples_gbs=tuple(reads))
