"""The evaluation tasks' data, read from the paper's data directory (../shared/data/mpg):

    mcqa      the 93-item A/B questionnaire (item 75's labels fixed); an answer is read as P(A) vs
              P(B) of a method's next-token distribution, or parsed from a short generated answer
    qa        open questions per MBTI type (mbti_qa_<TYPE>.json), with the dataset's reference answers
    roleplay  dataset_roleplay/test: a profile and a personality per prompt (N=2 adapters)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import PersonamixError
from ..mbti import OPPOSITE, axis_of, parse_persona
from ..training.data import default_data_dir

PAPER_TYPES = ("ENTJ", "ESTP", "INFJ")
#: Item 75 is labelled A=T, B=N upstream; its options ("Good-tempered but inconsistent" /
#: "Strict but organized") are the P and J poles.
MCQA_FIXES = {"75": {"A": "P", "B": "J"}}


def _data_file(*parts: str, data_dir=None) -> Path:
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root is None:
        raise PersonamixError("the paper's data was not found: set $PERSONAMIX_DATA to its mpg/ directory")
    path = root.joinpath(*parts)
    if not path.is_file():
        raise PersonamixError(f"evaluation file {path} does not exist")
    return path


@dataclass(frozen=True)
class McqaItem:
    id: str
    stem: str
    options: dict[str, str]      # {"A": text, "B": text}
    poles: dict[str, str]        # {"A": pole, "B": pole}

    @property
    def axis(self) -> str:
        return axis_of(self.poles["A"])

    def prompt(self, swapped: bool = False) -> str:
        """The question as asked; `swapped` shows option B's text as A and vice versa."""
        a, b = (self.options["B"], self.options["A"]) if swapped else (self.options["A"], self.options["B"])
        return f"{self.stem}\nA. {a}\nB. {b}\nAnswer with the letter of the option that fits you, A or B."


_OPTION_RE = re.compile(r"^(.*?)\s*(?:\\n|\n)\s*A\s*[.:)]\s*(.*?)\s*(?:\\n|\n)\s*B\s*[.:)]\s*(.*?)\s*$", re.S)


def load_mcqa(data_dir=None) -> list[McqaItem]:
    """The questionnaire with item 75 fixed; every item must be one A/B question over one axis."""
    raw = json.loads(_data_file("dataset_mbti", "test", "mbti_mcqa.json", data_dir=data_dir).read_text())
    items = []
    for key, rec in raw.items():
        m = _OPTION_RE.match(rec["question"])
        if not m:
            raise PersonamixError(f"questionnaire item {key}: cannot find options A and B in {rec['question']!r}")
        poles = {**{o: rec[o] for o in "AB"}, **MCQA_FIXES.get(key, {})}
        if poles["B"] != OPPOSITE.get(poles["A"]):
            raise PersonamixError(f"questionnaire item {key}: options are labelled {poles}, not two poles of one axis")
        items.append(McqaItem(key, m.group(1).strip(), {"A": m.group(2), "B": m.group(3)}, poles))
    return items


def load_qa(mbti_type: str, data_dir=None) -> list[dict]:
    rows = json.loads(_data_file("dataset_mbti", "test", f"mbti_qa_{mbti_type}.json", data_dir=data_dir).read_text())
    return [{"id": str(i), "question": (r["instruction"] + ("\n" + r["input"].strip() if r["input"].strip() else "")),
             "reference": r["output"].strip()} for i, r in enumerate(rows)]


def load_roleplay(data_dir=None) -> tuple[list[dict], str]:
    path = _data_file("dataset_roleplay", "test", "test.jsonl", data_dir=data_dir)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    template = _data_file("prompts", "roleplay_user_template.txt", data_dir=data_dir).read_text()
    return [dict(r, id=str(i)) for i, r in enumerate(rows)], template


def pole_descriptions(data_dir=None) -> dict[str, str]:
    return json.loads(_data_file("prompts", "mbti_pole_descriptions.json", data_dir=data_dir).read_text())


def persona_system_prompt(persona: str, descriptions: Mapping[str, str]) -> str:
    """The prompting baseline: the paper's description of each pole of the persona."""
    return " ".join(descriptions[p].strip() for p in parse_persona(persona))


def parse_choice(text: str) -> str | None:
    """"A" or "B" from a generated answer ("B", "B. Strict...", "The answer is A"), else None."""
    m = re.match(r"\s*\(?([AB])\b", text)
    if m:
        return m.group(1)
    m = re.search(r"\b(?:answer|option|choose|choice|pick|prefer)\b\W{0,3}(?:is\W{0,3})?(?:option\W{0,3})?\(?([AB])\b",
                  text, re.I)
    return m.group(1).upper() if m else None


__all__ = ["PAPER_TYPES", "McqaItem", "load_mcqa", "load_qa", "load_roleplay", "pole_descriptions",
           "persona_system_prompt", "parse_choice"]
