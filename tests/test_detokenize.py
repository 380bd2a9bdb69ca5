"""Streaming detokenization: the pieces each step hands out add up to the whole decode, and a step
decodes a window of the newest tokens, not the whole text."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from personamix.detokenize import REPLACEMENT, Detokenizer
from personamix.loading import DEFAULT_MODEL, resolve_model
from personamix.testing import CHAT_WORDS


@pytest.fixture(scope="module")
def byte_level():
    """The default model's tokenizer: byte-level BPE (a character's UTF-8 bytes may span tokens)."""
    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))


def word_level():
    """The test models' tokenizer: words, decoded with a space between them."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(CHAT_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def metaspace():
    """SentencePiece's convention: '▁' marks a word's leading space, dropped at the start of a text."""
    words = ["<unk>", "</s>", "▁the", "▁cat", "s", "▁sat", ".", "▁on", "mat", "▁a"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def streamed(tokenizer, ids: list[int], steps: list[int]) -> tuple[list[str], str]:
    """The pieces a stream hands out when `ids` arrive in steps of the given sizes (the rest in one
    last step), and the whole decode."""
    detok, pieces, end = Detokenizer(tokenizer), [], 0
    for n in steps + [len(ids)]:
        end = min(len(ids), end + max(n, 1))
        pieces.append(detok.step(ids[:end]))
        if end == len(ids):
            break
    return pieces, tokenizer.decode(ids, skip_special_tokens=True)


def check(tokenizer, ids, steps):
    pieces, whole = streamed(tokenizer, ids, steps)
    text = "".join(pieces)
    assert whole.startswith(text), (pieces, whole)          # what was handed out is the decode's start
    assert not any(p.endswith(REPLACEMENT) for p in pieces)   # an incomplete character waits
    if not whole.endswith(REPLACEMENT):
        assert text == whole, (pieces, whole)               # and all of it, once it ends on a whole character


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(data=st.data())
def test_pieces_add_up_to_the_whole_decode_byte_level(byte_level, data):
    ids = data.draw(st.lists(st.integers(0, len(byte_level) - 1), max_size=40))
    check(byte_level, ids, data.draw(st.lists(st.integers(1, 5), max_size=40)))


@SETTINGS
@given(data=st.data())
def test_pieces_add_up_to_the_whole_decode_word_level_and_metaspace(data):
    for tok in (word_level(), metaspace()):
        ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=30))
        check(tok, ids, data.draw(st.lists(st.integers(1, 4), max_size=30)))


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_real_text_with_characters_across_tokens_streams_as_it_decodes(byte_level, step):
    text = "Café crème — naïve 😀 façade, 東京 und Größe: ünïcödé! 🎉🎉 done."
    ids = byte_level.encode(text, add_special_tokens=False)
    assert any(REPLACEMENT in byte_level.decode(ids[:i]) for i in range(1, len(ids)))   # a character spans tokens
    pieces, whole = streamed(byte_level, ids, [step] * len(ids))
    assert "".join(pieces) == whole == text


class Counting:
    """A tokenizer that records how many ids each decode call was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kw)


def test_a_step_decodes_the_newest_tokens_only(byte_level):
    ids = byte_level.encode("the persona speaks with calm energy and plans ahead. " * 60, add_special_tokens=False)
    counting = Counting(byte_level)
    detok = Detokenizer(counting)
    pieces = [detok.step(ids[:end]) for end in range(3, len(ids) + 3, 3)]
    assert len(ids) > 500 and "".join(pieces) == byte_level.decode(ids)
    assert max(counting.sizes) <= 6          # two steps of 3 tokens, however long the text has grown
