"""Evaluations: questionnaire parsing and read-outs, judges, merging, every baseline on a tiny model."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from personamix.cli import main
from personamix.errors import PersonamixError
from personamix.evaluation import methods as em
from personamix.evaluation import metrics, runner, tasks
from personamix.evaluation.methods import eval_generator, persona_weights
from personamix.evaluation.runner import quality_gap
from personamix.testing import CHAT_WORDS, save_chat_tiny, save_lora
from personamix.training.data import default_data_dir

pytestmark = pytest.mark.skipif(default_data_dir() is None, reason="the paper's data (../shared/data/mpg) is absent")

WORDS = CHAT_WORDS + ["A", "B"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny chat model whose vocabulary has the answer letters, with adapters for ENTJ."""
    root = tmp_path_factory.mktemp("evaltiny")
    base = save_chat_tiny(root / "base", hidden=32, layers=2, max_positions=2048, words=WORDS)
    adapters = {p: save_lora(base, root / p, seed=i, targets=("q_proj", "v_proj")) for i, p in enumerate("ENTJ")}
    return base, adapters


# -- the questionnaire -------------------------------------------------------------------------

def test_every_questionnaire_item_parses_and_item_75_is_fixed():
    items = tasks.load_mcqa()
    assert len(items) == 93
    assert Counter(i.axis for i in items) == {"SN": 26, "TF": 23, "JP": 23, "EI": 21}
    for item in items:
        assert item.options["A"] and item.options["B"] and "\\n" not in item.stem
        assert item.poles["B"] == {"E": "I", "I": "E", "S": "N", "N": "S", "T": "F", "F": "T",
                                   "J": "P", "P": "J"}[item.poles["A"]]
    i75 = next(i for i in items if i.id == "75")
    assert i75.poles == {"A": "P", "B": "J"} and "inconsistent" in i75.options["A"] and "organized" in i75.options["B"]
    swapped = i75.prompt(swapped=True)
    assert swapped.index("organized") < swapped.index("inconsistent")


def test_a_mislabelled_item_is_an_error(tmp_path):
    (tmp_path / "dataset_mbti" / "test").mkdir(parents=True)
    (tmp_path / "dataset_mbti" / "test" / "mbti_mcqa.json").write_text(
        json.dumps({"1": {"question": "Q?\\nA.x\\nB.y", "A": "E", "B": "N"}}))
    with pytest.raises(PersonamixError, match="item 1.*not two poles of one axis"):
        tasks.load_mcqa(tmp_path)
    (tmp_path / "dataset_mbti" / "test" / "mbti_mcqa.json").write_text(
        json.dumps({"2": {"question": "no options here", "A": "E", "B": "I"}}))
    with pytest.raises(PersonamixError, match="item 2: cannot find options"):
        tasks.load_mcqa(tmp_path)


@pytest.mark.parametrize("text,want", [("A", "A"), (" B. Strict but organized", "B"), ("(A) plan", "A"),
                                       ("The answer is B.", "B"), ("I would choose option A", "A"),
                                       ("Both sound nice", None), ("Absolutely", None)])
def test_parse_choice(text, want):
    assert tasks.parse_choice(text) == want


def test_mcqa_summary_counts_agreement_and_whole_type():
    rows = []
    for axis, pole_a, target, p in (("EI", "E", "E", 0.9), ("EI", "E", "E", 0.2), ("EI", "I", "E", 0.1),
                                    ("SN", "S", "N", 0.3), ("TF", "T", "T", 0.6), ("JP", "P", "J", 0.4)):
        rows.append({"method": "m", "persona": "ENTJ", "axis": axis, "pole_a": pole_a, "target_pole": target,
                     "p_a": p})
    s = metrics.mcqa_summary(rows)["m"]
    assert s["axis_agreement"]["EI"] == pytest.approx(2 / 3)         # 0.9 yes, 0.2 no, 1-0.1 yes
    assert s["axis_soft"]["EI"] == pytest.approx((0.9 + 0.2 + 0.9) / 3)
    assert s["axis_agreement"]["SN"] == 1.0 and s["axis_agreement"]["JP"] == 1.0
    assert s["type_accuracy"] == 1.0                                  # every axis's majority is the target
    tie = metrics.mcqa_summary([{**rows[0], "p_a": 0.5}, {**rows[1], "p_a": 1.0}])["m"]   # unparsed = one half
    assert tie["axis_agreement"]["EI"] == pytest.approx(0.75) and tie["axis_soft"]["EI"] == pytest.approx(0.75)


