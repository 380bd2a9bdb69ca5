"""`personamix bench`: tokens/s, forward passes per token and acceptance over N x k, batched
adapters vs separate models (evaluation/bench.py)."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from ..errors import PersonamixError
from ..loading import DEFAULT_MODEL
from .common import parse_adapters


def register(sub) -> None:
    b = sub.add_parser("bench", help="tokens/s, forwards/token, acceptance over N x k, adapters vs separate models")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="adapters to draw N from (default: shipped MBTI poles, or random LoRAs for other models)")
    b.add_argument("--n", default="1,2,4,8", help="numbers of preference models")
    b.add_argument("--k", default="1,2,4,8", help="chunk sizes (scr, spec)")
    b.add_argument("--settings", default="adapters,separate",
                   help="adapters (batched LoRA) and/or separate (full models)")
    b.add_argument("--methods", default="base,token,token-rs,scr,spec")
    b.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--quick", action="store_true", help="first two N and k, 8 tokens, 1 repeat (a smoke test)")
    b.add_argument("--out", default="results/bench")
    b.add_argument("--device", default="cpu")
    e = b.add_argument_group("over an inference engine (--engine): scr vs token-rs vs base, scoring latency, "
                             "concurrency")
    e.add_argument("--engine", metavar="URL", default=None, help="a vLLM OpenAI-compatible server (see README)")
    e.add_argument("--engine-adapters", metavar="NAMES", default=None,
                   help="adapter names to draw N from (default: all the engine serves, in its order)")
    e.add_argument("--tokenizer", default=None, help="a local copy of the engine model's tokenizer")
    e.add_argument("--contexts", default="64,256,1024", help="context lengths for the scoring latency")
    e.add_argument("--concurrency", type=int, default=8, help="generations in flight against one")
    b.set_defaults(func=run)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise PersonamixError(f"{what} expects comma-separated integers, got {text!r}") from None


def run(a: argparse.Namespace) -> None:
    if a.engine:
        return run_engine(a)
    import torch
    from tqdm.auto import tqdm

    from ..evaluation import bench as bm

    cfg = bm.BenchConfig(model=a.model, ns=_ints(a.n, "--n"), ks=_ints(a.k, "--k"),
                         settings=tuple(a.settings.split(",")), methods=tuple(a.methods.split(",")),
                         tokens=a.tokens, repeats=a.repeats, device=a.device, adapters=parse_adapters(a.adapter))
    if a.quick:
        cfg.ns, cfg.ks, cfg.tokens, cfg.repeats = cfg.ns[:2], cfg.ks[:2], min(cfg.tokens, 8), 1
    cfg.check()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
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


def run_engine(a: argparse.Namespace) -> None:
    import json

    from tqdm.auto import tqdm

    from ..evaluation import bench_engine as be

    ns = _ints(a.n if a.n != "1,2,4,8" else "2,4", "--n")
    names = tuple(x.strip() for x in (a.engine_adapters or "").split(",") if x.strip())
    cfg = be.EngineBenchConfig(url=a.engine, ns=ns, tokens=a.tokens, repeats=a.repeats,
                               k=_ints(a.k if a.k != "1,2,4,8" else "4", "--k")[0],
                               contexts=_ints(a.contexts, "--contexts"), concurrency=a.concurrency,
                               tokenizer=a.tokenizer, adapters=names)
    if a.quick:
        cfg.ns, cfg.tokens, cfg.repeats, cfg.contexts, cfg.concurrency = cfg.ns[:1], min(cfg.tokens, 8), 1, (64,), 2
    cfg.check()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(cfg.ns) * (cfg.repeats + 1) * len(be.METHODS), desc="bench --engine", unit="run") as bar:
        result = be.run(cfg, progress=bar)
    (out / "bench_engine.json").write_text(json.dumps(result, indent=1))
    plots = be.plot(result, out)
    info = (f"engine {result['engine']['url']} serving {result['engine']['base']} with adapters "
            f"{', '.join(result['engine']['adapters'])}; {cfg.tokens} new tokens per run, k={cfg.k}, median of "
            f"{cfg.repeats} repeats after a warm-up, methods interleaved; client: {os.cpu_count()} cores, "
            f"{platform.machine()}")
    text = f"{info}\n\n{be.summary_markdown(result)}\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    (out / "bench_engine.md").write_text(text)
    print(text)
