"""Keys and values of prompt prefixes, kept across generations (automatic prefix caching).

Chat requests to one server mostly begin alike: the chat template's system turn (24 of the 38
tokens of a short question to the default model), an application's long persona or
instructions. Every generation's prompt forward recomputes them for each of its N+1 rows.
`PrefixCache` keeps them per row kind (the reference, or one adapter: a LoRA on the attention
changes keys and values from the first layer on, so each adapter has its own) in blocks of
BLOCK tokens, so a new generation's prompt forward starts after its longest cached prefix.

An entry is one block of one row kind: its keys and values at every layer, keyed by
(row kind, the entry of the block before it, this block's tokens), so a key names its whole
prefix exactly (no hashing: nothing to collide). Least recently used entries go first once
the cache holds more than its byte budget. A restored prefix gives the same keys and values a
fresh forward gives up to float rounding (they came from another forward, over other rows),
the same guarantee as batching with other generations.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

#: tokens per cached block: a prompt's last partial block is computed, never cached
BLOCK = 16


@dataclass
class _Entry:
    id: int
    k: torch.Tensor        # [layers, kv_heads, BLOCK, head_dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefixCache:
    """Blocks of prompt keys/values per row kind, least recently used evicted beyond max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._next_id = 1
        self.nbytes = 0
        self.hits = self.lookups = 0          # prompt rows (one per row kind of a call) that found a
                                              # cached prefix / that were looked up
        self.tokens_saved = 0                 # prompt tokens x rows not recomputed

    def lookup(self, kind: int, tokens: list[int], limit: int) -> list[_Entry]:
        """The cached blocks of the longest prefix of `tokens` (at most `limit` tokens) for row
        kind `kind` (-1: the reference, i: adapter i), oldest first; marks them recently used."""
        found, parent = [], 0
        self.lookups += 1
        for start in range(0, limit - BLOCK + 1, BLOCK):
            key = (kind, parent, tuple(tokens[start: start + BLOCK]))
            entry = self._entries.get(key)
            if entry is None:
                break
            self._entries.move_to_end(key)
            found.append(entry)
            parent = entry.id
        self.hits += bool(found)
        return found

    def store(self, kind: int, tokens: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Keep the full blocks of a prompt `tokens` for row kind `kind`, from its keys/values at
        every layer, k[layer] / v[layer] [kv_heads, >= len(tokens), head_dim] (copied)."""
        parent = 0
        for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
            key = (kind, parent, tuple(tokens[start: start + BLOCK]))
            entry = self._entries.get(key)
            if entry is None:
                end = start + BLOCK
                entry = _Entry(self._next_id, torch.stack([x[:, start:end] for x in k]),
                               torch.stack([x[:, start:end] for x in v]))
                self._next_id += 1
                self._entries[key] = entry
                self.nbytes += entry.nbytes
            else:
                self._entries.move_to_end(key)
            parent = entry.id
        while self.nbytes > self.max_bytes and self._entries:    # a child of an evicted block is
            _, old = self._entries.popitem(last=False)           # unreachable and goes in its turn
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)
