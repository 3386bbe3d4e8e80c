"""The GGUF export for llama.cpp: the rotary row order (numpy only), names and shapes; the file
itself when `gguf` is installed, and llama.cpp's greedy tokens when `llama_cpp` is (the `llamacpp`
extra; these skip without it)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.config import PRESETS
from engine.gguf_export import gguf_tensors, interleave_rope_rows


def _angles(d: int, position: int, theta: float = 10000.0) -> np.ndarray:
    return position / theta ** (np.arange(0, d, 2) / d)  # (D/2,)


def rope_halves(x: np.ndarray, position: int) -> np.ndarray:
    """Hugging Face's rotation of one head: element i turns with element i + D/2."""
    half = x.shape[0] // 2
    a = _angles(x.shape[0], position)
    x1, x2 = x[:half], x[half:]
    return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)])


def rope_pairs(x: np.ndarray, position: int) -> np.ndarray:
    """llama.cpp's `llama` rotation of one head: element 2i turns with element 2i + 1."""
    a = _angles(x.shape[0], position)
    even, odd = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2] = even * np.cos(a) - odd * np.sin(a)
    out[1::2] = odd * np.cos(a) + even * np.sin(a)
    return out


def test_interleaved_rows_make_llama_cpp_rotary_give_the_same_attention_scores() -> None:
    rng = np.random.default_rng(0)
    heads, d, width = 3, 8, 5
    wq, wk = rng.standard_normal((heads * d, width)), rng.standard_normal((heads * d, width))
    x_q, x_k = rng.standard_normal(width), rng.standard_normal(width)
    q_hf = (wq @ x_q).reshape(heads, d)
    k_hf = (wk @ x_k).reshape(heads, d)
    q_cpp = (interleave_rope_rows(wq, heads) @ x_q).reshape(heads, d)
    k_cpp = (interleave_rope_rows(wk, heads) @ x_k).reshape(heads, d)
    for h in range(heads):
        hf = rope_halves(q_hf[h], 7) @ rope_halves(k_hf[h], 3)
        cpp = rope_pairs(q_cpp[h], 7) @ rope_pairs(k_cpp[h], 3)
        assert np.isclose(hf, cpp)
        # and the reordering really matters: without it the scores differ
        assert not np.isclose(hf, rope_pairs(q_hf[h], 7) @ rope_pairs(k_hf[h], 3))


def _tiny_state() -> dict[str, np.ndarray]:
    from engine.model import Llama

    net = Llama(PRESETS["tiny"])
    net.init_random(0)
    return {k: v.numpy() for k, v in net.state_dict().items()}


def test_tensor_names_and_shapes_follow_llama_cpp() -> None:
    cfg = PRESETS["tiny"]
    out = gguf_tensors(_tiny_state(), cfg)
    assert "output.weight" not in out  # tied: llama.cpp falls back to the embedding
    assert out["token_embd.weight"].shape == (cfg.vocab_size, cfg.hidden_size)
    per_layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                 "ffn_up", "ffn_down"}
    assert {k.split(".")[2] for k in out if k.startswith("blk.0.")} == per_layer
    assert len(out) == 2 + cfg.num_hidden_layers * len(per_layer)
    assert out["blk.1.attn_k.weight"].shape == (cfg.num_key_value_heads * cfg.head_dim,
                                                cfg.hidden_size)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in out.values())


def test_the_file_reads_back(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    from engine.gguf_export import write_gguf

    cfg = PRESETS["tiny"]
    state = _tiny_state()
    write_gguf(tmp_path / "m.gguf", state, cfg)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(gguf_tensors(state, cfg))
    v = tensors["blk.0.attn_v.weight"]
    assert np.array_equal(np.asarray(v.data).reshape(-1),
                          state["model.layers.0.self_attn.v_proj.weight"].reshape(-1))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert (fields["llama.block_count"], fields["llama.attention.head_count_kv"],
            fields["llama.rope.freq_base"], len(fields["tokenizer.ggml.tokens"])) == (
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.rope_theta, cfg.vocab_size)
    assert fields["tokenizer.ggml.add_bos_token"] is False


def test_llama_cpp_greedy_tokens_match_the_engine() -> None:
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from engine import bench_llamacpp

    out = bench_llamacpp.run("tiny", quick=True, threads=1)
    assert all(out["greedy_match"]), (out["engine_tokens"], out["llama_cpp_tokens"])
    assert out["tpot_ms"]["llama_cpp"] > 0 and out["prefill_tok_s"]["llama_cpp"] > 0
