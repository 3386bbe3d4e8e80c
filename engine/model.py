"""A Llama-style decoder that reads and writes a paged KV cache.

RMSNorm, rotary position embeddings (Hugging Face's rotate-half layout), grouped-query attention and
a SwiGLU MLP. Module and parameter names mirror Hugging Face's `LlamaForCausalLM.state_dict()`, so
its checkpoints load unchanged. The forward pass works on a flat list of tokens from many sequences:
`AttentionMetadata` (engine.kv_cache) says which tokens are decodes (one per sequence, first in the
list) and which are prefill chunks, where each token's K/V goes in the cache, which block table
each sequence reads through, and which kernel decodes attend with.

The model knows one way to run: torch, op by op. Whether a step runs here at all (or as a CUDA
graph replay, or as the numpy decode step) and which decode-attention kernel it uses is chosen by
the runner (`engine.runner.choose_path`); where the CPU keeps the weights, by
`engine.kernels.cpu_backend`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.kv_cache import AttentionMetadata, KVCache

# Memory for one weight matrix: (rows, cols) -> an empty tensor of that shape, in any layout.
Allocate = Callable[[int, int], torch.Tensor]


def plain_allocator(like: torch.Tensor) -> Allocate:
    """Ordinary (rows, cols) allocations on `like`'s device and dtype."""
    return lambda rows, cols: torch.empty(rows, cols, dtype=like.dtype, device=like.device)


def fuse_linears(linears: list[nn.Linear], allocate: Allocate) -> torch.Tensor:
    """One (sum of outs, in) weight for several bias-free linears that read the same input.

    Each linear's weight is rebound as a view into the fused tensor, so `state_dict` keeps Hugging
    Face's names and shapes while the forward pass runs one matrix product instead of several.
    """
    rows = sum(m.weight.shape[0] for m in linears)
    fused = allocate(rows, linears[0].weight.shape[1])
    with torch.no_grad():
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            fused[start:start + n].copy_(m.weight)
            m.weight.data = fused[start:start + n]
            start += n
    return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op where no dtype round trip is needed
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32, as Hugging Face does, so bf16 runs match its numerics.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables for every position up to the model's maximum, built once."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_pos, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_pos, D)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `positions`: (N,) -> two (N, 1, D), looked up once per step."""
        return (self.cos[positions][:, None, :].to(dtype),
                self.sin[positions][:, None, :].to(dtype))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embeddings to x: (N, H, D), in Hugging Face's rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.d_head = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                cfg.head_dim)
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.d_head, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.d_head, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.d_head, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.d_head, d, bias=False)
        self.scale = self.d_head ** -0.5
        self.fuse(plain_allocator(self.q_proj.weight))

    def fuse(self, allocate: Allocate) -> None:
        # A non-persistent buffer: moved by .to() with the module, absent from state_dict.
        self.register_buffer("qkv_weight", fuse_linears(
            [self.q_proj, self.k_proj, self.v_proj], allocate), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        hq, hkv = self.n_heads * self.d_head, self.n_kv * self.d_head
        qkv = F.linear(x, self.qkv_weight)  # (N, hq + 2 * hkv)
        qk = rotate(qkv[:, :hq + hkv].view(n, self.n_heads + self.n_kv, self.d_head), cos, sin)
        q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]  # (N, Hq, D), (N, Hkv, D)
        v = qkv[:, hq + hkv:].view(n, self.n_kv, self.d_head)
        k_cache.view(-1, self.n_kv, self.d_head).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, self.n_kv, self.d_head).index_copy_(0, meta.slot_mapping, v)

        out = torch.empty_like(q)  # (N, Hq, D)
        nd = meta.num_decodes
        if nd:
            out[:nd] = meta.decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                             meta.decode_context_lens, self.scale)
        for chunk in meta.prefills:
            s, c = chunk.start, chunk.length
            if chunk.context_len == c:
                ks, vs = k[s:s + c], v[s:s + c]  # nothing cached before: use the fresh K/V
            else:
                ks = k_cache[chunk.block_table].view(-1, self.n_kv, self.d_head)[:chunk.context_len]
                vs = v_cache[chunk.block_table].view(-1, self.n_kv, self.d_head)[:chunk.context_len]
            out[s:s + c] = self._causal(q[s:s + c], ks, vs)
        return F.linear(out.view(n, self.n_heads * self.d_head), self.o_proj.weight)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the last q.shape[0] positions over all of k/v: (C, Hq, D)."""
        c, t = q.shape[0], k.shape[0]
        group = self.n_heads // self.n_kv
        qh = q.transpose(0, 1)  # (Hq, C, D)
        kh = k.transpose(0, 1).repeat_interleave(group, dim=0)  # (Hq, T, D)
        vh = v.transpose(0, 1).repeat_interleave(group, dim=0)
        if c == t:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale)
        else:
            # Query i sits at position t - c + i and may see keys 0..t - c + i.
            allowed = (torch.arange(t, device=q.device)[None, :]
                       <= torch.arange(t - c, t, device=q.device)[:, None])  # (C, T)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=self.scale)
        return o.transpose(0, 1)  # (C, Hq, D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fuse(plain_allocator(self.gate_proj.weight))

    def fuse(self, allocate: Allocate) -> None:
        self.register_buffer("gate_up_weight", fuse_linears(
            [self.gate_proj, self.up_proj], allocate), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)  # (N, F) each
        return F.linear(F.silu(gate) * up, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Backbone(nn.Module):
    """Named `model` inside `Llama`, as in Hugging Face, so state_dict keys line up."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(cfg)

    def init_random(self, seed: int) -> None:
        """Seeded normal weights (std = initializer_range), unit norms: the default model."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * self.config.initializer_range)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                meta: AttentionMetadata, logit_index: torch.Tensor) -> torch.Tensor:
        """Run the flat batch, write its K/V, return logits at `logit_index`: (M, vocab)."""
        h = F.embedding(input_ids, self.model.embed_tokens.weight)  # (N, d)
        cos, sin = self.rotary(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin,
                                    cache.k[i], cache.v[i], meta)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.norm(h[logit_index])  # (M, d)
        return F.linear(h, self.lm_head.weight).float()  # (M, vocab)

    def fuse_weights(self, allocate: Allocate | None = None) -> "Llama":
        """Fuse q/k/v and gate/up into single matrices again, in memory from `allocate` (plain
        allocations by default). Needed after `.to()`, which copies the fused buffers apart from
        the parameters they were views of. Returns the model."""
        allocate = allocate or plain_allocator(self.lm_head.weight)
        for layer in self.model.layers:
            layer.self_attn.fuse(allocate)
            layer.mlp.fuse(allocate)
        return self

    def weight_bytes(self) -> int:
        """Bytes a decode step reads for weights: all parameters (a tied matrix once), less an
        untied embedding table, of which a step reads only a few rows."""
        total = sum(p.nbytes for p in self.parameters())
        if not self.config.tie_word_embeddings:
            total -= self.model.embed_tokens.weight.nbytes
        return total
