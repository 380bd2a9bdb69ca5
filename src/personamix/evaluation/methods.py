"""The methods an evaluation compares, and how each answers (one persona = equal weights on its
adapters, as in the paper):

    base       the reference alone, no persona
    prompt     the reference with the paper's pole descriptions as the system prompt
               (role-play: the paper's template, which already states the profile/personality)
    single-X   adapter X alone (exactly pi_X); `single-*`: each of the persona's adapters alone
    merge      one adapter = sum_i w_i delta_i (Soups weight merging, training/merge.py)
    geometric  MOD-style product of experts (engine/targets.aggregate, "geometric")
    token, token-rs, scr, spec   MPG's linear target with each sampler

A method answers either by generating (`answer`) or, for the questionnaire, by the exact
next-token distribution of its target (`mcqa_probs`: token/token-rs/spec share one target,
reported as "mpg").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import attributes
from ..engine.session import Session
from ..engine.targets import Target, token_target
from ..errors import PersonamixError
from ..generator import Generator
from ..mbti import parse_persona, pole_of
from ..training.merge import merged_adapter
from .metrics import perplexity
from .tasks import McqaItem, persona_system_prompt

MPG_METHODS = ("token", "token-rs", "scr", "spec")
BASELINES = ("base", "prompt", "merge", "geometric")
ROLEPLAY = "personality+profile"


def persona_weights(persona: str) -> dict[str, float]:
    """Equal weights on the persona's adapters: MBTI letters ("ENTJ"), the role-play pair, or
    attribute poles joined by '+' ("positive+asking")."""
    if persona == ROLEPLAY:
        return {"personality": 0.5, "profile": 0.5}
    poles = attributes.parse_persona(persona) if "+" in persona else parse_persona(persona)
    return {p: 1.0 / len(poles) for p in poles}


def expand_methods(methods: Sequence[str], persona: str) -> list[str]:
    """`methods` with `single-*` replaced by single-X for each of the persona's adapters."""
    out = []
    for m in methods:
        out += [f"single-{x}" for x in persona_weights(persona)] if m == "single-*" else [m]
    return list(dict.fromkeys(out))


def eval_generator(model: str, adapters: Mapping[str, str], personas, methods, backend: str = "auto",
                   device=None) -> tuple[Generator, dict[str, str]]:
    """A generator over the adapters plus, when `merge` is asked for, one merged adapter per persona."""
    adapters = dict(adapters)
    merges = {}
    if "merge" in methods:
        for persona in personas:
            name = "merge-" + ("rp" if persona == ROLEPLAY else persona)
            adapters[name] = merged_adapter(model, adapters, persona_weights(persona))
            merges[persona] = name
    return Generator.from_pretrained(model, adapters=adapters, backend=backend, device=device), merges


def method_plan(method: str, persona_weights: Mapping[str, float], merge_name: str | None) -> dict:
    """How a method maps to a Generator call: {weights, method, aggregation, system}."""
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
    raise PersonamixError(f"unknown evaluation method {method!r}: use {', '.join(BASELINES + MPG_METHODS)}, "
                          "single-<adapter> or single-*")


def check_methods(methods: Sequence[str]) -> None:
    """Raise on an unknown method name (before anything loads)."""
    for m in methods:
        if m != "single-*":
            method_plan(m, {}, "merge")


def messages(user: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def answer(gen: Generator, user: str, method: str, persona_weights: Mapping[str, float],
           merge_name: str | None = None, system: str | None = None, **sampling) -> dict:
    """One generated answer of `method`: {answer, stats, tokens, perplexity under the reference}.
    `system` is used by the prompting baseline only."""
    plan = method_plan(method, persona_weights, merge_name)
    prompt = messages(user, system if plan.pop("system", False) else None)
    weights = plan.pop("weights")
    kw = {"weights": weights} if weights is not None else {}
    r = gen.generate(prompt, **plan, **kw, **sampling)
    return {"answer": r.text, "stats": r.stats.to_dict(), "tokens": len(r.token_ids),
            "perplexity": perplexity(gen, r.prompt_ids, r.token_ids)}


# ---------------------------------------------------------------------------------------------
# The questionnaire's exact read-out
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
    with Session(gen.backend, names) as session:
        return torch.log_softmax(session.logits("all" if names else "ref", prompt_ids, 1)[:, 0].float(), dim=-1)


def choice_prob(logp: torch.Tensor, a_ids: list[int], b_ids: list[int]) -> float:
    """P(A) / (P(A) + P(B)) from next-token log-probs [V]."""
    la, lb = torch.logsumexp(logp[a_ids], 0), torch.logsumexp(logp[b_ids], 0)
    return float(torch.sigmoid(la - lb))


def readout_methods(methods: Sequence[str], persona: str) -> list[str]:
    """The questionnaire read-outs `methods` ask for: every exact MPG sampler shares one target,
    read once as "mpg"."""
    out = [m for m in expand_methods(methods, persona) if m not in MPG_METHODS]
    return out + (["mpg"] if any(m in MPG_METHODS for m in methods) else [])


def mcqa_probs(gen: Generator, items: Sequence[McqaItem], personas: Sequence[str], adapters: Sequence[str],
               merges: Mapping[str, str], descriptions: Mapping[str, str],
               methods: Sequence[str] = BASELINES + ("single-*",) + MPG_METHODS, progress=None,
               workers: int = 1) -> list[dict]:
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
    wanted = {p: readout_methods(methods, p) for p in personas}

    def both_orders(item):
        out = [_item_probs(gen, item, swapped, wanted, names, row, merges, descriptions, a_ids, b_ids)
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
                             "target_pole": pole_of(persona, item.axis), "pole_a": item.poles["A"]})
    return rows


def _item_probs(gen, item, swapped, wanted, names, row, merges, descriptions, a_ids, b_ids):
    """{persona: {method: P(letter A)}} for one order of the options."""
    lp = next_token_logprobs(gen, gen.encode(messages(item.prompt(swapped), None)), names)
    out = {}
    for persona, methods in wanted.items():
        letters = parse_persona(persona)
        p = {}
        for method in methods:
            if method == "base":
                p[method] = choice_prob(lp[0], a_ids, b_ids)
            elif method == "prompt":
                sys_ids = gen.encode(messages(item.prompt(swapped), persona_system_prompt(persona, descriptions)))
                p[method] = choice_prob(next_token_logprobs(gen, sys_ids, [])[0], a_ids, b_ids)
            elif method.startswith("single-"):
                p[method] = choice_prob(lp[row[method[len("single-"):]]], a_ids, b_ids)
            elif method == "merge":
                if persona in merges:
                    p[method] = choice_prob(lp[row[merges[persona]]], a_ids, b_ids)
            else:   # geometric, or mpg: the linear target (eq. 5) of the persona's adapters
                sub = lp[[0] + [row[x] for x in letters]]
                w = tuple(1.0 / len(letters) for _ in letters)
                agg = "geometric" if method == "geometric" else "linear"
                p[method] = choice_prob(token_target(sub, Target(tuple(letters), w, agg))[0], a_ids, b_ids)
        out[persona] = p
    return out


__all__ = ["MPG_METHODS", "BASELINES", "ROLEPLAY", "persona_weights", "expand_methods", "eval_generator",
           "method_plan", "check_methods", "answer", "letter_ids", "next_token_logprobs", "choice_prob",
           "readout_methods", "mcqa_probs"]
