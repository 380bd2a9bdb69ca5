"""`personamix generate PROMPT`: stream one generation with a persona / weights to the terminal."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_engine_flags, add_model_flags, add_sampling_flags, load_generator, params_from, stream_to


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a persona / weights")
    g.add_argument("prompt")
    add_model_flags(g)
    add_engine_flags(g)
    g.add_argument("--no-chat-template", action="store_true", help="tokenize the prompt as plain text")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token ids, stats) instead of streaming")
    g.add_argument("--stats", action="store_true", help="print acceptance, tokens/s, forward passes per token")
    add_sampling_flags(g, {"max_new_tokens": 128})
    g.set_defaults(func=run)


def run(a: argparse.Namespace) -> None:
    params = params_from(a)      # bad settings fail before the model loads
    gen = load_generator(a, want_default_adapters=params.method != "base")
    if a.json:
        result = gen.generate(a.prompt, params, chat_template=not a.no_chat_template)
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "weights": result.weights, "seed": result.seed, "stats": result.stats.to_dict()}))
        return
    try:
        result = stream_to(sys.stdout, gen, a.prompt, params, chat_template=not a.no_chat_template)
    finally:
        gen.backend.close()
    if a.stats:
        print(result.stats.summary(), file=sys.stderr)
