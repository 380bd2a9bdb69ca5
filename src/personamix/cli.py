"""Command line: `personamix generate`, `demo`, `train`, `train-shipped`, `serve`, `eval`, `bench`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import PersonamixError
from .models import DEFAULT_MODEL, SHIPPED_DIR, SHIPPED_SETS, shipped_adapters
from .train import TrainConfig

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


def _adapters(a: argparse.Namespace, want_default: bool = True) -> dict[str, str]:
    adapters = _parse_adapters(a.adapter)
    if a.adapters:
        adapters = {**shipped_adapters(a.adapters, a.model), **adapters}
    elif not adapters and a.model == DEFAULT_MODEL and want_default:
        adapters = shipped_adapters("mbti", a.model)   # the default model's shipped MBTI poles
    return adapters


def cmd_serve(a: argparse.Namespace) -> None:
    from .generator import Generator
    from .server import serve

    if a.max_pending < 1:
        raise PersonamixError(f"--max-pending must be >= 1, got {a.max_pending}")
    gen = Generator.from_pretrained(a.model, adapters=_adapters(a), backend=a.backend, device=a.device,
                                    onednn=not a.no_onednn)
    print(f"personamix: serving {a.model} with adapters {', '.join(gen.adapter_names) or '(none)'} "
          f"on http://{a.host}:{a.port}/ (playground) and /v1", file=sys.stderr)
    serve(gen, Path(a.model).name if Path(a.model).exists() else a.model, a.host, a.port, a.max_pending)


def cmd_generate(a: argparse.Namespace) -> None:
    from .generator import Generator

    gen = Generator.from_pretrained(a.model, adapters=_adapters(a, a.method != "base"), backend=a.backend,
                                    device=a.device, onednn=not a.no_onednn)
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


DEMO_TYPES = ("ENTJ", "ISFP")


def cmd_demo(a: argparse.Namespace) -> None:
    from .generator import Generator

    print(f"personamix demo on {a.model} (embedded SmolLM2-135M-Instruct by default) with the eight shipped\n"
          "MBTI adapters (DPO-trained LoRA, one per pole; see docs/adapters.md). Each type is sampled with\n"
          "SCR from the linear aggregation of its four poles' density ratios, equal weights.\n")
    gen = Generator.from_pretrained(a.model, adapters="mbti", device=a.device)
    print(f"Prompt: {a.prompt}   (temperature {a.temperature}, top-p {a.top_p}, seed {a.seed})\n")
    common = dict(max_new_tokens=a.max_new_tokens, seed=a.seed, temperature=a.temperature, top_p=a.top_p)
    print("--- reference alone (method base)")
    result = _stream(gen, a.prompt, method="base", **common)
    print(f"[{result.stats.summary()}]\n")
    for persona in a.types:
        print(f"--- {persona} (method {a.method}, adapters {', '.join(persona)})")
        result = _stream(gen, a.prompt, method=a.method, persona=persona, **common)
        print(f"[{result.stats.summary()}]\n")


_TRAIN_FIELDS = ("rank", "alpha", "dropout", "beta", "learning_rate", "epochs", "max_steps", "batch_size",
                 "grad_accum", "max_length", "max_pairs", "holdout", "split_seed", "seed", "evals", "device")


def _train_args(p: argparse.ArgumentParser, defaults) -> None:
    for name in _TRAIN_FIELDS:
        value = getattr(defaults, name)
        kind = float if isinstance(value, float) else (int if isinstance(value, int) or value is None else str)
        if name == "device":
            kind = str
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    p.add_argument("--target-modules", default=",".join(defaults.target_modules))


def _print_meta(meta: dict) -> None:
    h = meta["held_out"]
    print(f"{meta['attribute']}: {meta['steps']} steps on {meta['pairs_train']} pairs in {meta['wall_time_s']:.0f} s; "
          f"held-out ({meta['pairs_held_out']} pairs) reward accuracy {h['reward_accuracy']:.3f}, "
          f"mean margin {h['reward_margin']:.3f}")


def cmd_train(a: argparse.Namespace) -> None:
    from .train import train_adapter

    kwargs = {name: getattr(a, name) for name in _TRAIN_FIELDS}
    cfg = TrainConfig(attribute=a.attribute, output_dir=a.out, model=a.model, data=a.data, data_dir=a.data_dir,
                      keep_description=a.keep_description,
                      target_modules=[m for m in a.target_modules.split(",") if m], **kwargs)
    _print_meta(train_adapter(cfg))
    print(f"saved to {a.out}")


def cmd_train_shipped(a: argparse.Namespace) -> None:
    from .train import read_meta, shipped_config, train_adapter

    only = set(a.only.split(",")) if a.only else None
    for set_name in a.sets:
        for attribute in SHIPPED_SETS[set_name]:
            if only is None or attribute in only:
                cfg = shipped_config(set_name, attribute, a.out_root, data_dir=a.data_dir, device=a.device)
                done = read_meta(cfg.output_dir)
                if done is not None:
                    print(f"{set_name}/{attribute}: already trained ({cfg.output_dir}); delete it to retrain")
                    continue
                _print_meta(train_adapter(cfg))


def _personas(text: str, task: str) -> tuple[str, ...]:
    from .eval_run import ROLEPLAY
    from .evaluation import ALL_TYPES, PAPER_TYPES
    from .targets import parse_persona

    if task == "roleplay":
        return (ROLEPLAY,)
    if text in ("paper", "all"):
        return PAPER_TYPES if text == "paper" else ALL_TYPES
    types = tuple(t.strip() for t in text.split(",") if t.strip())
    for t in types:
        if len(parse_persona(t)) != 4:
            raise PersonamixError(f"--types: {t!r} is not a four-letter MBTI type")
    return types


def cmd_eval(a: argparse.Namespace) -> None:
    from . import eval_run as er
    from . import evaluation as ev
    from .judges import MBTI_FEATURES

    if a.limit is not None and a.limit < 1:
        raise PersonamixError(f"--limit must be >= 1, got {a.limit}")
    if a.workers < 1:
        raise PersonamixError(f"--workers must be >= 1, got {a.workers}")
    personas = _personas(a.types, a.task)
    default_methods = ("prompt", "single-personality", "single-profile", "merge", "geometric") + ev.MPG_METHODS \
        if a.task == "roleplay" else ev.BASELINES + ev.MPG_METHODS
    methods = tuple(m.strip() for m in a.methods.split(",")) if a.methods else default_methods
    for m in methods:
        ev.method_plan(m, {}, "merge")          # an unknown method is an error before anything loads
    judge_features = tuple(x.strip() for x in a.judges.split(",") if x.strip())
    if a.task == "qa" and (not judge_features or set(judge_features) - set(MBTI_FEATURES)):
        raise PersonamixError(f"--judges: use one or more of {', '.join(MBTI_FEATURES)}, got {a.judges!r}")
    if a.task == "qa" and not set(personas) <= set(ev.PAPER_TYPES):
        raise PersonamixError(f"open questions exist for {', '.join(ev.PAPER_TYPES)} only")
    readouts = tuple(r.strip() for r in a.readout.split(","))
    bad = [r for r in readouts if r not in er.MCQA_READOUTS]
    if bad:
        raise PersonamixError(f"--readout: unknown {', '.join(bad)}; use prob, gen or prob,gen")
    out = Path(a.out)
    cfg = er.EvalConfig(a.task, out, personas, methods, a.limit, a.max_new_tokens, a.seed, a.temperature, a.k,
                        readouts, a.data_dir, a.judge_limit, a.workers)
    adapters = _parse_adapters(a.adapter) or shipped_adapters("roleplay" if a.task == "roleplay" else "mbti", a.model)
    gen, merges = er.eval_generator(a.model, adapters, personas, methods, a.backend, a.device)
    out.mkdir(parents=True, exist_ok=True)
    if a.task == "mcqa":
        summary = er.run_mcqa(gen, merges, cfg)
        table = er.mcqa_table(summary)
        key = "prob" if "prob" in summary else "gen"
        summary["quality_gap"] = er.quality_gap({m: s["mean_agreement"] for m, s in summary[key].items()})
    else:
        res = er.run_answers(gen, merges, cfg)
        if a.generate_only:
            print(f"{len(res.rows)} answers in {res.path}; scored by the same command without --generate-only")
            return
        summary, table = er.score_run(res.rows, cfg, judge_features)
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    (out / f"{a.task}_summary.json").write_text(json.dumps(summary, indent=1))
    (out / f"{a.task}.md").write_text(table)
    print(table)
    for judge, section in summary.get("by_judge", {"": summary}).items():
        gap = section.get("quality_gap")
        if gap:
            print(f"MPG best ({gap['best_mpg']}) vs best of prompting/merging ({gap['best_baseline']}): "
                  f"{100 * gap['relative_gain']:+.1f}% relative on mean per-axis agreement"
                  + (f" ({judge} judges)" if judge else ""))


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise PersonamixError(f"{what} expects comma-separated integers, got {text!r}") from None


def cmd_bench(a: argparse.Namespace) -> None:
    import platform

    import torch

    from . import benchmark as bm

    cfg = bm.BenchConfig(model=a.model, ns=_ints(a.n, "--n"), ks=_ints(a.k, "--k"),
                         settings=tuple(a.settings.split(",")), methods=tuple(a.methods.split(",")),
                         tokens=a.tokens, repeats=a.repeats, device=a.device, adapters=_parse_adapters(a.adapter))
    if a.quick:
        cfg.ns, cfg.ks, cfg.tokens, cfg.repeats = cfg.ns[:2], cfg.ks[:2], min(cfg.tokens, 8), 1
    cfg.check()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm
    with tqdm(total=bm.total_runs(cfg), desc="bench", unit="run", dynamic_ncols=True) as bar:
        rows = bm.run(cfg, progress=bar)
    summary = bm.summarize(rows)
    bm.write_csv(rows, out / "bench_raw.csv")
    bm.write_csv(summary, out / "bench_summary.csv")
    plots = bm.plot(summary, out)
    info = (f"{a.model}, {torch.get_default_dtype()}, device {a.device or 'auto'} ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}); {cfg.tokens} new "
            f"tokens per run, median of {cfg.repeats} repeats after a warm-up; N in {cfg.ns}, k in {cfg.ks}")
    text = (f"{info}\n\n{bm.markdown(summary)}\nTargets:\n\n{bm.targets_markdown(summary)}\n"
            + "".join(f"![{p.stem}]({p.name})\n" for p in plots))
    (out / "bench.md").write_text(text)
    print(text)


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
    g.add_argument("--adapters", default=None, metavar="SET",
                   help="shipped adapter set(s) for the default model: mbti, roleplay or mbti,roleplay "
                        "(default model without --adapter: mbti)")
    g.add_argument("--persona", default=None, help="MBTI letters, e.g. ENTJ (equal weights on adapters E,N,T,J)")
    g.add_argument("--weights", default=None, help="explicit weights, e.g. E=0.7,N=0.3 (negative allowed)")
    g.add_argument("--backend", default="auto", help="auto | batched | fast | lora | separate (see models.build_backend)")
    g.add_argument("--device", default=None)
    g.add_argument("--no-onednn", action="store_true", help="CPU: keep PyTorch's linear kernels (see README, Backends)")
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
    d.add_argument("--method", default="scr")
    d.add_argument("--types", nargs="+", default=list(DEMO_TYPES), help="MBTI types to show")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="DPO-train one single-attribute LoRA adapter (TRL DPOTrainer)")
    t.add_argument("attribute", help="an MBTI pole (E I S N T F J P), 'personality' or 'profile'")
    t.add_argument("--out", required=True, help="adapter directory (re-running resumes from its checkpoints)")
    t.add_argument("--model", default="smollm2-135m-instruct")
    t.add_argument("--data", default=None, help="preference data: .json/.jsonl file, directory or hub id "
                                                "(default: the paper's data for the attribute)")
    t.add_argument("--data-dir", default=None, help="the paper's data root (default $PERSONAMIX_DATA or ../shared/data/mpg)")
    t.add_argument("--keep-description", action="store_true", help="MBTI: keep the pole description in the prompt")
    _train_args(t, TrainConfig(attribute="E", output_dir=""))
    t.set_defaults(func=cmd_train)

    ts = sub.add_parser("train-shipped", help="reproduce the adapters that ship with personamix")
    ts.add_argument("--sets", nargs="+", default=list(SHIPPED_SETS), choices=list(SHIPPED_SETS))
    ts.add_argument("--only", default=None, help="comma-separated attributes, e.g. E,I")
    ts.add_argument("--out-root", default=str(SHIPPED_DIR))
    ts.add_argument("--data-dir", default=None)
    ts.add_argument("--device", default=None)
    ts.set_defaults(func=cmd_train_shipped)

    s = sub.add_parser("serve", help="OpenAI-compatible server with a playground page at /")
    s.add_argument("--model", default="smollm2-135m-instruct")
    s.add_argument("--adapters", default=None, metavar="SET",
                   help="shipped adapter set(s): mbti, roleplay, mbti,roleplay (default model: mbti)")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-pending", type=int, default=16, help="requests in flight before 429")
    s.add_argument("--backend", default="auto")
    s.add_argument("--device", default=None)
    s.add_argument("--no-onednn", action="store_true", help="CPU: keep PyTorch's linear kernels")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("eval", help="MBTI questionnaire / open questions / role-play against the paper's baselines")
    e.add_argument("task", choices=["mcqa", "qa", "roleplay"])
    e.add_argument("--model", default="smollm2-135m-instruct")
    e.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="adapters named by pole (E..P) or personality/profile (default: the shipped ones)")
    e.add_argument("--types", default="paper", help="paper (ENTJ,ESTP,INFJ) | all (16 types) | comma-separated")
    e.add_argument("--methods", default=None,
                   help="comma-separated: base,prompt,merge,geometric,single-X,token,token-rs,scr,spec")
    e.add_argument("--limit", type=int, default=None, help="items / questions / profiles per persona")
    e.add_argument("--readout", default="prob", help="mcqa: prob, gen or prob,gen")
    e.add_argument("--max-new-tokens", type=int, default=96)
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
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="tokens/s, forwards/token, acceptance over N x k, adapters vs separate models")
    b.add_argument("--model", default="smollm2-135m-instruct")
    b.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="adapters to draw N from (default: shipped MBTI poles, or random LoRAs for other models)")
    b.add_argument("--n", default="1,2,4,8", help="numbers of preference models")
    b.add_argument("--k", default="1,2,4,8", help="chunk sizes (scr, spec)")
    b.add_argument("--settings", default="adapters,separate", help="adapters (batched LoRA) and/or separate (full models)")
    b.add_argument("--methods", default="base,token,token-rs,scr,spec")
    b.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--quick", action="store_true", help="first two N and k, 8 tokens, 1 repeat (a smoke test)")
    b.add_argument("--out", default="results/bench")
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=cmd_bench)

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
