"""Markdown tables of evaluation results (one row per method, personas averaged)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .methods import BASELINES, MPG_METHODS
from .metrics import AXIS_ORDER


def fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3g}"


def mcqa_table(summary: dict) -> str:
    lines = []
    for readout, title in (("prob", "P(A) vs P(B) of the method's next-token distribution"),
                           ("gen", "parsed from a generated answer (8 tokens; unparsed = coin flip)")):
        if readout not in summary:
            continue
        lines += [f"**Read-out: {title}** ({summary['items']} items, personas: {', '.join(summary['personas'])})", "",
                  "| method | E/I | S/N | T/F | J/P | mean agreement | mean P(target pole) | whole type |"
                  + (" unparsed |" if readout == "gen" else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if readout == "gen" else "")]
        for method, s in _ordered(summary[readout]):
            ax = s["axis_agreement"]
            soft = np.mean(list(s["axis_soft"].values()))
            lines.append(f"| {method} | " + " | ".join(fmt(ax.get(a), True) for a in AXIS_ORDER)
                         + f" | {fmt(s['mean_agreement'], True)} | {fmt(soft, True)} | "
                         f"{fmt(s['type_accuracy'], True)} |"
                         + (f" {fmt(s['unparsed'], True)} |" if readout == "gen" else ""))
        lines.append("")
    return "\n".join(lines)


def _ordered(by_method: Mapping[str, dict]):
    order = ["reference answers"] + list(BASELINES) + ["mpg"] + list(MPG_METHODS)
    return sorted(by_method.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


def answers_table(scores: dict, task: str) -> str:
    """One row per method, averaged over personas (every persona weighs the same)."""
    if task == "qa":
        cols = [("agree_e_i", "E/I", True), ("agree_s_n", "S/N", True), ("agree_t_f", "T/F", True),
                ("agree_j_p", "J/P", True), ("mean_agreement", "mean agreement", True),
                ("type_match", "whole type", True)]
    else:
        cols = [("follows_personality", "follows personality", True), ("follows_profile", "follows profile", True),
                ("mean_agreement", "mean agreement", True), ("both", "both", True)]
    cols += [("similarity", "similarity to reference", False), ("perplexity", "perplexity", False),
             ("distinct_1", "distinct-1", False), ("distinct_2", "distinct-2", False)]
    # tokens/s stays in the summary JSON but not in the table: with --workers (or other jobs on the
    # machine) it measures sharing, not a method's speed; `personamix bench` does that
    lines = ["| method | n | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, per in _ordered(scores):
        n = sum(s["n"] for s in per.values())
        vals = [fmt(float(np.mean([s[c] for s in per.values()])) if all(c in s for s in per.values()) else None,
                       pct) for c, _, pct in cols]
        lines.append(f"| {method} | {n} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def judges_table(judges: dict) -> str:
    lines = ["| judge | label 1 | training texts | held-out texts | held-out accuracy |", "|---|---|---|---|---|"]
    for name, j in judges.items():
        lines.append(f"| {name} | {j.positive} | {j.n_train} | {j.n_held_out} | {100 * j.held_out_accuracy:.1f} |")
    return "\n".join(lines) + "\n"


__all__ = ["fmt", "mcqa_table", "answers_table", "judges_table"]
