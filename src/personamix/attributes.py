"""Attributes a small model can express and an instrument reads exactly, offline: three axes of
two poles, each with a scorer and success thresholds fixed before any evaluation.

    sentiment  positive / negative     VADER compound score in [-1, 1] (the lexicon ships in
                                       the PyPI package vaderSentiment)
    wording    complex / plain         mean letters per word (the word-length term of readability
                                       formulas; syllable counts need a dictionary download)
    question   asking / telling        whether the reply asks the user something (a '?')

A pole's scorer is its axis's score, signed so that higher means more of that pole. Success:
the reply is on the pole's side of a threshold (SUCCESS). The axes were checked to be close to
uncorrelated on the reference's own replies (docs/attributes.md: rank correlations between the
three scores over the sampled training replies). Reply length was the first candidate for a
third axis and was dropped: its rank correlation with sentiment is about 0.3 (longer replies
carry more sentiment words, which moves VADER's compound away from 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .errors import PersonamixError, require


@lru_cache(maxsize=1)
def _vader():
    module = require("vaderSentiment.vaderSentiment", "eval", "the sentiment scorer")
    return module.SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER's compound score: -1 (most negative) .. 1 (most positive)."""
    return float(_vader().polarity_scores(text)["compound"])


_WORD = re.compile(r"[A-Za-z]+")


def word_length(text: str) -> float:
    """Mean letters per word (0 for a reply without words)."""
    found = _WORD.findall(text)
    return sum(map(len, found)) / len(found) if found else 0.0


_QUESTION = re.compile(r"\?")


def asks(text: str) -> float:
    """1 if the reply asks a question (contains '?'), else 0."""
    return float(bool(_QUESTION.search(text)))


@dataclass(frozen=True)
class Axis:
    """Two poles and the score that separates them: higher = more of `poles[0]`."""

    name: str
    poles: tuple[str, str]
    score: Callable[[str], float]
    #: a pair's chosen and rejected replies differ by at least this much on the score
    margin: float


AXES: tuple[Axis, ...] = (
    Axis("sentiment", ("positive", "negative"), sentiment, margin=0.3),
    Axis("wording", ("complex", "plain"), word_length, margin=0.6),
    Axis("question", ("asking", "telling"), asks, margin=1.0),
)
POLES: tuple[str, ...] = tuple(p for a in AXES for p in a.poles)

#: success of a reply for each pole, fixed before the evaluation ran, at the quartiles of the
#: reference's own replies to the training prompts (3,840 replies; training/attribute_data.py):
#: sentiment: upper quartile 0.72, and VADER's own negative cut-off -0.05 (the lower quartile is
#: 0.0: a quarter of the replies are neutral); wording: 5.3 and 4.34 letters per word; question:
#: asks or does not (3% of the reference's replies ask). So the reference succeeds on about a
#: quarter of its replies per pole, except `telling` (97%) and `asking` (3%).
SUCCESS: dict[str, Callable[[float], bool]] = {
    "positive": lambda s: s >= 0.72, "negative": lambda s: s <= -0.05,
    "complex": lambda w: w >= 5.3, "plain": lambda w: w <= 4.34,
    "asking": lambda q: q >= 1, "telling": lambda q: q < 1,
}
SUCCESS_TEXT = {"positive": "VADER compound >= 0.72", "negative": "VADER compound <= -0.05",
                "complex": ">= 5.3 letters per word", "plain": "<= 4.34 letters per word",
                "asking": "contains '?'", "telling": "no '?'"}
#: how the prompting baseline names each pole
INSTRUCTIONS = {"positive": "upbeat and positive", "negative": "gloomy and negative",
                "complex": "in sophisticated, complex vocabulary", "plain": "in plain, simple words",
                "asking": "ending with a question to the user", "telling": "without asking any question"}


#: the personas the evaluation composes (docs/attributes.md): four pairs from different axes, both
#: poles of sentiment, and one triple
PERSONAS = ("positive+asking", "negative+asking", "positive+plain", "negative+complex", "positive+plain+asking")


def axis_of(pole: str) -> Axis:
    for a in AXES:
        if pole in a.poles:
            return a
    raise PersonamixError(f"unknown attribute pole {pole!r}; poles are {', '.join(POLES)}")


def pole_score(pole: str, text: str) -> float:
    """The axis score of `text`, signed so that higher means more of `pole`."""
    a = axis_of(pole)
    s = a.score(text)
    return s if pole == a.poles[0] else -s


def scores(text: str) -> dict[str, float]:
    """{axis name: raw score} of one reply."""
    return {a.name: a.score(text) for a in AXES}


def success(pole: str, raw: dict[str, float]) -> bool:
    """Whether a reply with axis scores `raw` succeeds on `pole`."""
    return SUCCESS[pole](raw[axis_of(pole).name])


def parse_persona(persona: str) -> list[str]:
    """"positive+concise" -> ["positive", "concise"]: known poles, at most one per axis."""
    poles = [p.strip() for p in persona.split("+") if p.strip()]
    if not poles:
        raise PersonamixError(f"an attribute persona names poles joined by '+', got {persona!r}")
    axes = [axis_of(p).name for p in poles]
    if len(set(axes)) != len(axes):
        raise PersonamixError(f"persona {persona!r} names two poles of one axis")
    return poles


def prompt_instruction(poles: Sequence[str]) -> str:
    """The prompting baseline's system prompt: the attributes, named."""
    return "Answer in a way that is " + ", and ".join(INSTRUCTIONS[p] for p in poles) + "."


__all__ = ["Axis", "AXES", "POLES", "PERSONAS", "SUCCESS", "SUCCESS_TEXT", "INSTRUCTIONS", "sentiment", "word_length",
           "asks", "axis_of", "pole_score", "scores", "success", "parse_persona", "prompt_instruction"]
