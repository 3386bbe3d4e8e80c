"""A Llama-style decoder that reads and writes a paged KV cache.

RMSNorm, rotary position embeddings (Hugging Face's rotate-half layout), grouped-query attention and
a SwiGLU MLP. Module and parameter names mirror Hugging Face's `LlamaForCausalLM.state_dict()`, so
its checkpoints load unchanged. The forward pass works on a flat list of tokens from many sequences:
`AttentionMetadata` says which tokens are decodes (one per sequence, first in the list) and which
are prefill chunks, where each token's K/V goes in the cache, and which block table each sequence
reads through.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.hugepages import HugePageArena
from engine.kernels.cpu_decode import CpuDecoder
from engine.kernels.paged_attention import paged_decode_attention


@dataclass
class PrefillChunk:
    """One sequence's prefill chunk inside the flat token list."""

    start: int  # offset of the chunk's first token in the flat batch
    length: int  # tokens in the chunk
    context_len: int  # tokens cached for this sequence once the chunk is written
    block_table: torch.Tensor  # (n_blocks,) physical block ids


@dataclass
class AttentionMetadata:
    """How the flat token batch maps onto sequences and cache slots."""

    slot_mapping: torch.Tensor  # (N,) flat cache slot for each token's K/V
    num_decodes: int  # the first num_decodes tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor | None  # (num_decodes, max_blocks)
    decode_context_lens: torch.Tensor | None  # (num_decodes,) including the new token
    prefills: list[PrefillChunk]


class KVCache:
    """Per-layer K and V pages: (num_blocks, block_size, n_kv_heads, d_head) each."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                 cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, NB, P, Hkv, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, for a weight stored (out, in). On the CPU this is torch's BLAS (MKL on x86),
    on torch's thread pool, which `engine.cpu_threads` sizes during runs."""
    return F.linear(x, weight)


# Makes an empty (rows, cols) weight; with `transposed`, stored (cols, rows) in memory.
Place = Callable[[int, int, bool], torch.Tensor]


def plain_place(like: torch.Tensor) -> Place:
    """Ordinary allocations on `like`'s device and dtype."""
    def place(rows: int, cols: int, transposed: bool) -> torch.Tensor:
        shape = (cols, rows) if transposed else (rows, cols)
        t = torch.empty(shape, dtype=like.dtype, device=like.device)
        return t.t() if transposed else t
    return place


def fuse_linears(linears: list[nn.Linear], place: Place, transposed: bool) -> torch.Tensor:
    """One (sum of outs, in) weight for several bias-free linears that read the same input.

    Each linear's weight is rebound as a view into the fused tensor, so `state_dict` keeps Hugging
    Face's names and shapes while the forward pass runs one matrix product instead of several.
    """
    rows = sum(m.weight.shape[0] for m in linears)
    fused = place(rows, linears[0].weight.shape[1], transposed)
    with torch.no_grad():
        start = 0
        for m in linears:
            n = m.weight.shape[0]
            fused[start:start + n].copy_(m.weight)
            m.weight.data = fused[start:start + n]
            start += n
    return fused


