"""What the evaluations measure: questionnaire agreement, judge agreement, similarity to the
reference answers, fluency (perplexity under the reference) and diversity (distinct-n)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..engine.session import Session
from ..mbti import AXES, axis_of, pole_of

AXIS_ORDER = ["".join(a) for a in AXES]


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
        axes = sorted({ax for _, ax in cells}, key=AXIS_ORDER.index)
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


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over a set of answers (whitespace tokens, lower-cased)."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [t.lower().split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def perplexity(gen, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of the answer under the reference, given the prompt."""
    if not answer_ids:
        return float("nan")
    seq = prompt_ids + answer_ids[:-1]
    with Session(gen.backend, ()) as session:
        logits = session.logits("ref", seq, len(answer_ids))[0].float()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer_ids, device=logits.device)[:, None])
    return float(torch.exp(-lp.mean()))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def score_answers(rows: list[dict], task: str, judges: dict, embed) -> dict:
    """Per (persona, method): judge agreement, similarity to the reference, perplexity, distinct-n.
    The judges also score the reference answers themselves (method "reference answers"): how
    well a judge reads this task's answers, i.e. the ceiling of its agreement."""
    out: dict = {}
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["persona"], r["method"]), []).append(r)
    for (persona, method), rs in sorted(groups.items()):
        texts = [r["answer"] for r in rs]
        sim = cosine(embed(texts), embed([r["reference"] for r in rs]))
        out.setdefault(method, {})[persona] = {
            "n": len(rs), "similarity": float(sim.mean()),
            "perplexity": float(np.nanmedian([r["perplexity"] for r in rs])),
            "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "tokens_per_s": float(np.median([r["stats"]["tokens_per_s"] for r in rs])),
            **judge_scores(task, persona, texts, rs, judges, embed)}
    for persona in sorted({p for p, _ in groups}):
        refs = list({r["id"]: r for r in rows if r["persona"] == persona}.values())
        out.setdefault("reference answers", {})[persona] = {
            "n": len(refs), **judge_scores(task, persona, [r["reference"] for r in refs], refs, judges, embed)}
    return out


def judge_scores(task: str, persona: str, texts: list[str], rows: list[dict], judges: dict, embed) -> dict:
    """Share of texts the judges place on the persona's side (per axis / attribute, and all at once)."""
    s = {}
    if task == "qa":
        from .judges import judge_mbti
        hits = []
        for axis, p in judge_mbti(judges, embed, texts).items():
            first = axis.split("_")[0].upper()
            target = pole_of(persona, axis_of(first))
            hit = (p > 0.5) if target == first else (p < 0.5)
            s[f"agree_{axis}"] = float(hit.mean())
            hits.append(hit)
        s["mean_agreement"] = float(np.mean([h.mean() for h in hits]))
        s["type_match"] = float(np.all(hits, axis=0).mean())
    else:
        from .judges import judge_roleplay
        probs = judge_roleplay(judges, embed, {a: [r[a] for r in rows] for a in judges}, texts)
        for attr, p in probs.items():
            s[f"follows_{attr}"] = float((p > 0.5).mean())
        s["mean_agreement"] = float(np.mean([s[f"follows_{a}"] for a in probs]))
        s["both"] = float(np.all([p > 0.5 for p in probs.values()], axis=0).mean())
    return s


__all__ = ["mcqa_summary", "distinct_n", "perplexity", "cosine", "score_answers", "judge_scores"]