def test_mcqa_probs_on_a_tiny_model_cover_every_baseline(tiny):
    base, adapters = tiny
    gen, merges = eval_generator(base, adapters, ["ENTJ"], ["merge"], device="cpu")
    items = tasks.load_mcqa()[:2]
    rows = em.mcqa_probs(gen, items, ["ENTJ"], list(adapters), merges, tasks.pole_descriptions())
    assert {r["method"] for r in rows} == {"base", "prompt", "merge", "geometric", "mpg", "single-E", "single-N",
                                           "single-T", "single-J"}
    only = em.mcqa_probs(gen, items, ["ENTJ"], list(adapters), merges, tasks.pole_descriptions(),
                         methods=("prompt", "single-N", "scr"))          # --methods reaches the read-out
    assert {r["method"] for r in only} == {"prompt", "single-N", "mpg"}
    assert {r["p_a"] for r in only if r["method"] == "mpg"} == {r["p_a"] for r in rows if r["method"] == "mpg"}
    assert all(0 < r["p_a"] < 1 and 0 < r["p_a_as_shown"] < 1 for r in rows)
    # the MPG (linear) read-out is the mixture of the persona's adapters: check it by hand
    item = items[0]
    a, b = em.letter_ids(gen.tokenizer, "A"), em.letter_ids(gen.tokenizer, "B")
    lp = em.next_token_logprobs(gen, gen.encode([{"role": "user", "content": item.prompt()}]), list("ENTJ"))
    mix = torch.logsumexp(lp[1:] + torch.log(torch.tensor(0.25)), 0)
    want = float(torch.exp(mix[a]).sum() / (torch.exp(mix[a]).sum() + torch.exp(mix[b]).sum()))
    got = next(r for r in rows if r["method"] == "mpg" and r["item"] == item.id)["p_a_as_shown"]
    assert got == pytest.approx(want, rel=1e-4)


# -- merging -----------------------------------------------------------------------------------

def _delta(path, module):
    w = load_file(f"{path}/adapter_model.safetensors")
    cfg = json.load(open(f"{path}/adapter_config.json"))
    a = next(v for k, v in w.items() if f"{module}.lora_A" in k).double()
    b = next(v for k, v in w.items() if f"{module}.lora_B" in k).double()
    return cfg["lora_alpha"] / cfg["r"] * b @ a


def test_merged_adapter_is_the_weighted_sum_of_deltas(tiny, tmp_path):
    from personamix.training.merge import _publish, merged_adapter

    base, adapters = tiny
    weights = {"E": 0.5, "N": 0.3, "T": -0.2}
    path = merged_adapter(base, adapters, weights, out=tmp_path / "m")
    for module in ("layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj"):
        want = sum(w * _delta(adapters[n], module) for n, w in weights.items())
        torch.testing.assert_close(_delta(path, module), want, rtol=1e-5, atol=1e-6)
    assert merged_adapter(base, adapters, weights, out=tmp_path / "m") == path      # reused, not rebuilt
    # a second process that merged the same persona at the same time keeps the first one's result
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "adapter_config.json").write_text("{}")
    _publish(twin, tmp_path / "m")
    torch.testing.assert_close(_delta(path, "layers.0.self_attn.q_proj"),
                               sum(w * _delta(adapters[n], "layers.0.self_attn.q_proj") for n, w in weights.items()),
                               rtol=1e-5, atol=1e-6)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "junk").write_text("")
    with pytest.raises(OSError):                     # a non-adapter directory in the way is an error, not kept
        _publish(twin, empty)
    with pytest.raises(PersonamixError, match="unknown adapter"):
        merged_adapter(base, adapters, {"Q": 1.0}, out=tmp_path / "q")


# -- generation baselines ----------------------------------------------------------------------

def test_every_method_answers_on_a_tiny_model(tiny):
    base, adapters = tiny
    methods = em.BASELINES + em.MPG_METHODS + ("single-E",)
    gen, merges = eval_generator(base, adapters, ["ENTJ"], methods, device="cpu")
    system = tasks.persona_system_prompt("ENTJ", tasks.pole_descriptions())
    for method in methods:
        a = em.answer(gen, "what do you like", method, persona_weights("ENTJ"), merges.get("ENTJ"), system,
                      max_new_tokens=6, seed=0, ignore_eos=True)
        assert a["tokens"] == 6 and a["answer"], method
        assert np.isfinite(a["perplexity"]) and a["perplexity"] > 1
        assert a["stats"]["method"] == em.method_plan(method, persona_weights("ENTJ"), "merge-ENTJ")["method"]
    with pytest.raises(PersonamixError, match="unknown evaluation method"):
        em.method_plan("beam", {}, None)


