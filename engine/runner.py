"""Turn a scheduled batch into inputs, choose how the step runs, run it, and sample.

The only module between bookkeeping and torch: it reads block tables from the block manager to build
slot mappings and per-sequence tables, puts decodes first in the flat batch (the model's attention
expects that), and returns a token (chosen by `engine.sampler`) for every sequence whose chunk
reached its last token.

It is also the one place that decides how a step runs (`choose_path`). The model, the kernels and
the CUDA graphs each know one way to compute; none of them knows the others exist.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.block_manager import BlockManager, blocks_for, pad_tables
from engine.cuda_graphs import DecodeGraphs
from engine.kernels.cpu_decode import CpuDecoder
from engine.kernels.paged_attention import paged_decode_attention_ref
from engine.kv_cache import AttentionMetadata, DecodeAttention, KVCache, PrefillChunk
from engine.model import Llama
from engine.sampler import sample
from engine.scheduler import Batch
from engine.sequence import Sequence


class ExecutionPath(enum.Enum):
    """The ways one step can run."""

    DECODE_GRAPHS = "decode graphs"  # decodes only, padded up a ladder; a CUDA graph replays them
    NUMPY_DECODE = "numpy decode"  # decodes only, fp32 on the CPU: engine.kernels.cpu_decode
    TORCH_TRITON = "torch, Triton attention"  # the model op by op; decodes attend with Triton
    TORCH = "torch"  # the model op by op; decodes attend with the torch reference


def choose_path(device_type: str, num_decodes: int, num_prefills: int, graph_max_batch: int,
                has_numpy_decoder: bool, has_triton: bool) -> ExecutionPath:
    """How a step of `num_decodes` decodes and `num_prefills` prefill chunks runs on this device.

    What the runner was given sets what is possible: decode graphs up to `graph_max_batch`
    sequences (0: none; the engine captures them on CUDA with triton), a numpy decode step (fp32
    weights on the CPU), the Triton kernel (CUDA with triton installed). A step with any prefill
    chunk always runs the model op by op.
    """
    decodes_only = num_decodes > 0 and num_prefills == 0
    if decodes_only and num_decodes <= graph_max_batch:
        return ExecutionPath.DECODE_GRAPHS  # one launch instead of hundreds
    if decodes_only and has_numpy_decoder:
        return ExecutionPath.NUMPY_DECODE  # a microsecond per numpy call against torch's several
    if device_type == "cuda" and has_triton:
        return ExecutionPath.TORCH_TRITON
    return ExecutionPath.TORCH


def triton_attention(device: torch.device) -> DecodeAttention | None:
    """The Triton decode-attention kernel where it can run on `device`, else None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None  # triton is imported only where it can serve
    from engine.kernels import triton_paged_attention as tpa
    return tpa.paged_decode_attention_triton if tpa.available() else None


def graphs_supported(device: torch.device) -> bool:
    """Whether decode graphs can be captured here: CUDA with the Triton kernel. Graphs are
    captured around that kernel: the torch reference gathers each sequence's whole fixed-width
    block table, which at max_model_len costs more than the launches saved."""
    return triton_attention(device) is not None


def capture_decode_graphs(model: Llama, cache: KVCache, max_batch: int, max_model_len: int,
                          scratch_block: int) -> DecodeGraphs:
    """Decode graphs for every ladder size up to `max_batch`, captured around the Triton kernel."""
    attention = triton_attention(cache.k.device)
    if attention is None:
        raise ValueError("decode graphs need CUDA and triton (see graphs_supported)")
    return DecodeGraphs(model, cache, max_batch, max_model_len, scratch_block, capture=True,
                        decode_attention=attention)


