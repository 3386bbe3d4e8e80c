"""The page's formulas as code, and the shape of the device figures they are compared against.

Symbols match the math section: B sequences, L layers, T tokens, H_kv KV heads, d_head head size,
s bytes per element, P tokens per page. The page shows these functions' own source and runs them
on the slider values, so the formulas cannot drift from what is displayed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RunningBounds:
    """How many sequences may run at once in this run, by each limit."""

    batch_cap: int  # max_num_seqs (and no more than the requests)
    at_full_length: int  # floor(KV blocks / blocks a sequence holds when done), uncapped
    on_prompt: int  # floor(KV blocks / blocks its prompt needs): the admission limit, uncapped
    num_blocks: int
    blocks_full: float  # blocks per sequence at full length (the mean, for mixed lengths)