def test_results_file_resumes_after_a_cut_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    runner.Results(path).add({"task": "qa", "persona": "ENTJ", "method": "scr", "id": "0"})
    path.write_text(path.read_text() + '{"task": "qa", "pers')          # killed mid-write
    res = runner.Results(path)
    assert ("qa", "ENTJ", "scr", "0") in res and len(res.rows) == 1
    res.add({"task": "qa", "persona": "ENTJ", "method": "scr", "id": "1"})
    assert len(runner.Results(path).rows) == 2                              # the cut line is gone, not glued on
    path.write_text('{"broken"\n' + path.read_text())
    with pytest.raises(PersonamixError, match="line 1 is not JSON"):
        runner.Results(path)


def test_metrics():
    assert metrics.distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert metrics.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert metrics.distinct_n([""], 2) == 0.0
    v = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert metrics.cosine(v, np.array([[2.0, 0.0], [-1.0, -1.0]])) == pytest.approx([1.0, -1.0])
    gap = quality_gap({"prompt": 0.5, "merge": 0.6, "scr": 0.7, "token": 0.66, "base": 0.9})
    assert gap["best_mpg"] == "scr" and gap["best_baseline"] == "merge"
    assert gap["relative_gain"] == pytest.approx(0.1 / 0.6)


# -- judges ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embed():
    from personamix.evaluation.judges import Embedder
    return Embedder()


@pytest.mark.parametrize("features", ["minilm", "lexical"])
def test_mbti_judge_trains_on_a_slice_and_beats_chance_on_held_out_answers(embed, features):
    from personamix.evaluation.judges import judge_mbti, train_mbti_judges

    judges = train_mbti_judges(embed, limit=60, axes=("e_i",), features=features)
    j = judges["e_i"]
    assert j.n_train == 120 and j.n_held_out > 100 and j.meta["features"] == features
    assert j.held_out_accuracy > 0.62                 # chance is 0.5; the full judges reach ~0.75 / ~0.86
    p = judge_mbti(judges, embed, ["I love big parties and meeting new people, the more the merrier!",
                                   "I prefer a quiet evening alone with a book to recharge."])["e_i"]
    assert p[0] > 0.5 > p[1]
    with pytest.raises(PersonamixError, match="unknown judge features 'bert'"):
        train_mbti_judges(embed, limit=10, axes=("e_i",), features="bert")


def test_roleplay_judge_reads_the_trait_from_the_prompt(embed):
    from personamix.evaluation.judges import train_roleplay_judges, trait_text

    prompt = "Your task...\nProfile: She is a vet.\n\nPersonalities: She is shy.\nPlease ignore..."
    assert trait_text(prompt, "profile") == "She is a vet." and trait_text(prompt, "personality") == "She is shy."
    with pytest.raises(PersonamixError, match="Profile"):
        trait_text("no lines", "profile")
    j = train_roleplay_judges(embed, limit=60, attributes=("personality",))["personality"]
    assert j.n_train == 120 and j.held_out_accuracy > 0.6


# -- the command line --------------------------------------------------------------------------

