"""MBTI and role-play evaluations of MPG against the paper's baselines.

Methods (one persona = equal weights on its adapters, as in the paper):
    base       the reference alone, no persona
    prompt     the reference with the paper's pole descriptions as the system prompt
               (role-play: the paper's template, which already states the profile/personality)
    single-X   adapter X alone (exactly pi_X)
    merge      one adapter = sum_i w_i delta_i (Soups weight merging, merge.py)
    geometric  MOD-style product of experts (targets.aggregate, "geometric")
    token, token-rs, scr, spec   MPG's linear target with each sampler

Tasks:
    mcqa      the 93-item A/B questionnaire; an answer is read as P(A) vs P(B) of the method's
              next-token distribution (exact, no sampling: token/token-rs/spec share one target,
              reported as "mpg"), and optionally parsed from a short generated answer.
    qa        open questions (mbti_qa_<TYPE>.json) answered by each method; scored by the judges
              (judges.py), similarity to the reference answer, perplexity under the reference
              and distinct-n.
    roleplay  dataset_roleplay/test: personality + profile adapters (N=2).

Raw outputs are appended to JSONL files (one line per answer), so a run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .backend import Session
from .data import OPPOSITE, default_data_dir
from .errors import PersonamixError
from .generator import Generator
from .targets import Target, parse_persona, token_target

PAPER_TYPES = ("ENTJ", "ESTP", "INFJ")
ALL_TYPES = tuple("".join(t) for t in product("EI", "SN", "TF", "JP"))
MPG_METHODS = ("token", "token-rs", "scr", "spec")
BASELINES = ("base", "prompt", "merge", "geometric")
#: Item 75 is labelled A=T, B=N upstream; its options ("Good-tempered but inconsistent" /
#: "Strict but organized") are the P and J poles.
MCQA_FIXES = {"75": {"A": "P", "B": "J"}}
AXIS_OF = {p: ax for ax in ("EI", "SN", "TF", "JP") for p in ax}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

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
        return AXIS_OF[self.poles["A"]]

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


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------

def method_plan(method: str, persona_weights: Mapping[str, float], merge_name: str | None) -> dict:
    """How a method maps to a Generator call: {names, weights, aggregation, method, system}."""
    if method in ("base", "prompt"):
        return {"weights": None, "method": "base", "system": method == "prompt"}
    if method.startswith("single-"):
        return {"weights": {method[len("single-"):]: 1.0}, "method": "token"}
    if method == "merge":
        if merge_name is None:
            raise PersonamixError("the merge baseline needs a merged adapter")
        return {"weights": {merge_name: 1.0}, "method": "token"}
    if method == "geometric":
        return {"weights": dict(persona_weights), "method": "token", "aggregation": "geometric"}
    if method in MPG_METHODS:
        return {"weights": dict(persona_weights), "method": method}
    raise PersonamixError(f"unknown evaluation method {method!r}: use {', '.join(BASELINES + MPG_METHODS)} "
                          "or single-<adapter>")


def _messages(user: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def answer(gen: Generator, user: str, method: str, persona_weights: Mapping[str, float],
           merge_name: str | None = None, system: str | None = None, **sampling) -> dict:
    """One generated answer of `method`: {answer, stats, tokens, perplexity under the reference}.
    `system` is used by the prompting baseline only."""
    plan = method_plan(method, persona_weights, merge_name)
    prompt = _messages(user, system if plan.pop("system", False) else None)
    weights = plan.pop("weights")
    kw = {"weights": weights} if weights is not None else {}
    r = gen.generate(prompt, **plan, **kw, **sampling)
    return {"answer": r.text, "stats": r.stats.to_dict(), "tokens": len(r.token_ids),
            "perplexity": perplexity(gen, r.prompt_ids, r.token_ids)}


# ---------------------------------------------------------------------------------------------
# Questionnaire read-outs
# ---------------------------------------------------------------------------------------------

def letter_ids(tokenizer, letter: str) -> list[int]:
    """Token ids that spell the answer letter on their own ("A", " A")."""
    ids = set()
    for text in (letter, " " + letter):
        enc = tokenizer.encode(text, add_special_tokens=False)
        if len(enc) == 1:
            ids.add(enc[0])
    if not ids:
        raise PersonamixError(f"the tokenizer has no single token for the answer letter {letter!r}")
    return sorted(ids)


def next_token_logprobs(gen: Generator, prompt_ids: list[int], names: Sequence[str]) -> torch.Tensor:
    """log-softmax of the reference (row 0) and of each named adapter (rows 1..) after the prompt."""
    session = Session(gen.backend, names)
    return torch.log_softmax(session.logits("all" if names else "ref", prompt_ids, 1)[:, 0].float(), dim=-1)


def choice_prob(logp: torch.Tensor, a_ids: list[int], b_ids: list[int]) -> float:
    """P(A) / (P(A) + P(B)) from next-token log-probs [V]."""
    la, lb = torch.logsumexp(logp[a_ids], 0), torch.logsumexp(logp[b_ids], 0)
    return float(torch.sigmoid(la - lb))


def mcqa_probs(gen: Generator, items: Sequence[McqaItem], personas: Sequence[str], adapters: Sequence[str],
               merges: Mapping[str, str], descriptions: Mapping[str, str],
               singles: bool = True, progress=None, workers: int = 1) -> list[dict]:
    """P(option A) per (item, persona, method) from the exact next-token distribution of each
    method's target, averaged over both option orders: small models favour a letter, and
    P(A | A first) and P(A's text | shown as B) cancel that bias (p_a_as_shown keeps the raw one).

    One forward over the reference + all adapters + all merged adapters per (item, order) serves
    every persona; the prompting baseline needs one reference forward per (item, order, persona).
    `workers` > 1 reads that many items at once (threads; the batched backend shares forwards).
    """
    tok = gen.tokenizer
    a_ids, b_ids = letter_ids(tok, "A"), letter_ids(tok, "B")
    names = list(dict.fromkeys(list(adapters) + [merges[p] for p in personas if p in merges]))
    row = {n: i + 1 for i, n in enumerate(names)}

    def both_orders(item):
        out = [_item_probs(gen, item, swapped, personas, names, row, merges, descriptions, singles, a_ids, b_ids)
               for swapped in (False, True)]
        if progress is not None:
            progress.update(1)
        return out

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="personamix-mcqa") as pool:
            per_item = list(pool.map(both_orders, items))
    else:
        per_item = [both_orders(item) for item in items]
    rows = []
    for item, both in zip(items, per_item):
        for persona in personas:
            for method, p in both[0][persona].items():
                rows.append({"item": item.id, "axis": item.axis, "persona": persona, "method": method,
                             "p_a": 0.5 * (p + 1.0 - both[1][persona][method]), "p_a_as_shown": p,
                             "target_pole": next(x for x in persona if AXIS_OF[x] == item.axis),
                             "pole_a": item.poles["A"]})
    return rows


def _item_probs(gen, item, swapped, personas, names, row, merges, descriptions, singles, a_ids, b_ids):
    """{persona: {method: P(letter A)}} for one order of the options."""
    lp = next_token_logprobs(gen, gen.encode(_messages(item.prompt(swapped), None)), names)
    out = {}
    for persona in personas:
        letters = parse_persona(persona)
        sys_ids = gen.encode(_messages(item.prompt(swapped), persona_system_prompt(persona, descriptions)))
        p = {"base": choice_prob(lp[0], a_ids, b_ids),
             "prompt": choice_prob(next_token_logprobs(gen, sys_ids, [])[0], a_ids, b_ids)}
        if singles:
            p.update({f"single-{x}": choice_prob(lp[row[x]], a_ids, b_ids) for x in letters})
        if persona in merges:
            p["merge"] = choice_prob(lp[row[merges[persona]]], a_ids, b_ids)
        sub = lp[[0] + [row[x] for x in letters]]
        w = tuple(1.0 / len(letters) for _ in letters)
        for agg, label in (("geometric", "geometric"), ("linear", "mpg")):
            logp_star, _, _ = token_target(sub, Target(tuple(letters), w, agg))
            p[label] = choice_prob(logp_star, a_ids, b_ids)
        out[persona] = p
    return out


def parse_choice(text: str) -> str | None:
    """"A" or "B" from a generated answer ("B", "B. Strict...", "The answer is A"), else None."""
    m = re.match(r"\s*\(?([AB])\b", text)
    if m:
        return m.group(1)
    m = re.search(r"\b(?:answer|option|choose|choice|pick|prefer)\b\W{0,3}(?:is\W{0,3})?(?:option\W{0,3})?\(?([AB])\b",
                  text, re.I)
    return m.group(1).upper() if m else None


def mcqa_summary(rows: Iterable[dict]) -> dict:
    """Per (method): per-axis agreement (hard: the likelier option is the target pole, a tie -- an
    unparsed generated answer -- counts one half; soft: mean P(target pole)), and whole-type
    accuracy (each axis's majority pole, over personas)."""
    by: dict[str, dict] = {}
    for r in rows:
        p_target = r["p_a"] if r["pole_a"] == r["target_pole"] else 1 - r["p_a"]
        m = by.setdefault(r["method"], {})
        m.setdefault((r["persona"], r["axis"]), []).append(p_target)
    out = {}
    for method, cells in by.items():
        axes = sorted({ax for _, ax in cells}, key=["EI", "SN", "TF", "JP"].index)
        hard = {ax: float(np.mean([np.mean(_hit(v)) for (_, a), v in cells.items() if a == ax])) for ax in axes}
        soft = {ax: float(np.mean([np.mean(v) for (_, a), v in cells.items() if a == ax])) for ax in axes}
        personas = sorted({p for p, _ in cells})
        typed = [all(np.mean(_hit(cells[(p, ax)])) > 0.5 for ax in axes if (p, ax) in cells)
                 for p in personas]
        out[method] = {"axis_agreement": hard, "axis_soft": soft,
                       "mean_agreement": float(np.mean(list(hard.values()))),
                       "type_accuracy": float(np.mean(typed)), "personas": len(personas)}
    return out


def _hit(p_target) -> np.ndarray:
    p = np.asarray(p_target, dtype=float)
    return np.where(p > 0.5, 1.0, np.where(p == 0.5, 0.5, 0.0))


# ---------------------------------------------------------------------------------------------
# Open-answer metrics
# ---------------------------------------------------------------------------------------------

def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over a set of answers (whitespace tokens, lower-cased)."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [t.lower().split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def perplexity(gen: Generator, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of the answer under the reference, given the prompt."""
    if not answer_ids:
        return float("nan")
    seq = prompt_ids + answer_ids[:-1]
    logits = Session(gen.backend, ()).logits("ref", seq, len(answer_ids))[0].float()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer_ids, device=logits.device)[:, None])
    return float(torch.exp(-lp.mean()))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


# ---------------------------------------------------------------------------------------------
# Result files
# ---------------------------------------------------------------------------------------------

class Results:
    """An append-only JSONL file of answers keyed by (task, persona, method, id): resumable."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        for n, line in enumerate(lines):
            if line.strip():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:       # a last line cut by an interrupted run: drop it, redo it
                    if n != len(lines) - 1:
                        raise PersonamixError(f"{self.path} line {n + 1} is not JSON") from None
                    self.path.write_text("".join(x + "\n" for x in lines[:n]))
        self._done = {self.key(r) for r in self.rows}

    @staticmethod
    def key(r: Mapping) -> tuple:
        return (r["task"], r["persona"], r["method"], str(r["id"]))

    def __contains__(self, key: tuple) -> bool:
        return key in self._done

    def add(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self._done.add(self.key(row))


def fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3g}"


__all__ = ["PAPER_TYPES", "ALL_TYPES", "MPG_METHODS", "BASELINES", "McqaItem", "load_mcqa", "load_qa",
           "load_roleplay", "pole_descriptions", "persona_system_prompt", "method_plan", "answer",
           "mcqa_probs", "mcqa_summary", "parse_choice", "distinct_n", "perplexity", "Results"]
