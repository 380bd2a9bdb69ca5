"""Command line: `personamix generate ...` and `personamix demo`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import PersonamixError

DEMO_PROMPT = "How would you spend a free Saturday?"


def _parse_adapters(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PersonamixError(f"--adapter expects NAME=PATH, got {item!r}")
        if name in out:
            raise PersonamixError(f"adapter {name!r} given twice")
        out[name] = path
    return out


def _parse_weights(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    out = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise PersonamixError(f"--weights expects NAME=NUMBER[,NAME=NUMBER...], got {text!r}") from None
    return out


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="scr", help="scr | spec | token | token-rs | base (default: scr)")
    p.add_argument("--aggregation", default="linear", help="linear (paper) | geometric")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--k", type=int, default=4, help="chunk size (scr, spec)")
    p.add_argument("--window", type=int, default=20, help="scr: window W for the bound estimate")
    p.add_argument("--gamma", type=float, default=1.2, help="scr: safety margin on the bound")
    p.add_argument("--warmup", type=int, default=5, help="scr: chunks verified exactly before the window is used")
    p.add_argument("--bound", default="window", help="scr: window (paper) | exact (oracle)")
    p.add_argument("--max-retries", type=int, default=256, help="Token-RS proposals per token before an exact draw")
    p.add_argument("--stats", action="store_true", help="print acceptance, tokens/s, forward passes per token")


def _sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(method=a.method, aggregation=a.aggregation, max_new_tokens=a.max_new_tokens, seed=a.seed,
                temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, k=a.k, window=a.window,
                gamma=a.gamma, warmup=a.warmup, bound=a.bound, max_retries=a.max_retries)


def _stream(gen, prompt, out=None, **kwargs):
    out = out or sys.stdout
    stream = gen.stream(prompt, **kwargs)
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    return stream.result


def cmd_generate(a: argparse.Namespace) -> None:
    from .generator import Generator

    gen = Generator.from_pretrained(a.model, adapters=_parse_adapters(a.adapter), backend=a.backend, device=a.device)
    kwargs = _sampling_kwargs(a)
    if a.method != "base":
        kwargs.update(persona=a.persona, weights=_parse_weights(a.weights))
    elif a.persona or a.weights:
        raise PersonamixError("--method base samples the reference alone: drop --persona/--weights")
    if a.json:
        result = gen.generate(a.prompt, chat_template=not a.no_chat_template, **kwargs)
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "weights": result.weights, "seed": result.seed, "stats": result.stats.to_dict()}))
        return
    result = _stream(gen, a.prompt, chat_template=not a.no_chat_template, **kwargs)
    if a.stats:
        print(result.stats.summary(), file=sys.stderr)


def random_adapters(model: str, names: list[str], seed: int = 0) -> dict[str, str]:
    """Randomly initialised LoRA adapters (NOT trained, NOT personalities), cached, for showing
    the samplers' mechanics and speed before trained adapters exist."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from .models import cache_dir, resolve_model

    path = resolve_model(model)
    out = {}
    for i, name in enumerate(names):
        target = cache_dir() / "random-adapters" / Path(path).name / f"{name}-seed{seed + i}"
        if not (target / "adapter_config.json").is_file():
            torch.manual_seed(seed + i)
            peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                                        LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
            with torch.no_grad():
                for pname, p in peft_model.named_parameters():
                    if "lora_B" in pname:
                        p.mul_(0.05)   # keep the random perturbation small: the text stays fluent
            peft_model.save_pretrained(target)
        out[name] = str(target)
    return out


def cmd_demo(a: argparse.Namespace) -> None:
    from .generator import Generator

    print(f"personamix demo on {a.model} (embedded SmolLM2-135M-Instruct by default)\n")
    print("NOTE: no trained personality adapters ship with personamix yet. This demo runs the reference\n"
          "alone, then the MPG samplers over two RANDOM, UNTRAINED LoRA adapters named 'A' and 'B'.\n"
          "They are not personalities: they only show the samplers' mechanics, acceptance and speed.\n")
    gen = Generator.from_pretrained(a.model, adapters=random_adapters(a.model, ["A", "B"]), device=a.device)
    print(f"Prompt: {a.prompt}   (temperature {a.temperature}, top-p {a.top_p}, seed {a.seed})\n")
    for method in ("base", "scr", "spec", "token"):
        print(f"--- {method}" + ("" if method == "base" else " (weights A=0.5, B=0.5 on random adapters)"))
        kwargs = dict(method=method, max_new_tokens=a.max_new_tokens, seed=a.seed, temperature=a.temperature,
                      top_p=a.top_p)
        if method != "base":
            kwargs["weights"] = {"A": 0.5, "B": 0.5}
        result = _stream(gen, a.prompt, **kwargs)
        print(f"[{result.stats.summary()}]\n")


def _quiet() -> None:
    """Library progress bars and deprecation chatter would interleave with streamed text."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet()
    parser = argparse.ArgumentParser(prog="personamix", description="Multi-personality generation at decoding time")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a persona / weights")
    g.add_argument("prompt")
    g.add_argument("--model", default="smollm2-135m-instruct", help="alias, hub id or local directory")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a preference model: PEFT LoRA adapter dir / hub id, or a full model (repeatable)")
    g.add_argument("--persona", default=None, help="MBTI letters, e.g. ENTJ (equal weights on adapters E,N,T,J)")
    g.add_argument("--weights", default=None, help="explicit weights, e.g. E=0.7,N=0.3 (negative allowed)")
    g.add_argument("--backend", default="auto", help="auto | lora | separate")
    g.add_argument("--device", default=None)
    g.add_argument("--no-chat-template", action="store_true", help="tokenize the prompt as plain text")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, stats) instead of streaming")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="the README's main job on the embedded default model")
    d.add_argument("--model", default="smollm2-135m-instruct")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--temperature", type=float, default=0.7)
    d.add_argument("--top-p", type=float, default=0.9)
    d.add_argument("--device", default=None)
    d.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except PersonamixError as e:
        print(f"personamix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
