"""Configuration: model shapes, named presets and the engine's knobs, each checked on creation.

A `ConfigError` is the one exception the engine raises for input a user got wrong; the CLI turns it
into one line on stderr and exit code 2, and the lab turns it into a notice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run, with a message meant for the person who asked for it."""


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a Llama-style decoder; field names follow Hugging Face's `LlamaConfig`."""

    vocab_size: int = 8192  # small vocab keeps the LM head from dominating a 30M model
    hidden_size: int = 512
    intermediate_size: int = 1408  # about 8/3 * hidden, rounded to a multiple of 64 (SwiGLU)
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4  # grouped-query attention: 2 query heads share one KV head
    head_dim: int = 64
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    def num_params(self) -> int:
        """Parameter count, embeddings counted once when tied."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_hidden_layers * per_layer + d + head

    def kv_bytes_per_token(self, bytes_per_elem: int) -> int:
        """K and V for one token across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * bytes_per_elem

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # Tests: small enough that a Hugging Face peer check runs in a second on a CPU.
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=8192),
    # The lab's interactive default on a CPU: runs of a few hundred steps take seconds.
    "cpu-8m": ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=704,
                          num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64),
    # The CLI and benchmark default on a CPU (about 30M parameters).
    "cpu-30m": ModelConfig(),
    # The GPU preset, shaped like a 1B Llama (about 1.0B parameters with tied embeddings).
    "gpu-1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=64, rope_theta=500000.0),
}


def preset(name: str) -> ModelConfig:
    """Look a preset up by name, or say which names exist."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} "
                          "or give a checkpoint directory") from None


POLICIES = ("continuous", "static")

# Bytes per element of each dtype `dtype_for` names, for memory sums made without torch.
ELEMENT_BYTES = {"bfloat16": 2, "float32": 4}


def dtype_for(device_type: str) -> str:
    """The torch dtype, by name, that weights and the KV cache take on this kind of device.

    bf16 on CUDA: tensor cores multiply it at full rate and the cache holds twice the tokens.
    fp32 elsewhere: few CPUs multiply bf16 fast, and the CPU's numpy decode step is written for
    fp32. Torch code turns the name into a dtype with `getattr(torch, dtype_for(...))`.
    """
    return "bfloat16" if device_type == "cuda" else "float32"


def element_bytes(device_type: str) -> int:
    """Bytes per weight or KV element on this kind of device (see `dtype_for`)."""
    return ELEMENT_BYTES[dtype_for(device_type)]


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs: which model where, how KV memory is paged, how requests are batched."""

    model: str = "cpu-30m"  # a preset name or a checkpoint directory
    device: str = "auto"  # auto picks cuda when present, else cpu
    seed: int = 0  # seeds random weights and sampling
    block_size: int = 16  # tokens per KV page; vLLM's default
    kv_budget_bytes: int | None = None  # KV cache size; None picks a device-dependent default
    max_num_seqs: int = 8  # most sequences in one batch
    max_num_batched_tokens: int = 512  # token budget per step; caps a prefill chunk
    policy: str = "continuous"  # continuous (iteration-level) or static (request-level)
    chunked_prefill: bool = True  # split long prompts across steps, decodes go first
    max_model_len: int | None = None  # longest prompt + output; None takes the model's maximum
    # Replay pure-decode steps as captured CUDA graphs (CUDA with triton only): a small model's
    # decode step is otherwise paced by its hundreds of kernel launches, not by memory.
    cuda_graphs: bool = True
    model_config: ModelConfig | None = field(default=None, compare=False)  # overrides the preset

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"page size must be at least 1 token, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be at least 1, got "
                              f"{self.max_num_batched_tokens}")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes <= 0:
            raise ConfigError(f"KV budget must be positive, got {self.kv_budget_bytes} bytes")
        # Checked here because the engine reads `max_model_len or <model maximum>`: a 0 would
        # silently mean "no limit" and a negative value would reject every request.
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be at least 1, got {self.max_model_len}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("model_config")
        return out


@dataclass(frozen=True)
class SLO:
    """Latency targets a request must meet to count towards goodput; None means no limit."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} SLO must be a positive number of milliseconds")
