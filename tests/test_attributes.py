"""Attributes with exact scorers, their on-policy preference data, and the composition evaluation
(singles, personas, weight sweeps, bootstrap intervals, fronts), on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from personamix import PersonamixError
from personamix import attributes as attr
from personamix.evaluation.composition import bootstrap_diff, hypervolume
from personamix.testing import save_chat_tiny, save_lora
from personamix.training.data import default_data_dir

needs_data = pytest.mark.skipif(default_data_dir() is None, reason="the paper's data (../shared/data/mpg) is absent")
WORDS = ["<unk>", "<pad>", "</s>", "user", "assistant", "system", "great", "love", "wonderful", "terrible", "hate",
         "awful", "a", "it", "is", "extraordinarily", "incomprehensible", "?", ".", "you", "what", "do"]


def test_scorers_and_success():
    assert attr.sentiment("I love this wonderful day") > 0.5 > -0.5 > attr.sentiment("terrible awful hate")
    assert attr.word_length("a b cc") == pytest.approx(4 / 3) and attr.word_length("!!") == 0.0
    assert attr.asks("what do you like?") == 1.0 and attr.asks("I like it.") == 0.0
    raw = attr.scores("What a wonderful, extraordinarily delightful and beautiful celebration?")
    assert set(raw) == {"sentiment", "wording", "question"}
    assert attr.success("positive", raw) and attr.success("asking", raw) and not attr.success("telling", raw)
    assert attr.pole_score("negative", "great") == -attr.pole_score("positive", "great")
    assert attr.parse_persona("positive+plain+asking") == ["positive", "plain", "asking"]
    with pytest.raises(PersonamixError, match="two poles of one axis"):
        attr.parse_persona("positive+negative")
    with pytest.raises(PersonamixError, match="unknown attribute pole 'funny'"):
        attr.parse_persona("positive+funny")
    assert "upbeat" in attr.prompt_instruction(["positive", "asking"]) and "question" in \
        attr.prompt_instruction(["positive", "asking"])


def test_hypervolume_and_bootstrap():
    assert hypervolume([(1.0, 0.0), (0.0, 1.0)]) == 0.0
    assert hypervolume([(0.5, 0.5)]) == pytest.approx(0.25)
    assert hypervolume([(1.0, 0.2), (0.6, 0.6), (0.2, 1.0), (0.3, 0.3)]) == pytest.approx(0.2 + 0.6 * 0.4 + 0.2 * 0.4)
    rng = np.random.default_rng(0)
    a, b = rng.binomial(1, 0.6, 400).astype(float), rng.binomial(1, 0.3, 400).astype(float)
    est, lo, hi = bootstrap_diff(a, b, 1000)
    assert lo < est < hi and lo > 0.15 and hi < 0.45                  # 0.3 apart, 400 pairs
    est, lo, hi = bootstrap_diff(a, a, 500)
    assert est == 0 and lo == hi == 0
    rel, lo, hi = bootstrap_diff(a, b, 1000, relative=True)
    assert rel == pytest.approx((a.mean() - b.mean()) / b.mean()) and lo < rel < hi


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny chat model whose words carry sentiment, length and '?', and one random LoRA per pole."""
    root = tmp_path_factory.mktemp("attributes")
    base = save_chat_tiny(root / "base", hidden=32, layers=2, max_positions=2048, words=WORDS)
    adapters = {p: save_lora(base, root / p, seed=i, targets=("q_proj", "v_proj")) for i, p in enumerate(attr.POLES)}
    return base, adapters, root


