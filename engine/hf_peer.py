"""The Hugging Face peer: a `LlamaForCausalLM` holding exactly the engine model's weights.

Used by the peer-equivalence tests and the benchmark, never by the serving path; transformers is a
test extra, imported only when this module's functions run. The benchmark's peer runs in a child
process of its own (`run_peer`, `engine/hf_child.py`) so that the engine's thread settings do not
slow it; tests build one in-process (`hf_llama_like`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.hf_child import hf_greedy  # noqa: F401  (the peer tests' greedy reference)
from engine.model import Llama

CHILD = Path(__file__).with_name("hf_child.py")


def hf_config_dict(c: ModelConfig) -> dict[str, Any]:
    """`LlamaConfig` keyword arguments for the engine's model shapes."""
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=None, eos_token_id=None, pad_token_id=0)


def plain_state(model: Llama) -> dict[str, torch.Tensor]:
    """The model's state_dict in plain tensors of their own (the engine keeps its CPU weights as
    views into one arena, q/k/v and gate/up as slices of fused matrices); a tied LM head once,
    as the embedding."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def hf_llama_like(model: Llama, attn_implementation: str = "sdpa"):
    """Build a transformers Llama with the same config and a copy of `model`'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(**hf_config_dict(model.config), attn_implementation=attn_implementation)
    param = next(model.parameters())
    peer = LlamaForCausalLM(hf_config).to(device=param.device, dtype=param.dtype)
    missing, unexpected = peer.load_state_dict(plain_state(model), strict=False)
    missing = [k for k in missing if not (k.endswith("rotary_emb.inv_freq") or (
        k == "lm_head.weight" and model.config.tie_word_embeddings))]
    if missing or unexpected:
        raise RuntimeError(f"peer weights do not line up: missing {missing}, extra {unexpected}")
    peer.tie_weights()
    return peer.eval()


def run_peer(model: Llama, jobs: list[dict], timeout_s: float = 3600) -> dict[str, Any]:
    """Run `jobs` (see `engine.hf_child.run_jobs`) on a Hugging Face copy of `model` in a child
    process that never imports `engine`, with torch's default threads; returns its JSON."""
    from safetensors.torch import save_file

    param = next(model.parameters())
    with tempfile.TemporaryDirectory(prefix="hf-peer-") as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(hf_config_dict(model.config)))
        save_file(plain_state(model), str(folder / "model.safetensors"))
        (folder / "jobs.json").write_text(json.dumps({
            "device": str(param.device), "dtype": str(param.dtype).removeprefix("torch."),
            "jobs": jobs}))
        return run_child(CHILD, folder, timeout_s)


def run_child(script: Path, folder: Path, timeout_s: float) -> dict[str, Any]:
    """Run `script` with `folder` as its argument in a fresh interpreter that does not import
    `engine`, and return the JSON object it prints last.

    The script runs through runpy from inside `folder`, so neither the repository nor the
    script's own directory (`engine/`) is on its `sys.path`, where a module of ours could shadow
    a library's. The entry points set OMP_WAIT_POLICY for the engine's own threads
    (`engine.cpu_threads.quiet_openmp`); the child gets OpenMP's default, as it would outside
    this project."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    launcher = ("import runpy, sys; sys.argv = sys.argv[1:]; "  # argv as if run as a file
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", launcher, str(script), str(folder)], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
