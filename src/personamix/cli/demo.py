"""`personamix demo`: the README's main job on the embedded default model (the reference, then
two MBTI types sampled with SCR from the shipped adapters)."""

from __future__ import annotations

import argparse
import sys

from ..engine.params import SamplingParams
from ..loading import DEFAULT_MODEL
from .common import stream_to

DEMO_PROMPT = "How would you spend a free Saturday?"
DEMO_TYPES = ("ENTJ", "ISFP")


def register(sub) -> None:
    d = sub.add_parser("demo", help="the README's main job on the embedded default model")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--temperature", type=float, default=0.7)
    d.add_argument("--top-p", type=float, default=0.9)
    d.add_argument("--device", default=None)
    d.add_argument("--method", default="scr")
    d.add_argument("--types", nargs="+", default=list(DEMO_TYPES), help="MBTI types to show")
    d.set_defaults(func=run)


def run(a: argparse.Namespace) -> None:
    from ..generator import Generator

    common = SamplingParams(max_new_tokens=a.max_new_tokens, seed=a.seed, temperature=a.temperature, top_p=a.top_p)
    print(f"personamix demo on {a.model} (embedded SmolLM2-135M-Instruct by default) with the eight shipped\n"
          "MBTI adapters (DPO-trained LoRA, one per pole; see docs/adapters.md). Each type is sampled with\n"
          "SCR from the linear aggregation of its four poles' density ratios, equal weights.\n")
    gen = Generator.from_pretrained(a.model, adapters="mbti", device=a.device)
    print(f"Prompt: {a.prompt}   (temperature {a.temperature}, top-p {a.top_p}, seed {a.seed})\n")
    print("--- reference alone (method base)")
    result = stream_to(sys.stdout, gen, a.prompt, common.replace(method="base"))
    print(f"[{result.stats.summary()}]\n")
    for persona in a.types:
        print(f"--- {persona} (method {a.method}, adapters {', '.join(persona)})")
        result = stream_to(sys.stdout, gen, a.prompt, common.replace(method=a.method, persona=persona))
        print(f"[{result.stats.summary()}]\n")
