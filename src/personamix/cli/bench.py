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
    b.set_defaults(func=run)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise PersonamixError(f"{what} expects comma-separated integers, got {text!r}") from None


def run(a: argparse.Namespace) -> None:
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
