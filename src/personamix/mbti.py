"""The MBTI vocabulary, defined once: four axes of two poles, persona strings such as "ENTJ".

A persona names at most one pole per axis; the engine turns it into equal weights on the
adapters named by its letters (targets.resolve_weights), the training data and judges work
per axis (training/data.py, evaluation/judges.py).
"""

from __future__ import annotations

from itertools import product

from .errors import PersonamixError

#: The axes as (first pole, second pole), in the usual order.
AXES: tuple[tuple[str, str], ...] = (("E", "I"), ("S", "N"), ("T", "F"), ("J", "P"))
#: Every pole letter, axis by axis.
POLES: tuple[str, ...] = tuple(p for axis in AXES for p in axis)
#: Each pole's other end.
OPPOSITE: dict[str, str] = {p: q for a, b in AXES for p, q in ((a, b), (b, a))}
#: The 16 four-letter types.
ALL_TYPES: tuple[str, ...] = tuple("".join(t) for t in product(*AXES))


def axis_of(pole: str) -> str:
    """A pole's axis as two letters: 'E' -> 'EI' (also 'I' -> 'EI')."""
    if not isinstance(pole, str) or pole.upper() not in OPPOSITE:
        raise PersonamixError(f"unknown MBTI pole {pole!r}: use one of {', '.join(POLES)}")
    return next(a + b for a, b in AXES if pole.upper() in (a, b))


def axis_key(pole: str) -> str:
    """A pole's axis as the data sets name it: 'E' -> 'e_i'."""
    axis = axis_of(pole)
    return f"{axis[0]}_{axis[1]}".lower()


def pole_of(persona: str, axis: str) -> str:
    """The persona's pole on an axis ('ENTJ', 'TF' -> 'T')."""
    return next(p for p in persona if p in axis)


def parse_persona(persona: str) -> list[str]:
    """`"ENTJ"` -> `["E", "N", "T", "J"]`. Letters must be uppercase MBTI poles, one per axis."""
    if not isinstance(persona, str) or not persona:
        raise PersonamixError("persona must be a non-empty string of MBTI letters such as 'ENTJ'")
    letters = list(persona)
    bad = [c for c in letters if c not in OPPOSITE]
    if bad:
        hint = " (letters are case-sensitive: use uppercase)" if any(c.upper() in OPPOSITE for c in bad) else ""
        raise PersonamixError(
            f"unknown persona letter(s) {''.join(bad)!r} in {persona!r}: MBTI letters are "
            f"{' '.join(POLES)}{hint}"
        )
    if len(set(letters)) != len(letters):
        raise PersonamixError(f"persona {persona!r} repeats a letter")
    for a, b in AXES:
        if a in letters and b in letters:
            raise PersonamixError(f"persona {persona!r} names both poles of the {a}/{b} axis")
    return letters


__all__ = ["AXES", "POLES", "OPPOSITE", "ALL_TYPES", "axis_of", "axis_key", "pole_of", "parse_persona"]
