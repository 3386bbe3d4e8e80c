"""Paged KV bookkeeping in plain Python: which physical block holds which sequence's tokens.

The block manager owns no tensors. It hands out block ids from a free list, keeps a block table per
sequence (logical block i -> physical block id), counts references so blocks can be shared, and
reports what memory is in use and how much of it is internal fragmentation (empty slots at the end
of each sequence's last block). `ContiguousAllocator` is the baseline that reserves `max_len` slots
for every live request, as servers did before paging.
"""
from __future__ import annotations

from collections import deque


# What block tables are padded with to a common width. Any valid block id would do, because
# attention masks every position past a sequence's length, so reads of padding never count; block 0
# is valid in every cache (a scratch block exists only where CUDA graphs are used). Writes are
# another matter: a padding row of a graph step writes its K/V into the scratch block, never here.
PAD_BLOCK = 0


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens: ceil(T / P)."""
    return -(-num_tokens // block_size)


def pad_tables(tables: list[list[int]], width: int) -> list[list[int]]:
    """Each block table padded with PAD_BLOCK to `width` entries."""
    return [table + [PAD_BLOCK] * (width - len(table)) for table in tables]


class BlockManager:
    """Free list, reference counts and block tables for one paged KV cache."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a block manager needs at least one block of at least one slot")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_tables: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}  # tokens stored per sequence
        self.allocated_total = 0  # running counts, read by the engine to report per-step churn
        self.freed_total = 0

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def tokens_stored(self) -> int:
        return sum(self.num_tokens.values())

    @property
    def waste_tokens(self) -> int:
        """Empty slots in the last block of every live sequence: sum of ceil(T/P)*P - T."""
        return sum(len(self.block_tables[s]) * self.block_size - n for s, n in self.num_tokens.items())

    def blocks_needed(self, seq_id: int, total_tokens: int) -> int:
        """Extra blocks `seq_id` needs to hold `total_tokens` tokens."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, blocks_for(total_tokens, self.block_size) - have)

    def can_allocate(self, seq_id: int, total_tokens: int) -> bool:
        return self.blocks_needed(seq_id, total_tokens) <= len(self.free_blocks)

    # -- changes -------------------------------------------------------------------------------
    def allocate(self, seq_id: int, total_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `total_tokens` tokens; returns the new block ids."""
        need = self.blocks_needed(seq_id, total_tokens)
        if need > len(self.free_blocks):
            raise MemoryError(f"sequence {seq_id} needs {need} blocks, {self.num_free} free")
        table = self.block_tables.setdefault(seq_id, [])
        new = [self.free_blocks.popleft() for _ in range(need)]
        for block in new:
            self.ref_counts[block] = 1
        table.extend(new)
        self.num_tokens[seq_id] = max(total_tokens, self.num_tokens.get(seq_id, 0))
        self.allocated_total += need
        return new

    def fork(self, parent_id: int, child_id: int) -> None:
        """Let `child_id` share every block of `parent_id` (a common prefix), counting references."""
        if child_id in self.block_tables:
            raise ValueError(f"sequence {child_id} already owns blocks")
        table = list(self.block_tables[parent_id])
        for block in table:
            self.ref_counts[block] += 1
        self.block_tables[child_id] = table
        self.num_tokens[child_id] = self.num_tokens[parent_id]

    def free(self, seq_id: int) -> int:
        """Drop `seq_id`'s references; blocks nobody else holds go back to the free list."""
        released = 0
        for block in self.block_tables.pop(seq_id, []):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
                released += 1
        self.num_tokens.pop(seq_id, None)
        self.freed_total += released
        return released

    def slots(self, seq_id: int, start: int, stop: int) -> list[int]:
        """Flat cache slots (block * P + offset) of tokens start..stop-1 of `seq_id`."""
        table, p = self.block_tables[seq_id], self.block_size
        return [table[i // p] * p + i % p for i in range(start, stop)]

    def slot(self, seq_id: int, position: int) -> int:
        """Flat cache slot of token `position` of `seq_id`."""
        return self.slots(seq_id, position, position + 1)[0]


class ContiguousAllocator:
    """The pre-paging baseline: each live request reserves `max_len` slots up front.

    A server without paging cannot know how far a reply will grow, so it reserves the longest
    sequence it accepts. The engine passes its `max_len`: `EngineConfig.max_model_len`, or the
    model's maximum positions when that is unset, which is the baseline the PagedAttention paper
    measured. Setting `max_model_len` to a workload's longest request gives the kinder baseline of
    a server sized for that workload.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.live: set[int] = set()

    def allocate(self, seq_id: int) -> None:
        self.live.add(seq_id)

    def free(self, seq_id: int) -> None:
        self.live.discard(seq_id)

    @property
    def reserved_tokens(self) -> int:
        return len(self.live) * self.max_len