@needs_data
def test_attribute_data_is_built_resumed_and_paired(tiny, tmp_path):
    from personamix.training.attribute_data import AttributeDataConfig, build, split_prompts

    base, _, _ = tiny
    train, held = split_prompts()
    assert not set(train) & set(held) and 0.1 < len(held) / (len(train) + len(held)) < 0.2
    cfg = AttributeDataConfig(out=tmp_path, model=base, prompts=6, samples=6, max_new_tokens=10, batch_size=4)
    stats = build(cfg)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(len(json.loads(x)["answers"]) == 6 for x in lines)
    assert not {json.loads(x)["prompt"] for x in lines} & set(held)            # no held-out prompt is sampled
    for pole in attr.POLES:
        pairs = json.loads((tmp_path / "pairs" / f"{pole}.json").read_text())
        assert len(pairs) == stats["poles"][pole]["pairs"] >= 1
        for p in pairs:    # chosen beats rejected on the pole by at least the axis margin
            chosen, rejected = p["chosen"][-1]["content"], p["rejected"][-1]["content"]
            gap = attr.pole_score(pole, chosen) - attr.pole_score(pole, rejected)
            assert gap >= attr.axis_of(pole).margin
    assert set(stats["correlations"]) == {"sentiment~wording", "sentiment~question", "wording~question"}
    before = (tmp_path / "samples.jsonl").read_text()
    build(cfg)                                                                   # resumed: nothing sampled again
    assert (tmp_path / "samples.jsonl").read_text() == before
    cfg.prompts = 8
    build(cfg)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 8 and \
        (tmp_path / "samples.jsonl").read_text().startswith(before)


@needs_data
def test_composition_eval_end_to_end(tiny, tmp_path, monkeypatch):
    from personamix.cli import main

    monkeypatch.setenv("PERSONAMIX_CACHE", str(tmp_path / "cache"))
    base, adapters, _ = tiny
    args = ["eval", "attributes", "--model", base, *[f"--adapter={p}={d}" for p, d in adapters.items()],
            "--limit", "3", "--max-new-tokens", "4", "--workers", "2", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "attributes_summary.json").read_text())
    assert set(summary["singles"]) == set(attr.POLES)
    assert summary["singles"]["positive"]["partner"] == "negative"
    personas = summary["personas"]
    assert list(personas) == ["positive+asking", "negative+asking", "positive+plain", "negative+complex",
                              "positive+plain+asking"]
    assert set(personas["positive+plain+asking"]) == {"base", "prompt", "single-positive", "single-plain",
                                                      "single-asking", "merge", "geometric", "token", "token-rs",
                                                      "scr", "spec"}
    s = personas["positive+asking"]["scr"]
    assert 0 <= s["joint"] <= min(s["success"].values()) <= 1 and s["perplexity"] > 1
    goal = summary["comparisons"]["goal"]
    assert goal["best_mpg"] in ("token", "token-rs", "scr", "spec") and goal["best_baseline"] in ("merge", "prompt")
    for pair in ("positive+asking", "negative+complex"):
        curves = summary["sweeps"][pair]
        assert set(curves) == {"token", "scr", "geometric", "merge"}
        assert [p["weight"] for p in curves["token"]["points"]] == [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
        assert 0 <= curves["merge"]["hypervolume"] <= 1
        assert (tmp_path / "run" / f"sweep_{pair.replace('+', '_')}.png").stat().st_size > 1000
    md = (tmp_path / "run" / "attributes.md").read_text()
    assert "Single adapters" in md and "hypervolume" in md and "Goal" in md
    rows = (tmp_path / "run" / "attributes.jsonl").read_text().splitlines()
    generated = [(r["persona"], r["method"]) for r in map(json.loads, rows) if r["task"] == "attributes"]
    assert ("singles", "single-asking") in generated and ("positive+asking", "token") in generated
    assert not [g for g in generated if g[0] != "singles" and (g[1] == "base" or g[1].startswith("single-"))]
    assert main(args) == 0                                                          # resumed: nothing regenerated
    assert len((tmp_path / "run" / "attributes.jsonl").read_text().splitlines()) == len(rows)
    assert main(["eval", "attributes", "--types", "positive+negative", "--out", str(tmp_path / "x")]) == 2
