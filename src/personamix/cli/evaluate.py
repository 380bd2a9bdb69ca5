"""`personamix eval TASK`: the MBTI questionnaire, open questions or role-play, every method against
the paper's baselines (evaluation/runner.py does the work; this module only reads the flags)."""

from __future__ import annotations

import argparse

from ..loading import DEFAULT_MODEL
from .common import parse_adapters


def register(sub) -> None:
    from ..evaluation.runner import MCQA_READOUTS, TASKS

    e = sub.add_parser("eval", help="MBTI questionnaire / open questions / role-play against the paper's baselines")
    e.add_argument("task", choices=list(TASKS))
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="adapters named by pole (E..P) or personality/profile (default: the shipped ones)")
    e.add_argument("--types", default="paper", help="paper (ENTJ,ESTP,INFJ) | all (16 types) | comma-separated; "
                   "attributes: poles joined by '+', e.g. positive+asking (default: the five of docs/attributes.md)")
    e.add_argument("--methods", default=None,
                   help="comma-separated: base,prompt,merge,geometric,single-X (single-*: each pole alone),"
                        "token,token-rs,scr,spec (default: all of them but single-* for qa)")
    e.add_argument("--limit", type=int, default=None, help="items / questions / profiles per persona; attributes: "
                   "held-out prompts (default 32; the sweeps use the first 24)")
    e.add_argument("--readout", default="prob", help=f"mcqa: {', '.join(MCQA_READOUTS)} or prob,gen")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: 96, attributes: 48")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--k", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--judge-limit", type=int, default=None, help="training pairs per judge (default: all)")
    e.add_argument("--judges", default="lexical,minilm",
                   help="qa: judge features, first = headline: lexical (TF-IDF n-grams) and/or minilm (embeddings)")
    e.add_argument("--out", default="results/eval", help="directory for JSONL / JSON / Markdown (resumable)")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--backend", default="auto")
    e.add_argument("--device", default=None)
    e.add_argument("--workers", type=int, default=1,
                   help="generations in flight at once (threads; the batched backend shares one forward per step)")
    e.add_argument("--generate-only", action="store_true",
                   help="qa/roleplay: write the answers, skip the judges (score later, e.g. on another machine)")
    e.set_defaults(func=run)


def run(a: argparse.Namespace) -> None:
    from ..evaluation.runner import EvalConfig, evaluate, parse_types

    def items(text: str | None) -> tuple[str, ...]:
        return tuple(x.strip() for x in (text or "").split(",") if x.strip())

    max_new_tokens = a.max_new_tokens or (48 if a.task == "attributes" else 96)
    cfg = EvalConfig(a.task, a.out, parse_types(a.types), items(a.methods), a.limit, max_new_tokens, a.seed,
                     a.temperature, a.k, items(a.readout), a.data_dir, a.judge_limit, a.workers, items(a.judges),
                     a.generate_only, a.model, parse_adapters(a.adapter), a.backend, a.device)
    outcome = evaluate(cfg)
    if outcome.table:
        print(outcome.table)
    for line in outcome.notes:
        print(line)
