"""Paged attention against a plain contiguous forward pass, in fp32.

The reference below is written from scratch over the same `Llama` module's weights: full causal
attention over a sequence's whole token list, no cache at all. The engine's path runs through
`BlockManager` block tables, `ModelRunner` slot mappings and the paged KV cache, in (a) one whole
prefill and (b) a prefix, then chunks, then token-by-token decodes, mixed in one batch with another
sequence. Block ids are deliberately non-contiguous and the cache starts full of garbage, so a slot
read that should not happen shows up in the logits.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from engine.block_manager import BlockManager
from engine.config import PRESETS
from engine.kv_cache import KVCache
from engine.model import Llama
from engine.records import RequestRecord
from engine.runner import ModelRunner
from engine.scheduler import Batch
from engine.sequence import Sequence
from engine.weights import load_model

# A larger init than the preset's so logits spread over several units and 1e-4 is a real bound.
CFG = replace(PRESETS["tiny"], initializer_range=0.3)
ATOL = 1e-4
PROMPT_LEN = 13  # divisible by none of the page sizes below except 1


@pytest.fixture(scope="module")
def model() -> Llama:
    return load_model("tiny", 0, torch.device("cpu"), torch.float32, CFG)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on x: (T, H, D) at positions 0..T-1."""
    t, _, d = x.shape
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv)  # (T, D/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :].float()  # (T, 1, D)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :].float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@torch.no_grad()
def reference_logits(model: Llama, token_ids: list[int]) -> torch.Tensor:
    """Contiguous causal forward over the whole sequence: (T, vocab)."""
    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ids = torch.tensor(token_ids)
    t = len(token_ids)
    h = model.model.embed_tokens.weight[ids]  # (T, hidden)
    mask = torch.ones(t, t, dtype=torch.bool).tril()  # (T, T) query row sees key columns <= row
    for layer in model.model.layers:
        att = layer.self_attn
        x = _rms(h, layer.input_layernorm.weight, cfg.rms_norm_eps)
        q = _rope(F.linear(x, att.q_proj.weight).view(t, hq, d), cfg.rope_theta)
        k = _rope(F.linear(x, att.k_proj.weight).view(t, hkv, d), cfg.rope_theta)
        v = F.linear(x, att.v_proj.weight).view(t, hkv, d)
        k = k.repeat_interleave(hq // hkv, dim=1)  # (T, Hq, D)
        v = v.repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5  # (Hq, T, T)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", probs, v).reshape(t, hq * d)
        h = h + F.linear(o, att.o_proj.weight)
        x = _rms(h, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        mlp = layer.mlp
        gate, up = F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight)
        h = h + F.linear(F.silu(gate) * up, mlp.down_proj.weight)
    return F.linear(_rms(h, model.model.norm.weight, cfg.rms_norm_eps), model.lm_head.weight)


class CapturingModel:
    """Stands in for the model inside ModelRunner: asks for logits at every flat row, keeps them."""

    def __init__(self, model: Llama) -> None:
        self.model = model
        self.last: torch.Tensor | None = None

    def __call__(self, ids, positions, cache, meta, logit_index):
        self.last = self.model(ids, positions, cache, meta, torch.arange(len(ids)))  # (N, vocab)
        return self.last[logit_index]


class Harness:
    """Drives ModelRunner step by step with hand-made batches, as the scheduler would."""

    def __init__(self, model: Llama, block_size: int, num_blocks: int = 64) -> None:
        self.blocks = BlockManager(num_blocks, block_size)
        self.cache = KVCache(model.config, num_blocks, block_size, torch.float32,
                             torch.device("cpu"))
        gen = torch.Generator().manual_seed(1)
        self.cache.k.copy_(torch.randn(self.cache.k.shape, generator=gen) * 50)  # garbage, finite
        self.cache.v.copy_(torch.randn(self.cache.v.shape, generator=gen) * 50)
        self.capture = CapturingModel(model)
        # The torch path: the numpy decode step is checked against it in test_cpu_decode.py.
        self.runner = ModelRunner(self.capture, self.cache, self.blocks, torch.device("cpu"),
                                  numpy_decode=False)
        self.logits: dict[tuple[int, int], torch.Tensor] = {}  # (seq id, position) -> (vocab,)

    def step(self, items: list[tuple[Sequence, int]]) -> None:
        for seq, n in items:
            self.blocks.allocate(seq.id, seq.num_computed + n)
        # The runner puts decodes first; rebuild its row order to know which row is whose.
        order = sorted(items, key=lambda it: not it[0].is_decode)
        rows = [(seq.id, pos) for seq, n in order for pos in range(seq.num_computed,
                                                                    seq.num_computed + n)]
        sampled = self.runner.run(Batch(items=list(items)))
        for row, key in enumerate(rows):
            self.logits[key] = self.capture.last[row]
        for seq, n in items:
            seq.num_computed += n
            if seq.id in sampled:
                seq.append(sampled[seq.id], 0.0)

    def check(self, model: Llama, seq: Sequence) -> int:
        """Compare every position the engine computed for `seq` with the reference; count them."""
        ref = reference_logits(model, seq.token_ids)
        positions = sorted(p for s, p in self.logits if s == seq.id)
        assert positions == list(range(seq.num_computed))
        got = torch.stack([self.logits[(seq.id, p)] for p in positions])
        torch.testing.assert_close(got, ref[:len(positions)], atol=ATOL, rtol=0)
        # Every sampled token is the reference's greedy choice at the position before it.
        prompt = len(seq.record.prompt_ids)
        for i, tok in enumerate(seq.record.output_ids):
            assert tok == int(ref[prompt - 1 + i].argmax())
        return len(positions)


def _seq(seq_id: int, length: int, seed: int) -> Sequence:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, CFG.vocab_size, (length,), generator=gen).tolist()
    return Sequence(RequestRecord(id=seq_id, prompt_ids=prompt, max_tokens=100, arrival_s=0.0))