def test_eval_cli_runs_resumes_and_rejects_bad_input(tiny, tmp_path, capsys):
    base, adapters = tiny
    args = ["eval", "qa", "--model", base, *[f"--adapter={n}={p}" for n, p in adapters.items()],
            "--types", "ENTJ", "--limit", "1", "--max-new-tokens", "4", "--judge-limit", "20",
            "--methods", "base,prompt,merge,scr", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "qa.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["base", "merge", "prompt", "scr"]
    assert not any("reference" in r for r in rows)            # ids only: the data is read from ../shared
    summary = json.loads((tmp_path / "qa_summary.json").read_text())
    assert set(summary["scores"]) == {"base", "prompt", "merge", "scr", "reference answers"}
    assert "similarity" not in summary["scores"]["reference answers"]["ENTJ"]    # judged, not compared to itself
    assert set(summary["judges"]) == {"e_i", "s_n", "t_f", "j_p"}
    assert summary["judge_features"] == "lexical" and set(summary["by_judge"]) == {"lexical", "minilm"}
    assert summary["by_judge"]["lexical"]["scores"] == summary["scores"]
    md = (tmp_path / "qa.md").read_text()
    assert md.count("| scr | 1 |") == 2 and "**Judges: lexical**" in md and "**Judges: minilm**" in md
    assert main(args) == 0                                            # resumed: nothing regenerated
    assert len((tmp_path / "qa.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    assert main(["eval", "qa", "--types", "ISTJ", "--out", str(tmp_path)]) == 2
    assert "open questions exist for ENTJ, ESTP, INFJ" in capsys.readouterr().err
    assert main(["eval", "mcqa", "--types", "ENTX", "--out", str(tmp_path)]) == 2
    assert "unknown persona letter" in capsys.readouterr().err
    assert main(["eval", "mcqa", "--methods", "base,beam", "--out", str(tmp_path)]) == 2
    assert "unknown evaluation method 'beam'" in capsys.readouterr().err
    assert main(["eval", "mcqa", "--readout", "vote", "--out", str(tmp_path)]) == 2
    assert "--readout" in capsys.readouterr().err
    assert main(["eval", "qa", "--judges", "lexical,bert", "--out", str(tmp_path)]) == 2
    assert "--judges: use one or more of lexical, minilm" in capsys.readouterr().err


def test_eval_roleplay_cli_scores_with_the_pair_judges(tiny, tmp_path):
    base, adapters = tiny
    args = ["eval", "roleplay", "--model", base, f"--adapter=personality={adapters['E']}",
            f"--adapter=profile={adapters['N']}", "--limit", "2", "--max-new-tokens", "4", "--judge-limit", "20",
            "--methods", "prompt,merge,token,scr", "--workers", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    summary = json.loads((tmp_path / "roleplay_summary.json").read_text())
    assert set(summary["scores"]) == {"prompt", "merge", "token", "scr", "reference answers"}
    assert set(summary["judges"]) == {"personality", "profile"} and summary["judge_features"] == "minilm"
    s = summary["scores"]["token"]["personality+profile"]
    assert s["n"] == 2 and 0 <= s["follows_personality"] <= 1 and 0 <= s["both"] <= s["follows_profile"] <= 1
    assert "| token | 2 |" in (tmp_path / "roleplay.md").read_text()


def test_eval_workers_give_the_same_answers_and_generate_only_skips_the_judges(tiny, tmp_path, capsys):
    """--workers runs generations concurrently (sharing forwards on the batched backend): the
    answers are the ones a sequential run gives, whatever order they finish in; their perplexities
    too, up to float rounding (a call packed with others runs other kernels than one alone)."""
    base, adapters = tiny
    common = ["--model", base, *[f"--adapter={n}={p}" for n, p in adapters.items()], "--types", "ENTJ",
              "--limit", "2", "--max-new-tokens", "5", "--methods", "base,prompt,token,scr,spec"]
    for workers in (1, 4):
        assert main(["eval", "qa", *common, "--workers", str(workers), "--generate-only",
                     "--out", str(tmp_path / f"w{workers}")]) == 0
        assert not (tmp_path / f"w{workers}" / "qa_summary.json").exists()     # no judges ran
    rows = {w: {(r["method"], r["id"]): (r["answer"], r["perplexity"]) for r in map(
        json.loads, (tmp_path / f"w{w}" / "qa.jsonl").read_text().splitlines())} for w in (1, 4)}
    assert len(rows[1]) == 10 and rows[4].keys() == rows[1].keys()
    for key, (answer, perplexity) in rows[1].items():
        assert rows[4][key][0] == answer and rows[4][key][1] == pytest.approx(perplexity, rel=1e-5)
    for workers in (1, 3):
        assert main(["eval", "mcqa", *common[:-2], "--limit", "3", "--workers", str(workers),
                     "--readout", "prob,gen", "--methods", "base,prompt,scr",
                     "--out", str(tmp_path / f"m{workers}")]) == 0
    for name in ("mcqa_prob.jsonl", "mcqa_gen.jsonl"):
        one, three = [sorted(map(json.loads, (tmp_path / d / name).read_text().splitlines()),
                             key=lambda r: (r.get("item", r.get("id")), r["method"], r["persona"]))
                      for d in ("m1", "m3")]
        assert len(one) > 0 and len(three) == len(one)
        for a, b in zip(one, three):
            assert a.keys() == b.keys() and a.get("answer") == b.get("answer")
            assert a["p_a"] == pytest.approx(b["p_a"], abs=1e-5)
    assert main(["eval", "qa", "--workers", "0", "--out", str(tmp_path)]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err


def test_bench_quick_runs_end_to_end(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAMIX_CACHE", str(tmp_path / "cache"))
    base, _ = tiny
    assert main(["bench", "--quick", "--model", base, "--out", str(tmp_path / "b")]) == 0
    summary = (tmp_path / "b" / "bench_summary.csv").read_text().splitlines()
    header = summary[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in summary[1:]]
    # N in {1, 2}, both settings, base/token/token-rs + scr/spec at k in {1, 2}, and generate()
    assert {(r["setting"], r["method"], r["k"]) for r in rows if r["N"] == "2"} >= {
        ("-", "generate()", ""), ("adapters", "base", ""), ("separate", "token-rs", ""), ("adapters", "scr", "2"),
        ("separate", "spec", "1")}
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    text = (tmp_path / "b" / "bench.md").read_text()
    assert "Targets" in text and (tmp_path / "b" / "bench_tps_vs_n.png").stat().st_size > 1000
    assert (tmp_path / "b" / "bench_vs_k.png").is_file()
    assert main(["bench", "--quick", "--model", base, "--k", "0", "--out", str(tmp_path / "c")]) == 2
