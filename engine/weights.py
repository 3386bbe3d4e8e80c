"""Build the model: a named preset with seeded random weights, or a local Hugging Face checkpoint.

A checkpoint directory holds `config.json` and one or more `*.safetensors` files, as
`LlamaForCausalLM.save_pretrained` writes them. Nothing is fetched from a hub. Every way a
checkpoint can be wrong becomes one `ConfigError` that names the file and the problem.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

from engine.config import ConfigError, ModelConfig, dtype_for, preset
from engine.kernels import cpu_backend
from engine.model import Llama

_HF_KEYS = {f.name for f in fields(ModelConfig)}


def config_from_hf(raw: dict, source: str) -> ModelConfig:
    """Map a Hugging Face Llama `config.json` onto ModelConfig."""
    arch = raw.get("model_type")
    if arch not in (None, "llama"):
        raise ConfigError(f"{source}: model_type {arch!r} is not a Llama-style model")
    try:
        kwargs = {k: raw[k] for k in _HF_KEYS if k in raw and raw[k] is not None}
        kwargs.setdefault("num_key_value_heads", raw["num_attention_heads"])
        kwargs.setdefault("head_dim", raw["hidden_size"] // raw["num_attention_heads"])
        # transformers >= 5 writes rope_theta inside `rope_parameters`, not at the top level;
        # reading only the top level silently fell back to 10000 for every such checkpoint.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope parameters {rope!r} are not a JSON object")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{source}: rope scaling {rope!r} is not supported by this engine")
        if rope.get("rope_theta") is not None:
            kwargs["rope_theta"] = rope["rope_theta"]
        # The model has no biases and only SwiGLU; loading such a checkpoint anyway would drop
        # tensors without a word and compute something else.
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ConfigError(f"{source}: attention or MLP biases are not supported by this engine")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported "
                              "(the engine's MLP is SwiGLU)")
        return ModelConfig(**kwargs)
    except KeyError as missing:
        raise ConfigError(f"{source}: missing required key {missing}") from None
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_model(model: str, seed: int, device: torch.device, dtype: torch.dtype | None = None,
               override: ModelConfig | None = None) -> Llama:
    """A preset name gives seeded random weights; a directory path loads its checkpoint.

    `dtype` defaults to the device's (`engine.config.dtype_for`)."""
    dtype = dtype or getattr(torch, dtype_for(device.type))
    path = Path(model)
    if override is None and path.is_dir():
        return _ready(_load_checkpoint(path), device, dtype)
    if override is None and ("/" in model or path.exists()):
        raise ConfigError(f"{model!r} is not a checkpoint directory (and not a preset name)")
    net = Llama(override or preset(model))
    net.init_random(seed)
    return _ready(net, device, dtype)


def _ready(net: Llama, device: torch.device, dtype: torch.dtype) -> Llama:
    """The model on `device` in `dtype`, for inference, its matrices laid out for the device."""
    net = net.to(device=device, dtype=dtype).eval()
    if device.type == "cpu":
        return cpu_backend.lay_out_weights(net)
    return net.fuse_weights()  # `.to()` copied the fused matrices apart from their parameters


def read_checkpoint_config(path: Path) -> ModelConfig:
    """A checkpoint directory's `config.json` as a ModelConfig; the weights are not read."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{path}: no config.json (expected a save_pretrained directory)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg_file}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(raw, dict):  # valid JSON but not an object: .get below would crash
        raise ConfigError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    return config_from_hf(raw, str(cfg_file))


def _load_checkpoint(path: Path) -> Llama:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_checkpoint_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{f}: cannot read weights ({err})") from None
    net = Llama(cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state.get("model.embed_tokens.weight", torch.empty(0))
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise ConfigError(f"{path}: {name} has shape {tuple(state[name].shape)}, "
                              f"config.json implies {tuple(tensor.shape)}")
    net.load_state_dict({k: state[k] for k in expected}, strict=True)
    return net
