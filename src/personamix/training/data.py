"""Preference data for the single-attribute models: the MPG paper's MBTI and role-play DPO pairs.

A record is `{"prompt": str, "chosen": [user msg, assistant msg], "rejected": [...]}`. An MBTI
record's pole is read from its prompt ("Now you are the 'I' (Introversion) person ..."); its
chosen answer is in that pole's voice and the rejected one in the opposite pole's.

Choices (documented in docs/adapters.md):
- the preference data for pole X is X's records as they are plus the opposite pole's records
  with chosen/rejected swapped: both say "X's voice is preferred";
- by default the prompt is the bare instruction (the text after "Please answer the questions:"),
  so the trait has to live in the adapter, not in the prompt (`keep_description=True` keeps it);
- a fixed, seeded 15% of each data set (an MBTI axis, a role-play set) is held out; it is the
  same for both poles of an axis, so neither pole's adapter ever trains on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import PersonamixError, first_line
from ..mbti import AXES as MBTI_AXES
from ..mbti import OPPOSITE, POLES, axis_key

#: The MBTI axes as the paper's data sets name them ("e_i", ...).
AXES = tuple(axis_key(a) for a, _ in MBTI_AXES)
ROLEPLAY_ATTRIBUTES = ("personality", "profile")
HUB_DATASETS = {**{ax: f"RongxinChen/MBTI_dpo_{ax}" for ax in AXES},
                "personality": "RongxinChen/dpo_personality", "profile": "RongxinChen/dpo_profile"}

_POLE_RE = re.compile(r"Now you are the '([A-Za-z])'")
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")
_INSTRUCTION_MARK = "Please answer the questions:"


@dataclass(frozen=True)
class PreferencePair:
    """One DPO pair in TRL's conversational format (prompt/chosen/rejected as message lists)."""

    prompt: str
    chosen: str
    rejected: str
    key: str   # what the held-out split groups on (the original prompt)

    def to_trl(self) -> dict:
        return {"prompt": [{"role": "user", "content": self.prompt}],
                "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}]}


def default_data_dir() -> Path | None:
    """$PERSONAMIX_DATA, else ../shared/data/mpg beside a source checkout, else None."""
    env = os.environ.get("PERSONAMIX_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for up in here.parents[:5]:
        cand = up.parent / "shared" / "data" / "mpg"
        if cand.is_dir():
            return cand
    return None


def data_source(attribute: str, data_dir: str | os.PathLike | None = None) -> str:
    """Where the pairs for an MBTI axis ('e_i') or role-play set ('personality') live: a local
    directory of *_prefs.json files when there is one, else the hub dataset id."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if attribute in AXES:
        rel = Path("dataset_mbti/dpo") / f"MBTI_dpo_{attribute}"
    elif attribute in ROLEPLAY_ATTRIBUTES:
        rel = Path("dataset_roleplay/dpo") / f"dpo_{attribute}"
    else:
        raise PersonamixError(f"unknown attribute {attribute!r}: use an MBTI pole or one of {ROLEPLAY_ATTRIBUTES}")
    if root is not None:
        if not root.is_dir():
            raise PersonamixError(f"data directory {root} does not exist")
        if not (root / rel).is_dir():
            raise PersonamixError(f"{root / rel} does not exist: is {root} the paper's data directory "
                                  "(holding dataset_mbti/ and dataset_roleplay/)?")
        return str(root / rel)
    return HUB_DATASETS[attribute]


def load_records(source: str | os.PathLike) -> list[dict]:
    """Records from a .json list, a .jsonl file, a directory of them, or a hub dataset id."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl"))
        if not files:
            raise PersonamixError(f"{p} holds no .json or .jsonl files")
        return [r for f in files for r in load_records(f)]
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
        except json.JSONDecodeError as e:
            raise PersonamixError(f"{p} is not valid JSON: {e}") from None
        if not isinstance(records, list):
            raise PersonamixError(f"{p}: expected a list of records, got {type(records).__name__}")
        return records
    if not _HUB_ID_RE.match(str(source)):
        raise PersonamixError(f"preference data {source} does not exist")
    return _load_hub(str(source))


def _load_hub(dataset_id: str) -> list[dict]:
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset_id)
    except Exception as e:
        raise PersonamixError(f"preference data {dataset_id!r} is neither a local file nor a loadable hub "
                              f"dataset ({type(e).__name__}: {first_line(e)})") from None
    return [dict(r) for split in ds.values() for r in split]


