"""Property tests of the block manager: random allocate / grow / fork / free sequences.

A shadow model (token counts per sequence, and which sequences share blocks through a fork) is kept
beside the real manager; after every operation the invariants are checked: used + free = total, no
block sits in two tables unless the two sequences are fork relatives, reference counts equal the
number of tables holding each block, and the waste equals the sum of ceil(T/P)*P - T over live
sequences.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, invariant, precondition,
                                 rule)

from engine.block_manager import BlockManager, ContiguousAllocator, blocks_for

SETTINGS = settings(max_examples=150, stateful_step_count=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm: BlockManager | None = None
        self.tokens: dict[int, int] = {}  # shadow: tokens per live sequence
        self.family: dict[int, int] = {}  # shadow: fork family (the root sequence's id)
        self.next_id = 0

    seqs = Bundle("seqs")

    @precondition(lambda self: self.bm is None)
    @rule(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 3, 4, 16]))
    def create(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    @precondition(lambda self: self.bm is not None)
    @rule(target=seqs, tokens=st.integers(0, 60))
    def allocate(self, tokens: int):
        seq = self._new_id()
        need = blocks_for(tokens, self.bm.block_size)
        free_before = self.bm.num_free
        assert self.bm.can_allocate(seq, tokens) == (need <= free_before)
        if need > free_before:
            with pytest.raises(MemoryError):
                self.bm.allocate(seq, tokens)
            assert self.bm.num_free == free_before  # a refused allocation changes nothing
            assert seq not in self.bm.block_tables
            return seq  # never became live; later rules skip it
        new = self.bm.allocate(seq, tokens)
        assert len(new) == need and len(set(new)) == need
        self.tokens[seq] = tokens
        self.family[seq] = seq
        return seq

    @precondition(lambda self: self.bm is not None)
    @rule(seq=seqs, extra=st.integers(0, 20))
    def grow(self, seq: int, extra: int) -> None:
        if seq not in self.tokens:
            return
        total = self.tokens[seq] + extra
        need = self.bm.blocks_needed(seq, total)
        assert need == blocks_for(total, self.bm.block_size) - len(self.bm.block_tables[seq])
        table_before = list(self.bm.block_tables[seq])
        if need > self.bm.num_free:
            with pytest.raises(MemoryError):
                self.bm.allocate(seq, total)
            assert self.bm.block_tables[seq] == table_before
            return
        self.bm.allocate(seq, total)
        assert self.bm.block_tables[seq][:len(table_before)] == table_before  # only appends
        self.tokens[seq] = total

    @precondition(lambda self: self.bm is not None)
    @rule(target=seqs, parent=seqs)
    def fork(self, parent: int):
        child = self._new_id()
        if parent not in self.tokens:
            return child
        self.bm.fork(parent, child)
        assert self.bm.block_tables[child] == self.bm.block_tables[parent]
        self.tokens[child] = self.tokens[parent]
        self.family[child] = self.family[parent]
        return child

    @precondition(lambda self: self.bm is not None)
    @rule(seq=consumes(seqs))
    def free(self, seq: int) -> None:
        if seq not in self.tokens:
            assert self.bm.free(seq) == 0  # freeing a stranger is harmless
            return
        table = self.bm.block_tables[seq]
        others = Counter(b for s, t in self.bm.block_tables.items() if s != seq for b in t)
        expect_released = sum(1 for b in table if others[b] == 0)
        assert self.bm.free(seq) == expect_released
        del self.tokens[seq]
        del self.family[seq]

    @invariant()
    def consistent(self) -> None:
        bm = self.bm
        if bm is None:
            return
        tables = bm.block_tables
        assert set(tables) == set(self.tokens)
        held = Counter(b for t in tables.values() for b in t)
        free = list(bm.free_blocks)
        # Every block is either free (once) or held, never both; used + free = total.
        assert len(free) == len(set(free))
        assert not set(free) & set(held)
        assert set(free) | set(held) == set(range(bm.num_blocks))
        assert bm.num_used + bm.num_free == bm.num_blocks
        assert bm.num_used == len(held)
        # Reference counts are exactly the number of tables holding a block.
        for b in range(bm.num_blocks):
            assert bm.ref_counts[b] == held[b]
        # No block is owned twice, except shared within one fork family.
        owners: dict[int, int] = {}
        for seq, table in tables.items():
            assert len(table) == len(set(table))
            for b in table:
                if b in owners:
                    assert self.family[owners[b]] == self.family[seq]
                owners[b] = seq
        # Tables are exactly as long as their tokens need; waste is the formula's sum.
        p = bm.block_size
        for seq, t in self.tokens.items():
            assert bm.num_tokens[seq] == t
            assert len(tables[seq]) == math.ceil(t / p)
        assert bm.tokens_stored == sum(self.tokens.values())
        assert bm.waste_tokens == sum(math.ceil(t / p) * p - t for t in self.tokens.values())
        # Every stored token maps to its own slot inside its sequence's blocks.
        for seq, t in self.tokens.items():
            slots = [bm.slot(seq, i) for i in range(t)]
            assert len(set(slots)) == t
            assert {s // p for s in slots} <= set(tables[seq])


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = SETTINGS


@SETTINGS
@given(block_size=st.integers(1, 64), lengths=st.lists(st.integers(0, 500), max_size=12))
def test_waste_is_formula_per_sequence(block_size: int, lengths: list[int]) -> None:
    bm = BlockManager(sum(blocks_for(t, block_size) for t in lengths) + 1, block_size)
    for i, t in enumerate(lengths):
        bm.allocate(i, t)
    assert bm.waste_tokens == sum(math.ceil(t / block_size) * block_size - t for t in lengths)
    assert all(0 <= len(bm.block_tables[i]) * block_size - t < block_size or t == 0
               for i, t in enumerate(lengths))
    assert bm.num_free == 1


def test_free_returns_blocks_and_reuse_is_fifo() -> None:
    bm = BlockManager(4, 2)
    bm.allocate(1, 3)  # blocks 0, 1
    bm.allocate(2, 2)  # block 2
    assert bm.block_tables == {1: [0, 1], 2: [2]}
    assert bm.free(1) == 2
    bm.allocate(3, 5)  # block 3 first, then the freed ones in the order they came back
    assert bm.block_tables[3] == [3, 0, 1]
    assert bm.num_free == 0 and not bm.can_allocate(4, 1) and bm.can_allocate(4, 0)


def test_fork_shares_until_both_free() -> None:
    bm = BlockManager(4, 4)
    bm.allocate(1, 6)
    bm.fork(1, 2)
    assert bm.ref_counts[:2] == [2, 2] and bm.num_used == 2
    with pytest.raises(ValueError):
        bm.fork(1, 2)
    assert bm.free(1) == 0 and bm.num_used == 2
    assert bm.free(2) == 2 and bm.num_used == 0


def test_contiguous_allocator_reserves_max_len_per_live_request() -> None:
    c = ContiguousAllocator(max_len=100)
    c.allocate(1)
    c.allocate(2)
    c.allocate(2)
    assert c.reserved_tokens == 200
    c.free(1)
    c.free(7)
    assert c.reserved_tokens == 100


def test_block_manager_rejects_empty_shapes() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