def _is_contiguous(table: list[int]) -> bool:
    return table == list(range(table[0], table[0] + len(table)))


def test_reference_is_not_trivially_flat(model: Llama) -> None:
    """The logits spread widely, so an atol of 1e-4 compares something."""
    ref = reference_logits(model, _seq(0, PROMPT_LEN, 0).token_ids)
    assert ref.std() > 1.0
    assert len(set(ref.argmax(-1).tolist())) > 3


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_one_prefill_matches_contiguous(model: Llama, block_size: int) -> None:
    h = Harness(model, block_size)
    other = _seq(99, 2 * block_size + 1, 5)
    h.blocks.allocate(other.id, other.num_tokens)  # someone else holds the first blocks
    seq = _seq(0, PROMPT_LEN, 0)
    h.step([(seq, seq.num_tokens)])
    assert h.blocks.block_tables[seq.id][0] != 0
    assert h.check(model, seq) == PROMPT_LEN


@pytest.mark.parametrize("block_size", [1, 3, 4, 5, 16])
def test_chunked_prefill_and_decode_match_contiguous(model: Llama, block_size: int) -> None:
    h = Harness(model, block_size)
    # Rotate the free list: a filler takes the first blocks and gives them back at the end.
    filler = _seq(98, 3 * block_size, 7)
    h.blocks.allocate(filler.id, filler.num_tokens)
    a = _seq(0, PROMPT_LEN, 0)
    b = _seq(1, PROMPT_LEN + 4, 1)
    h.step([(a, 5)])  # prefix of a
    h.blocks.free(filler.id)
    h.step([(a, 4), (b, 3)])  # chunk of a, prefix of b
    h.step([(a, a.remaining), (b, 6)])  # a's prefill ends (samples), b's continues
    h.step([(a, 1), (b, b.remaining)])  # a decodes, b's prefill ends (samples)
    for _ in range(2 * block_size + 3):  # both decode across several page boundaries
        h.step([(b, 1), (a, 1)])
    h.step([(a, 1)])
    # Interleaved growth must have produced scattered tables, or this test proves little.
    tables = h.blocks.block_tables
    assert not (_is_contiguous(tables[a.id]) and _is_contiguous(tables[b.id]))
    assert tables[a.id][0] != 0  # the filler pushed a off block 0
    assert h.check(model, a) == a.num_computed
    assert h.check(model, b) == b.num_computed
    assert len(a.record.output_ids) == 2 * block_size + 6
    assert len(b.record.output_ids) == 2 * block_size + 4


def test_single_token_chunks_match_contiguous(model: Llama) -> None:
    """The whole prompt fed one token at a time through the prefill (not decode) path."""
    h = Harness(model, block_size=4)
    seq = _seq(0, 9, 3)
    for _ in range(9):
        h.step([(seq, 1)])
    h.step([(seq, 1)])
    assert h.check(model, seq) == 10