def _answer(record: dict, field: str, where: str) -> str:
    msgs = record.get(field)
    if isinstance(msgs, str):
        return msgs
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        return str(msgs[-1]["content"])
    raise PersonamixError(f"{where}: {field!r} must end with an assistant message, got {str(msgs)[:120]}")


def parse_pole(prompt: str, where: str = "record") -> str:
    """The MBTI pole a record rewards, read from its prompt; an error when there is none."""
    m = _POLE_RE.search(prompt or "")
    if not m or m.group(1).upper() not in OPPOSITE:
        raise PersonamixError(f"{where}: no MBTI pole found in the prompt (expected \"Now you are the 'X'\"): "
                              f"{(prompt or '')[:120]!r}")
    return m.group(1).upper()


def bare_instruction(prompt: str, where: str = "record") -> str:
    """The instruction with the MBTI preamble and pole description removed."""
    if _INSTRUCTION_MARK not in prompt:
        raise PersonamixError(f"{where}: prompt has no {_INSTRUCTION_MARK!r} to cut the persona description at")
    return prompt.split(_INSTRUCTION_MARK, 1)[1].strip()


def mbti_pairs(pole: str, records: list[dict], keep_description: bool = False) -> list[PreferencePair]:
    """Pairs saying "pole's voice is preferred": its own records as they are, the opposite pole's
    records with chosen and rejected swapped. Every record must name a pole of this axis."""
    pole = pole.upper()
    axis_key(pole)                      # an unknown pole is an error
    axis = {pole, OPPOSITE[pole]}
    pairs = []
    for i, r in enumerate(records):
        where = f"record {i}"
        if not isinstance(r, dict) or "prompt" not in r:
            raise PersonamixError(f"{where}: expected an object with 'prompt', 'chosen', 'rejected'")
        p = parse_pole(r["prompt"], where)
        if p not in axis:
            raise PersonamixError(f"{where} is for pole {p!r}, not the {'/'.join(sorted(axis))} axis")
        chosen, rejected = _answer(r, "chosen", where), _answer(r, "rejected", where)
        if p != pole:
            chosen, rejected = rejected, chosen
        prompt = r["prompt"] if keep_description else bare_instruction(r["prompt"], where)
        pairs.append(PreferencePair(prompt, chosen, rejected, key=r["prompt"]))
    return pairs


def plain_pairs(records: list[dict]) -> list[PreferencePair]:
    """Role-play pairs, prompt kept as it is (the profile/personality is the task)."""
    pairs = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
            raise PersonamixError(f"record {i}: expected an object with a string 'prompt'")
        pairs.append(PreferencePair(r["prompt"], _answer(r, "chosen", f"record {i}"),
                                    _answer(r, "rejected", f"record {i}"), key=r["prompt"]))
    return pairs


def is_held_out(key: str, fraction: float = 0.15, seed: int = 0) -> bool:
    """Fixed split: a record is held out when the hash of (seed, its prompt) falls under `fraction`.
    Records with one prompt share a side, and the split does not depend on file order."""
    h = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def split(pairs: list[PreferencePair], fraction: float = 0.15, seed: int = 0
          ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held_out)."""
    if not 0 < fraction < 1:
        raise PersonamixError(f"held-out fraction must be in (0, 1), got {fraction}")
    train = [p for p in pairs if not is_held_out(p.key, fraction, seed)]
    held = [p for p in pairs if is_held_out(p.key, fraction, seed)]
    if not train or not held:
        raise PersonamixError(f"{len(pairs)} pairs are too few for a {fraction:.0%} held-out split")
    return train, held


def attribute_pairs(attribute: str, data: str | os.PathLike | None = None, data_dir=None,
                    keep_description: bool = False) -> list[PreferencePair]:
    """All pairs for an MBTI pole ('E') or role-play attribute ('profile'). `data` overrides the
    source (a file, directory or hub id); otherwise the paper's data is found via data_dir."""
    if attribute.upper() in OPPOSITE and len(attribute) == 1:
        source = data if data is not None else data_source(axis_key(attribute), data_dir)
        return mbti_pairs(attribute, load_records(source), keep_description)
    if attribute in ROLEPLAY_ATTRIBUTES or data is not None:
        source = data if data is not None else data_source(attribute, data_dir)
        return plain_pairs(load_records(source))
    raise PersonamixError(f"unknown attribute {attribute!r}: use an MBTI pole ({', '.join(POLES)}), "
                          f"one of {ROLEPLAY_ATTRIBUTES}, or give the data explicitly")
