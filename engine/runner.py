"""Turn a scheduled batch into tensors, run the model on the device, and sample.

The only module between bookkeeping and torch: it reads block tables from the block manager to build
slot mappings and per-sequence tables, puts decodes first in the flat batch (the model's attention
expects that), and returns a token (chosen by `engine.sampler`) for every sequence whose chunk
reached its last token.
A pure-decode batch goes through `DecodeGraphs` when the runner is given one (CUDA runs).
"""
from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.cuda_graphs import DecodeGraphs
from engine.model import AttentionMetadata, KVCache, Llama, PrefillChunk
from engine.sampler import sample
from engine.scheduler import Batch
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: Llama, cache: KVCache, blocks: BlockManager,
                 device: torch.device, graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.cache = cache
        self.blocks = blocks
        self.device = device
        self.graphs = graphs  # replays pure-decode steps; None runs every step eagerly

    def run(self, batch: Batch) -> dict[int, int]:
        """One forward pass over `batch`; returns {request id: sampled token}."""
        items = sorted(batch.items, key=lambda it: not it[0].is_decode)  # decodes first
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        sample_for: list[Sequence] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for seq, n in items:
            start = seq.num_computed
            stop = start + n
            table = self.blocks.block_tables[seq.id]
            offset = len(ids)
            ids.extend(seq.token_ids[start:stop])
            positions.extend(range(start, stop))
            p = self.blocks.block_size
            slots.extend(table[i // p] * p + i % p for i in range(start, stop))
            if seq.is_decode:
                decode_tables.append(table)
                decode_lens.append(stop)
            else:
                prefills.append(PrefillChunk(offset, n, stop, torch.tensor(
                    table[:-(-stop // p)], dtype=torch.long, device=self.device)))
            if stop == seq.num_tokens:
                logit_rows.append(len(ids) - 1)
                sample_for.append(seq)
        if (self.graphs is not None and decode_tables and not prefills
                and len(decode_tables) <= self.graphs.max_batch):
            logits = self.graphs.run(ids, positions, slots, decode_tables, decode_lens)
        else:
            logits = self._eager(ids, positions, slots, decode_tables, decode_lens, prefills,
                                 logit_rows)
        # Every row, even the placeholder of a step that samples nothing: `.tolist()` in `sample`
        # waits for the device, so the step's clock stops after its kernels.
        tokens = sample(logits, [s.sampling for s in sample_for], [s.num_tokens for s in sample_for])
        return {seq.id: token for seq, token in zip(sample_for, tokens)}

    def _eager(self, ids: list[int], positions: list[int], slots: list[int],
               decode_tables: list[list[int]], decode_lens: list[int],
               prefills: list[PrefillChunk], logit_rows: list[int]) -> torch.Tensor:
        """The model run op by op on tensors sized to this batch: (len(logit_rows), vocab)."""
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decodes=len(decode_tables),
            decode_block_tables=self._padded(decode_tables) if decode_tables else None,
            decode_context_lens=self._tensor(decode_lens) if decode_lens else None,
            prefills=prefills,
        )
        if not logit_rows:  # every chunk was a partial prefill: run for the cache, sample nothing
            logit_rows = [len(ids) - 1]
        return self.model(self._tensor(ids), self._tensor(positions), self.cache, meta,
                          self._tensor(logit_rows))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _padded(self, tables: list[list[int]]) -> torch.Tensor:
        """Block tables padded to equal length; padding repeats block 0 and is masked by length."""
        width = max(len(t) for t in tables)
        return self._tensor([t + [0] * (width - len(t)) for t in tables])
