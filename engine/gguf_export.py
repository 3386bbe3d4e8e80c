"""Write the engine's model to an f32 GGUF file that llama.cpp loads as a `llama` architecture.

Used only by the llama.cpp benchmark (`engine.bench_llamacpp`), so `gguf` is a bench extra,
imported when `write_gguf` runs. Three things differ between the engine's (Hugging Face's) layout
and what llama.cpp expects:
- names: `model.layers.3.self_attn.q_proj.weight` is `blk.3.attn_q.weight`, and so on (`NAMES`);
- rotary layout: Hugging Face rotates the two halves of each head against each other (pair i with
  i + D/2); llama.cpp's `llama` rope rotates neighbours (pair 2i with 2i + 1). Reordering the rows
  of the query and key projections inside each head, so that row i + D/2 sits right after row i,
  makes the two rotations the same computation (`interleave_rope_rows`);
- the tokenizer: the engine has none. The file gets a placeholder SentencePiece-style vocabulary
  of the model's size (token i spelled `<i>`, 0-2 the usual unk/bos/eos), enough for llama.cpp to
  load it; the benchmark feeds token ids directly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ModelConfig

# Hugging Face names (inside layer i, or at the top) and llama.cpp's for the same tensors.
NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
# The rotated projections (inside layer i), and the ModelConfig field that counts their heads.
ROTATED_HEADS = {"self_attn.q_proj.weight": "num_attention_heads",
                 "self_attn.k_proj.weight": "num_key_value_heads"}


def interleave_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's output rows from halves (0..D/2-1, D/2..D-1) to pairs (0, D/2, 1,
    D/2+1, ...): (n_heads * D, in) -> the same shape."""
    rows, cols = weight.shape
    d = rows // n_heads
    # (head, half, i, in) -> (head, i, half, in): row i of the second half follows row i
    return np.ascontiguousarray(
        weight.reshape(n_heads, 2, d // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols))


def gguf_tensors(state: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """llama.cpp's tensor names and f32 arrays for a Hugging Face Llama state dict."""
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if name in TOP_NAMES:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # llama.cpp reads the embedding table when `output` is absent
            out[TOP_NAMES[name]] = value
            continue
        parts = name.split(".", 3)  # model, layers, i, the rest
        if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in NAMES:
            raise ValueError(f"no llama.cpp name for {name}")
        layer, rest = parts[2], parts[3]
        if rest in ROTATED_HEADS:
            value = interleave_rope_rows(value, getattr(cfg, ROTATED_HEADS[rest]))
        out[f"blk.{layer}.{NAMES[rest]}"] = value
    return out


def header(cfg: ModelConfig, gguf: Any) -> dict[str, Any]:
    """The file's header as `GGUFWriter.add_<key>(value)` calls: the model's shapes, then the
    placeholder vocabulary (token i spelled `<i>`; 0-2 unk, bos, eos). `gguf` is the module."""
    types = gguf.TokenType
    return {
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_hidden_layers,
        "feed_forward_length": cfg.intermediate_size,
        "head_count": cfg.num_attention_heads,
        "head_count_kv": cfg.num_key_value_heads,
        "key_length": cfg.head_dim,
        "value_length": cfg.head_dim,
        "rope_dimension_count": cfg.head_dim,
        "rope_freq_base": cfg.rope_theta,
        "layer_norm_rms_eps": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size,
        "file_type": gguf.LlamaFileType.ALL_F32,
        "tokenizer_model": "llama",
        "token_list": ["<unk>", "<s>", "</s>"] + [f"<{i}>" for i in range(3, cfg.vocab_size)],
        "token_scores": [0.0] * cfg.vocab_size,
        "token_types": [types.UNKNOWN, types.CONTROL, types.CONTROL]
                       + [types.NORMAL] * (cfg.vocab_size - 3),
        "unk_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "add_bos_token": False,  # the benchmark's prompts are token ids, used as given
    }


def write_gguf(path: Path, state: dict[str, np.ndarray], cfg: ModelConfig) -> None:
    """Write `state` (Hugging Face names, (out, in) matrices) and `cfg` as an f32 GGUF file."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in header(cfg, gguf).items():
        getattr(writer, f"add_{key}")(value)
    for name, value in gguf_tensors(state, cfg).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
