"""Keys and values of prompt prefixes, kept across generations (automatic prefix caching).

Chat requests to one server mostly begin alike: the chat template's system turn (24 of the 38
tokens of a short question to the default model), an application's long persona or
instructions. Every generation's prompt forward recomputes them for each of its N+1 rows.
`PrefixCache` keeps them per row kind (the reference, or one adapter: a LoRA on the attention
changes keys and values from the first layer on, so each adapter has its own) in blocks of
BLOCK tokens, so a new generation's prompt forward starts after its longest cached prefix.

An entry is one block of one row kind: its keys and values at every layer, keyed by
(row kind, the entry of the block before it, this block's tokens), so a key names its whole
prefix exactly (no hashing: nothing to collide). A prompt's last, partial block (1 to BLOCK-1
tokens) is kept as an entry of its own that nothing chains after. Where no stored block
matches whole, the entry after the matched ones that shares the most leading tokens gives
those: reuse is at token granularity (SGLang's radix cache does the same; vLLM reuses full
blocks only). So a prompt asked again (a regenerated answer, the same question in another
persona) restores all but the positions it asks logits for, and the adapters' rows of an SCR
generation, whose first forward is its prompt plus a drafted chunk, restore all of the prompt
whatever an earlier generation drafted after it.
Least recently used entries go first once the cache holds more than its byte budget. A
restored prefix gives the same keys and values a fresh forward gives up to float rounding
(they came from another forward, over other rows), the same guarantee as batching with other
generations.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

#: tokens per cached block (a prompt's last, partial block is an entry of its own: shorter)
BLOCK = 16


@dataclass
class _Entry:
    id: int
    k: torch.Tensor        # [layers, kv_heads, BLOCK (a prompt's tail: fewer), head_dim]
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefixCache:
    """Blocks of prompt keys/values per row kind, least recently used evicted beyond max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._children: dict[tuple, dict[tuple, None]] = {}   # (kind, parent id) -> keys stored after it
        self._next_id = 1
        self.nbytes = 0
        self.hits = self.lookups = 0          # prompt rows (one per row kind of a call) that found a
                                              # cached prefix / that were looked up
        self.tokens_saved = 0                 # prompt tokens x rows not recomputed

    def lookup(self, kind: int, tokens: list[int], limit: int) -> tuple[list[_Entry], int]:
        """The cached keys/values of the longest prefix of `tokens` for row kind `kind` (-1: the
        reference, i: adapter i), until they cover `limit` tokens: (entries, oldest first; the
        number of tokens they hold for `tokens`, <= limit). Full blocks that match go on to the
        next; where none does, the entry stored after the last one (a block or a prompt's tail)
        that shares the most leading tokens with what follows gives those: its keys/values there
        are what a forward over `tokens` computes (causal attention). Marks them recently used."""
        found, parent, pos = [], 0, 0
        self.lookups += 1
        while pos < limit:
            block = tuple(tokens[pos: pos + BLOCK])
            entry = self._use((kind, parent, block)) if len(block) == BLOCK else None
            if entry is not None:
                found.append(entry)
                parent, pos = entry.id, pos + BLOCK
                continue
            best, shared = None, 0
            for key in self._children.get((kind, parent), ()):
                n = next((i for i, (a, b) in enumerate(zip(key[2], block)) if a != b), min(len(key[2]), len(block)))
                if n > shared:
                    best, shared = key, n
            if best is not None:
                found.append(self._use(best))
                pos += shared
            break
        self.hits += bool(found)
        return found, min(pos, limit)

    def _use(self, key: tuple) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def store(self, kind: int, tokens: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Keep a prompt `tokens` for row kind `kind`, its full blocks and its tail, from its
        keys/values at every layer, k[layer] / v[layer] [kv_heads, >= len(tokens), head_dim] (copied)."""
        parent = 0
        for start in range(0, len(tokens), BLOCK):
            end = min(start + BLOCK, len(tokens))
            key = (kind, parent, tuple(tokens[start:end]))
            entry = self._use(key)
            if entry is None:
                entry = _Entry(self._next_id, torch.stack([x[:, start:end] for x in k]),
                               torch.stack([x[:, start:end] for x in v]))
                self._next_id += 1
                self._entries[key] = entry
                self._children.setdefault(key[:2], {})[key] = None
                self.nbytes += entry.nbytes
            parent = entry.id
        while self.nbytes > self.max_bytes and self._entries:    # a child of an evicted block is
            key, old = self._entries.popitem(last=False)         # unreachable and goes in its turn
            siblings = self._children[key[:2]]
            del siblings[key]
            if not siblings:
                del self._children[key[:2]]
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._children.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)
