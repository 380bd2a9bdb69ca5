"""The paper's preference data: pole parsing over every shared record, the opposite-pole swap,
the held-out split, and errors for bad files and records."""
import json
from collections import Counter
from pathlib import Path

import pytest

from personamix import PersonamixError
from personamix.mbti import OPPOSITE, axis_key
from personamix.training.data import (
    AXES,
    attribute_pairs,
    bare_instruction,
    data_source,
    default_data_dir,
    load_records,
    mbti_pairs,
    parse_pole,
    split,
)

DATA = default_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="the paper's data (../shared/data/mpg) is not beside the checkout")

# ../shared/README.md: records per pole over all files of each axis
README_COUNTS = {"E": 323 + 36, "I": 323 + 36, "S": 408, "N": 372, "T": 220, "F": 176, "J": 133, "P": 112}


@needs_data
def test_pole_counts_match_the_readme():
    counts = Counter()
    for axis in AXES:
        for f in sorted(Path(data_source(axis)).glob("*.json")):
            for i, r in enumerate(json.loads(f.read_text())):
                counts[parse_pole(r["prompt"], f"{f.name}[{i}]")] += 1
    assert dict(counts) == README_COUNTS


@needs_data
@pytest.mark.parametrize("pole", sorted(OPPOSITE))
def test_pole_pairs_are_own_plus_swapped_opposite(pole):
    records = load_records(data_source(axis_key(pole)))
    pairs = mbti_pairs(pole, records)
    assert len(pairs) == README_COUNTS[pole] + README_COUNTS[OPPOSITE[pole]]
    for r, p in zip(records, pairs):
        own = parse_pole(r["prompt"]) == pole
        assert p.chosen == r["chosen" if own else "rejected"][-1]["content"]
        assert p.rejected == r["rejected" if own else "chosen"][-1]["content"]
        assert "MBTI" not in p.prompt and p.prompt == bare_instruction(r["prompt"])


@needs_data
def test_held_out_split_is_fixed_shared_by_both_poles_and_about_15_percent():
    for axis in AXES:
        a, b = axis.upper().split("_")
        train_a, held_a = split(attribute_pairs(a))
        train_b, held_b = split(attribute_pairs(b))
        assert {p.key for p in held_a} == {p.key for p in held_b}
        assert not {p.key for p in train_a} & {p.key for p in held_a}
        assert 0.10 < len(held_a) / (len(held_a) + len(train_a)) < 0.20
    assert split(attribute_pairs("E"))[1] == split(attribute_pairs("E"))[1]
    assert split(attribute_pairs("E"), seed=1)[1] != split(attribute_pairs("E"))[1]


@needs_data
def test_roleplay_keeps_prompt_and_keep_description_keeps_pole_text():
    pairs = attribute_pairs("profile")
    assert len(pairs) == 500 and all("Profile:" in p.prompt for p in pairs)
    kept = attribute_pairs("E", keep_description=True)
    assert all("Now you are the" in p.prompt for p in kept)


def _record(pole: str, instr: str = "say hi") -> dict:
    prompt = f"MBTI preamble. Now you are the '{pole}' person. Please answer the questions:{instr}"
    return {"prompt": prompt, "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "B"}]}


def test_swap_on_synthetic_records():
    pairs = mbti_pairs("E", [_record("E", "x"), _record("I", "y")])
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("x", "A", "B"), ("y", "B", "A")]


def test_record_without_pole_is_an_error(tmp_path):
    bad = _record("E")
    bad["prompt"] = "Please answer the questions: what?"
    f = tmp_path / "d.json"
    f.write_text(json.dumps([_record("E"), bad]))
    with pytest.raises(PersonamixError, match="record 1: no MBTI pole"):
        attribute_pairs("E", data=str(f))


def test_record_of_another_axis_is_an_error():
    with pytest.raises(PersonamixError, match="not the E/I axis"):
        mbti_pairs("E", [_record("S")])


def test_missing_file_and_bad_json_are_errors(tmp_path):
    with pytest.raises(PersonamixError, match="does not exist"):
        attribute_pairs("E", data=str(tmp_path / "nope.json"))
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(PersonamixError, match="not valid JSON"):
        load_records(f)
    with pytest.raises(PersonamixError, match="does not exist"):
        data_source("e_i", tmp_path / "missing")
    with pytest.raises(PersonamixError, match="unknown MBTI pole"):
        axis_key("X")
    with pytest.raises(PersonamixError, match="unknown attribute"):
        attribute_pairs("extraversion")


def test_hub_id_without_hub_is_a_clear_error():
    with pytest.raises(PersonamixError, match="neither a local file nor a loadable hub dataset"):
        load_records("nobody/no-such-dataset")