@dataclass
class StepInputs:
    """One step's flat batch, decodes first, as plain lists."""

    ids: list[int] = field(default_factory=list)  # (N,) token fed at each row
    positions: list[int] = field(default_factory=list)  # (N,)
    slots: list[int] = field(default_factory=list)  # (N,) flat cache slot of each row's K/V
    logit_rows: list[int] = field(default_factory=list)  # rows whose logits are sampled
    sample_for: list[Sequence] = field(default_factory=list)  # the sequence of each such row
    decode_tables: list[list[int]] = field(default_factory=list)  # block table per decode
    decode_lens: list[int] = field(default_factory=list)  # context length per decode, new included
    prefills: list[PrefillChunk] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: Llama, cache: KVCache, blocks: BlockManager,
                 device: torch.device, graphs: DecodeGraphs | None = None,
                 numpy_decode: bool = True) -> None:
        """`graphs` replays decode steps (None: every step runs eagerly); `numpy_decode=False`
        keeps an fp32 CPU model's decode steps on torch (tests that stand in for the model)."""
        self.model = model
        self.cache = cache
        self.blocks = blocks
        self.device = device
        self.graphs = graphs
        # The numpy step reads the model's fp32 weights where they lie, in host memory; built
        # here, outside any timed step (views and one product object per matrix, no copies).
        fp32_cpu = device.type == "cpu" and cache.k.dtype == torch.float32
        self.cpu_decoder = CpuDecoder(model) if numpy_decode and fp32_cpu else None
        self.triton = triton_attention(device)

    def run(self, batch: Batch) -> dict[int, int]:
        """One forward pass over `batch`; returns {request id: sampled token}."""
        step = self.prepare(batch)
        path = choose_path(self.device.type, len(step.decode_tables), len(step.prefills),
                           self.graphs.max_batch if self.graphs is not None else 0,
                           self.cpu_decoder is not None, self.triton is not None)
        if path is ExecutionPath.DECODE_GRAPHS:
            logits = self.graphs.run(step.ids, step.positions, step.slots, step.decode_tables,
                                     step.decode_lens)
        elif path is ExecutionPath.NUMPY_DECODE:
            logits = self._numpy_decode(step)
        else:
            attention = self.triton if path is ExecutionPath.TORCH_TRITON else (
                paged_decode_attention_ref)
            logits = self._eager(step, attention)
        # Every row, even the placeholder of a step that samples nothing: `.tolist()` in `sample`
        # waits for the device, so the step's clock stops after its kernels.
        tokens = sample(logits, [s.sampling for s in step.sample_for],
                        [s.num_tokens for s in step.sample_for])
        return {seq.id: token for seq, token in zip(step.sample_for, tokens)}

    def prepare(self, batch: Batch) -> StepInputs:
        """The batch's rows, decodes first, with the slots and tables they read and write."""
        step = StepInputs()
        for seq, n in sorted(batch.items, key=lambda it: not it[0].is_decode):
            start, stop = seq.num_computed, seq.num_computed + n
            table = self.blocks.block_tables[seq.id]
            offset = len(step.ids)
            step.ids.extend(seq.token_ids[start:stop])
            step.positions.extend(range(start, stop))
            step.slots.extend(self.blocks.slots(seq.id, start, stop))
            if seq.is_decode:
                step.decode_tables.append(table)
                step.decode_lens.append(stop)
            else:
                pages = table[:blocks_for(stop, self.blocks.block_size)]
                step.prefills.append(PrefillChunk(offset, n, stop, self._tensor(pages)))
            if stop == seq.num_tokens:
                step.logit_rows.append(len(step.ids) - 1)
                step.sample_for.append(seq)
        return step

    def _numpy_decode(self, step: StepInputs) -> torch.Tensor:
        """Logits of a decodes-only step from the numpy decode step: (B, vocab); every decode
        reaches its last token, so every row is sampled."""
        width = max(len(t) for t in step.decode_tables)
        logits = self.cpu_decoder(
            np.array(step.ids), np.array(step.positions), np.array(step.slots),
            np.array(pad_tables(step.decode_tables, width)), np.array(step.decode_lens),
            self.cache.k.numpy(), self.cache.v.numpy())
        return torch.from_numpy(logits)

    def _eager(self, step: StepInputs, attention: DecodeAttention) -> torch.Tensor:
        """The model run op by op on tensors sized to this batch: (len(logit_rows), vocab)."""
        decodes = step.decode_tables
        meta = AttentionMetadata(
            slot_mapping=self._tensor(step.slots),
            num_decodes=len(decodes),
            decode_block_tables=(self._tensor(pad_tables(decodes, max(map(len, decodes))))
                                 if decodes else None),
            decode_context_lens=self._tensor(step.decode_lens) if decodes else None,
            prefills=step.prefills,
            decode_attention=attention,
        )
        # Every chunk a partial prefill: run for the cache, and return one placeholder row.
        logit_rows = step.logit_rows or [len(step.ids) - 1]
        return self.model(self._tensor(step.ids), self._tensor(step.positions), self.cache, meta,
                          self._tensor(logit_rows))

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