def move_weight(linear: nn.Linear, place: Place, transposed: bool) -> None:
    """Rebind a linear's weight to memory from `place`, in the layout asked for."""
    with torch.no_grad():
        moved = place(*linear.weight.shape, transposed)
        moved.copy_(linear.weight)
        linear.weight.data = moved


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
        self.fuse(plain_place(self.q_proj.weight), transposed=False)

    def fuse(self, place: Place, transposed: bool) -> None:
        # A non-persistent buffer: moved by .to() with the module, absent from state_dict.
        self.register_buffer("qkv_weight", fuse_linears(
            [self.q_proj, self.k_proj, self.v_proj], place, transposed), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        hq, hkv = self.n_heads * self.d_head, self.n_kv * self.d_head
        qkv = linear(x, self.qkv_weight)  # (N, hq + 2 * hkv)
        qk = rotate(qkv[:, :hq + hkv].view(n, self.n_heads + self.n_kv, self.d_head), cos, sin)
        q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]  # (N, Hq, D), (N, Hkv, D)
        v = qkv[:, hq + hkv:].view(n, self.n_kv, self.d_head)
        k_cache.view(-1, self.n_kv, self.d_head).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, self.n_kv, self.d_head).index_copy_(0, meta.slot_mapping, v)

        out = torch.empty_like(q)  # (N, Hq, D)
        nd = meta.num_decodes
        if nd:
            out[:nd] = paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                              meta.decode_context_lens, self.scale)
        for chunk in meta.prefills:
            s, c = chunk.start, chunk.length
            if chunk.context_len == c:
                ks, vs = k[s:s + c], v[s:s + c]  # nothing cached before: use the fresh K/V
            else:
                ks = k_cache[chunk.block_table].view(-1, self.n_kv, self.d_head)[:chunk.context_len]
                vs = v_cache[chunk.block_table].view(-1, self.n_kv, self.d_head)[:chunk.context_len]
            out[s:s + c] = self._causal(q[s:s + c], ks, vs)
        return linear(out.view(n, self.n_heads * self.d_head), self.o_proj.weight)

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
        self.fuse(plain_place(self.gate_proj.weight), transposed=False)

    def fuse(self, place: Place, transposed: bool) -> None:
        self.register_buffer("gate_up_weight", fuse_linears(
            [self.gate_proj, self.up_proj], place, transposed), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)  # (N, F) each
        return linear(F.silu(gate) * up, self.down_proj.weight)


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
        self.register_buffer("embed_rows", None, persistent=False)  # a row-major copy, see prepare()
        self.cpu_decoder: CpuDecoder | None = None  # set by prepare() for fp32 CPU serving

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
        if self.cpu_decoder is not None and not meta.prefills:
            logits = self.cpu_decoder(
                input_ids.numpy(), positions.numpy(), meta.slot_mapping.numpy(),
                meta.decode_block_tables.numpy(), meta.decode_context_lens.numpy(),
                cache.k.numpy(), cache.v.numpy())
            return torch.from_numpy(logits)[logit_index]
        table = self.model.embed_tokens.weight if self.embed_rows is None else self.embed_rows
        h = F.embedding(input_ids, table)  # (N, d)
        cos, sin = self.rotary(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin,
                                    cache.k[i], cache.v[i], meta)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.norm(h[logit_index])  # (M, d)
        return linear(h, self.lm_head.weight).float()  # (M, vocab)

    def prepare(self) -> "Llama":
        """Ready loaded weights for serving: fuse q/k/v and gate/up into single matrices, so that
        a step reads each input once (parameters keep Hugging Face's names and (out, in) shapes,
        as views). On the CPU every matrix moves into huge-page memory (`engine.hugepages`),
        stored (in, out): torch's CPU BLAS multiplied a decode step's rows by the 33 matrices of
        `cpu-30m` in 6.7 against 7.7 ms at batch 1, 10.3 against 14.1 at batch 4 and 23.2
        against 27.6 at batch 32 stored that way (one thread, CPU time; about equal at 2 and 16).
        An fp32 model gets its numpy decode step (`engine.kernels.cpu_decode`), with one product
        object per matrix, made here once."""
        weight = self.lm_head.weight
        cpu = weight.device.type == "cpu"
        place = self._arena_place() if cpu else plain_place(weight)
        for layer in self.model.layers:
            layer.self_attn.fuse(place, transposed=cpu)
            layer.mlp.fuse(place, transposed=cpu)
            if cpu:
                move_weight(layer.self_attn.o_proj, place, transposed=True)
                move_weight(layer.mlp.down_proj, place, transposed=True)
        if cpu:  # tied or not: the LM head is the biggest single matrix
            move_weight(self.lm_head, place, transposed=True)
            if self.config.tie_word_embeddings:
                # Token lookups read rows; a transposed table would scatter every one of them.
                self.embed_rows = self.model.embed_tokens.weight.detach().contiguous()
        if cpu and weight.dtype == torch.float32:
            self.cpu_decoder = CpuDecoder(self)  # views of the weights as they are now laid out
        return self

    def _arena_place(self) -> Place:
        """Placement from one huge-page arena sized for every matrix a decode step reads."""
        dtype = self.lm_head.weight.dtype
        linears = [self.lm_head] + [m for layer in self.model.layers for m in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
            layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
        # Fused matrices are one allocation each, so per-linear sizes plus alignment bound them.
        arena = HugePageArena(sum(HugePageArena.size_of(m.weight.shape, dtype) for m in linears))
        return lambda rows, cols, transposed: arena.empty(rows, cols, dtype, transposed)

    def weight_bytes(self) -> int:
        """Bytes a decode step reads for weights: all parameters (a tied matrix once), less an
        untied embedding table, of which a step reads only a few rows."""
        total = sum(p.nbytes for p in self.parameters())
        if not self.config.tie_word_embeddings:
            total -= self.model.embed_tokens.weight.nbytes
        return total
