"""`personamix bench --engine URL`: MPG over an inference engine, in its own setting (the paper's
SCR-vs-Token-RS comparison is about exactly this: scoring is a round trip).

Three measurements, each side by side in one run:
  methods       remote `scr`, `token-rs` and `base` at each N (adapters = the first N the engine
                serves), interleaved within each repeat; tokens/s, round trips and engine requests
                per token, acceptance
  scoring       the latency of scoring a k-token chunk under N adapters against the context length,
                for both ways an engine can do it (prompt log-probs, or a next-token call per
                position) and the one the backend picks
  concurrency   aggregate tokens/s of C generations in flight (threads) against one
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PersonamixError, require
from ..generator import Generator

PROMPT = "Write a short paragraph about how you like to spend a free weekend."
METHODS = ("base", "token-rs", "scr")


@dataclass
class EngineBenchConfig:
    url: str
    ns: tuple[int, ...] = (2, 4)
    tokens: int = 32
    repeats: int = 3
    k: int = 4
    contexts: tuple[int, ...] = (64, 256, 1024)
    concurrency: int = 8
    timeout: float = 120.0
    tokenizer: str | None = None
    adapters: tuple[str, ...] = field(default_factory=tuple)   # empty: the engine's, in its order

    def check(self) -> None:
        require("matplotlib", "report", "`personamix bench`'s plots")
        if not self.ns or any(n < 1 for n in self.ns) or self.tokens < 1 or self.repeats < 1:
            raise PersonamixError("N values, tokens and repeats must be >= 1")
        if self.concurrency < 2 or any(c < self.k + 1 for c in self.contexts):
            raise PersonamixError(f"--concurrency must be >= 2 and contexts > k, got {self.concurrency}, "
                                  f"{self.contexts}")


def run(cfg: EngineBenchConfig, progress=None) -> dict:
    """{"methods": rows, "scoring": rows, "concurrency": rows, "engine": info}."""
    cfg.check()
    gen = Generator.from_engine(cfg.url, list(cfg.adapters) or None, tokenizer=cfg.tokenizer, timeout=cfg.timeout)
    served = gen.adapter_names
    if max(cfg.ns) > len(served):
        raise PersonamixError(f"N={max(cfg.ns)} needs {max(cfg.ns)} adapters; the engine serves {len(served)}")
    ids = gen.encode(PROMPT)
    out = {"engine": {"url": gen.backend.client.info.url, "base": gen.backend.client.info.base,
                      "adapters": list(served)}, "methods": [], "scoring": [], "concurrency": []}
    try:
        for n in cfg.ns:
            names = served[:n]
            weights = {x: 1.0 / n for x in names}
            for rep in range(cfg.repeats + 1):                      # repeat 0 warms the engine up
                for method in METHODS:
                    kw = {} if method == "base" else {"weights": weights}
                    r = gen.generate(ids, method=method, max_new_tokens=cfg.tokens, seed=rep, ignore_eos=True,
                                     k=cfg.k, **kw)
                    if rep:
                        s = r.stats
                        out["methods"].append(dict(N=n, method=method, repeat=rep, tokens_per_s=s.tokens_per_s,
                                                   round_trips_per_token=s.round_trips / s.new_tokens,
                                                   requests_per_token=s.forward_passes / s.new_tokens,
                                                   acceptance=s.acceptance_rate))
                    if progress is not None:
                        progress.update(1)
        out["scoring"] = scoring_latency(gen, served[:min(cfg.ns)], cfg.contexts, cfg.k, cfg.repeats)
        out["concurrency"] = concurrency(gen, ids, served[:min(cfg.ns)], cfg)
    finally:
        gen.backend.close()
    return out


def scoring_latency(gen: Generator, names, contexts, k: int, repeats: int) -> list[dict]:
    """Median seconds to score a k-token chunk under `names` at each context length, both ways."""
    backend, rows = gen.backend, []
    for length in contexts:
        seq = [(1000 + 7 * i) % 49152 for i in range(length)]
        for way, label in (("prompt", "prompt log-probs"), ("next", "next-token calls"), ("auto", "picked")):
            times = []
            for _ in range(repeats + 1):                # the first warms the engine's caches up
                start = time.perf_counter()
                backend.score(names, seq, k, way=way)
                times.append(time.perf_counter() - start)
            rows.append(dict(context=length, way=label, N=len(names), k=k, seconds=statistics.median(times[1:])))
    return rows


def concurrency(gen: Generator, ids, names, cfg: EngineBenchConfig) -> list[dict]:
    """Aggregate tokens/s of 1 and of cfg.concurrency scr generations in flight."""
    weights = {x: 1.0 / len(names) for x in names}
    rows = []
    for c in (1, cfg.concurrency):
        def one(i):
            return gen.generate(ids, method="scr", weights=weights, max_new_tokens=cfg.tokens, seed=100 + i,
                                ignore_eos=True, k=cfg.k).stats.new_tokens

        start = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            tokens = sum(pool.map(one, range(c)))
        wall = time.perf_counter() - start
        rows.append(dict(generations=c, tokens=tokens, seconds=wall, aggregate_tokens_per_s=tokens / wall))
    return rows


def summary_markdown(result: dict) -> str:
    """Tables of the three measurements and the targets."""
    methods = result["methods"]
    lines = ["| N | method | tok/s (median) | min-max | round trips/token | engine requests/token | acceptance |",
             "|---|---|---|---|---|---|---|"]
    med: dict = {}
    for n in sorted({r["N"] for r in methods}):
        for m in METHODS:
            rs = [r for r in methods if r["N"] == n and r["method"] == m]
            tps = [r["tokens_per_s"] for r in rs]
            med[(n, m)] = statistics.median(tps)
            acc = [r["acceptance"] for r in rs if r["acceptance"] is not None]
            lines.append(f"| {n} | {m} | {med[(n, m)]:.2f} | {min(tps):.2f}-{max(tps):.2f} | "
                         f"{statistics.median(r['round_trips_per_token'] for r in rs):.2f} | "
                         f"{statistics.median(r['requests_per_token'] for r in rs):.2f} | "
                         + (f"{statistics.median(acc):.1%} |" if acc else "- |"))
    lines += ["", "| context (tokens) | scoring way | N | k | seconds (median) |", "|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['way']} | {r['N']} | {r['k']} | {r['seconds']:.3f} |" for r in result["scoring"]]
    lines += ["", "| generations in flight | tokens | seconds | aggregate tok/s |", "|---|---|---|---|"]
    lines += [f"| {r['generations']} | {r['tokens']} | {r['seconds']:.1f} | {r['aggregate_tokens_per_s']:.2f} |"
              for r in result["concurrency"]]
    lines += ["", "| target | measured | needed | met |", "|---|---|---|---|"]
    for what, ratio, need in targets(result, med):
        met = "-" if need is None else ("yes" if ratio >= need else "no")
        lines.append(f"| {what} | {ratio:.2f}x | {'-' if need is None else f'{need:.1f}x'} | {met} |")
    return "\n".join(lines) + "\n"


def targets(result: dict, med: dict) -> list[tuple[str, float, float | None]]:
    """(what, measured ratio, needed or None): remote scr at least 3x remote token-rs at N=2 (the
    paper's 97 vs 30 tok/s), and C generations in flight at least 3x one."""
    out = [(f"remote scr / remote token-rs, N={n}", med[(n, "scr")] / med[(n, "token-rs")], 3.0 if n == 2 else None)
           for n in sorted({n for n, _ in med})]
    conc = result["concurrency"]
    if len(conc) == 2:
        out.append((f"{conc[1]['generations']} generations in flight / 1 (aggregate tok/s)",
                    conc[1]["aggregate_tokens_per_s"] / conc[0]["aggregate_tokens_per_s"], 3.0))
    return out


def plot(result: dict, out_dir: Path) -> list[Path]:
    """tok/s per method and N; scoring latency against context length."""
    matplotlib = require("matplotlib", "report", "`personamix bench`'s plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ns = sorted({r["N"] for r in result["methods"]})
    for i, m in enumerate(METHODS):
        vals = [statistics.median(r["tokens_per_s"] for r in result["methods"] if r["N"] == n and r["method"] == m)
                for n in ns]
        axes[0].bar([x + 0.27 * (i - 1) for x in range(len(ns))], vals, width=0.27, label=m)
    axes[0].set(title="over the engine: tokens/s", xticks=range(len(ns)), xticklabels=[f"N={n}" for n in ns],
                ylabel="tokens/s")
    for way in ("prompt log-probs", "next-token calls", "picked"):
        pts = sorted((r["context"], r["seconds"]) for r in result["scoring"] if r["way"] == way)
        axes[1].plot(*zip(*pts), marker="o", label=way, linestyle="--" if way == "picked" else "-")
    axes[1].set(title="scoring a chunk: latency vs context", xlabel="context (tokens)", ylabel="seconds",
                xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "bench_engine.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


__all__ = ["EngineBenchConfig", "run", "scoring_latency", "concurrency", "summary_markdown", "plot"]
