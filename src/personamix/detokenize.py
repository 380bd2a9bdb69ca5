"""Streaming text of a growing list of token ids, decoding only its newest tokens per step.

A stream hands out the text its new tokens add. Decoding every token so far at every step (what
TextStream did) costs O(length) per step: with the default model's tokenizer 13 us at 32 tokens,
165 us at 1,000 and 604 us at 4,000 (one decode, on a Zen 5 core), paid by the generation's own
thread between forwards, where the batched backend's generations take turns (docs/batching.md).
Over a generation streamed in steps of 3 tokens that averaged 15 / 125 / 387 us per step for 32 /
1,000 / 4,000 tokens; decoding a window, 7-10 us whatever the length. `Detokenizer` decodes a window
instead, as vLLM's incremental detokenization does: the text of ids[prefix:] minus that of
ids[prefix:read], where `read` is where the text handed out so far ends and `prefix` where the
step before it ended. Decoding the window with the tokens just before the new ones keeps what a
token's text depends on its left neighbour for (a leading space a decoder strips at the start of
a text, a character whose UTF-8 bytes span tokens) as the whole decode has it, so the pieces add
up to `tokenizer.decode(ids)`; tests/test_detokenize.py checks that on the default model's
byte-level BPE and on a word-level tokenizer, over arbitrary ids and steps. A text that ends in
U+FFFD (an incomplete UTF-8 sequence) waits for the next step, as before.
"""
from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class Detokenizer:
    """The text that each step's new tokens add (`step`), with `decode(ids, skip_special_tokens=True)`
    of the tokenizer for any piece of ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = 0    # the window's start: where the piece before the last one ended
        self.read = 0      # where the text handed out so far ends

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def step(self, ids: Sequence[int]) -> str:
        """The text ids[read:] adds to what was handed out ("" while it adds none, or ends in an
        incomplete character); `ids` is every token so far, the previous steps' as they were."""
        before = self._decode(ids[self.prefix: self.read])
        text = self._decode(ids[self.prefix:])
        if len(text) <= len(before) or text.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(ids)
        return text[len(before):]
