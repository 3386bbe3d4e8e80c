"""The Hugging Face peer: a `LlamaForCausalLM` holding exactly the engine model's weights.

Used by the peer-equivalence tests and the benchmark, never by the serving path; transformers is a
test extra, imported only when this module's function runs.
"""
from __future__ import annotations

import torch

from engine.model import Llama


def hf_llama_like(model: Llama, attn_implementation: str = "sdpa"):
    """Build a transformers Llama with the same config and a copy of `model`'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
        attn_implementation=attn_implementation)
    param = next(model.parameters())
    peer = LlamaForCausalLM(hf_config).to(device=param.device, dtype=param.dtype)
    # The engine keeps some weights as transposed views; copy them into plain tensors.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    missing, unexpected = peer.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"peer weights do not line up: missing {missing}, extra {unexpected}")
    return peer.eval()


@torch.inference_mode()
def hf_greedy(peer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from the peer for one prompt, exactly max_new_tokens of them."""
    device = next(peer.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out = peer.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                        eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
