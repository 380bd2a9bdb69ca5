"""`personamix bench`: tokens/s, forward passes per token and acceptance of every method over a
grid of N (preference models) and k (chunk size), in two settings, side by side in one run.

    adapters   LoRA adapters batched on the shared base (the fast multi-LoRA backend)
    separate   each adapter merged into its own full copy of the reference (the paper's setting)

plus transformers' own `generate()` of the plain reference as the single-model yardstick.
Within a repeat every (setting, method, k) runs once, interleaved, so machine noise hits all
alike; the table reports the median and the min-max over repeats.
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import shipped_adapters
from ..errors import PersonamixError, require
from ..generator import Generator
from ..loading import DEFAULT_MODEL, load_reference, random_adapters

#: auto: the batched LoRA backend (fast when the model cannot batch)
SETTINGS = {"adapters": "auto", "separate": "separate"}
K_METHODS = ("scr", "spec")              # methods whose cost depends on k
FLAT_METHODS = ("base", "token", "token-rs")
PROMPT = "Write a short paragraph about how you like to spend a free weekend."
MBTI_ORDER = ("E", "N", "T", "J", "I", "S", "F", "P")   # which N adapters a run uses: ENTJ's poles first


@dataclass
class BenchConfig:
    model: str = DEFAULT_MODEL
    ns: tuple[int, ...] = (1, 2, 4, 8)
    ks: tuple[int, ...] = (1, 2, 4, 8)
    settings: tuple[str, ...] = ("adapters", "separate")
    methods: tuple[str, ...] = FLAT_METHODS + K_METHODS
    tokens: int = 32
    repeats: int = 3
    device: str | None = "cpu"
    adapters: dict[str, str] = field(default_factory=dict)   # empty: shipped MBTI (default model) or random

    def check(self) -> None:
        require("matplotlib", "report", "`personamix bench`'s plots")   # before a run of many minutes, not after
        if not self.ns or any(n < 1 for n in self.ns):
            raise PersonamixError(f"N values must be >= 1, got {self.ns}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise PersonamixError(f"k values must be >= 1, got {self.ks}")
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad:
            raise PersonamixError(f"unknown setting(s) {bad}: use {', '.join(SETTINGS)}")
        bad = [m for m in self.methods if m not in FLAT_METHODS + K_METHODS]
        if bad:
            raise PersonamixError(f"unknown method(s) {bad}: use {', '.join(FLAT_METHODS + K_METHODS)}")
        if self.tokens < 1 or self.repeats < 1:
            raise PersonamixError("tokens and repeats must be >= 1")


def pick_adapters(cfg: BenchConfig, n: int) -> dict[str, str]:
    """N adapters: the given ones, the shipped MBTI poles (default model), or random LoRAs."""
    pool = cfg.adapters or (shipped_adapters("mbti", cfg.model) if cfg.model == DEFAULT_MODEL else {})
    if pool:
        names = [x for x in MBTI_ORDER if x in pool] + [x for x in pool if x not in MBTI_ORDER]
        if n > len(names):
            raise PersonamixError(f"N={n} needs {n} adapters; {len(names)} are available")
        return {x: pool[x] for x in names[:n]}
    return random_adapters(cfg.model, [f"R{i}" for i in range(n)])


def hf_generate(model, ids: list[int], tokens: int, seed: int) -> float:
    """tokens/s of transformers' own sampling loop on the plain reference."""
    torch.manual_seed(seed)
    x = torch.tensor([ids], device=model.device)
    start = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=True, top_k=0, pad_token_id=model.config.eos_token_id)
    return (out.shape[1] - x.shape[1]) / (time.perf_counter() - start)


def runs_of(cfg: BenchConfig) -> list[tuple[str, int | None]]:
    """(method, k) pairs of one block; k is None for methods that do not use it."""
    return ([(m, None) for m in cfg.methods if m in FLAT_METHODS]
            + [(m, k) for m in cfg.methods if m in K_METHODS for k in cfg.ks])


def run(cfg: BenchConfig, progress=None) -> list[dict]:
    """One row per measurement: setting, N, method, k, repeat, tokens/s, forwards/token, acceptance."""
    cfg.check()
    rows = []
    plain, _ = load_reference(cfg.model, torch.device(cfg.device or "cpu"))
    for n in cfg.ns:
        adapters = pick_adapters(cfg, n)
        weights = {name: 1.0 / n for name in adapters}
        gens = {s: Generator.from_pretrained(cfg.model, adapters=adapters, backend=SETTINGS[s], device=cfg.device)
                for s in cfg.settings}
        ids = next(iter(gens.values())).encode(PROMPT)
        for rep in range(cfg.repeats + 1):                          # repeat 0 warms up and is not kept
            tps = hf_generate(plain, ids, cfg.tokens, rep)
            if rep:
                rows.append(dict(setting="-", N=n, method="generate()", k="", repeat=rep, tokens_per_s=tps,
                                 forwards_per_token="", acceptance=""))
            for setting, gen in gens.items():
                for method, k in runs_of(cfg):
                    kw = {} if method == "base" else {"weights": weights}
                    r = gen.generate(ids, method=method, max_new_tokens=cfg.tokens, seed=rep, ignore_eos=True,
                                     k=k or 4, **kw)
                    if rep:
                        s = r.stats
                        rows.append(dict(setting=setting, N=n, method=method, k=k or "", repeat=rep,
                                         tokens_per_s=s.tokens_per_s, forwards_per_token=s.forward_passes_per_token,
                                         acceptance="" if s.acceptance_rate is None else s.acceptance_rate))
                    if progress is not None:
                        progress.update(1)
        del gens
    return rows


def total_runs(cfg: BenchConfig) -> int:
    return len(cfg.ns) * (cfg.repeats + 1) * len(cfg.settings) * len(runs_of(cfg))


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Median and min-max per (setting, N, method, k), with ratios to `base` and generate()."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["N"], r["method"], r["k"]), []).append(r)

    def med(key, field_):
        vals = [r[field_] for r in groups.get(key, []) if r[field_] != ""]
        return statistics.median(vals) if vals else None

    out = []
    for (setting, n, method, k), rs in groups.items():
        tps = [r["tokens_per_s"] for r in rs]
        base = med((setting, n, "base", ""), "tokens_per_s")
        hf = med(("-", n, "generate()", ""), "tokens_per_s")
        m = statistics.median(tps)
        out.append(dict(setting=setting, N=n, method=method, k=k, tokens_per_s=m, min=min(tps), max=max(tps),
                        x_base=m / base if base else None, x_generate=m / hf if hf else None,
                        forwards_per_token=med((setting, n, method, k), "forwards_per_token"),
                        acceptance=med((setting, n, method, k), "acceptance"), repeats=len(rs)))
    order = {"-": 0, "adapters": 1, "separate": 2}
    return sorted(out, key=lambda r: (order.get(r["setting"], 3), r["N"], r["method"], str(r["k"])))


def targets(summary: Sequence[dict]) -> list[tuple[str, float | None, float, bool | None]]:
    """The speed targets set for the engine (docs/bench): (what, measured ratio, needed, met)."""
    def get(setting, n, method, k=""):
        key = (setting, n, method, k)
        return next((r for r in summary if (r["setting"], r["N"], r["method"], r["k"]) == key), None)

    out = []
    for method, k in (("scr", 4), ("token", "")):
        r = get("adapters", 4, method, k)
        out.append((f"adapters, N=4: {method}{' k=4' if k else ''} / base", r and r["x_base"], 0.8))
    scr, rs = get("separate", 2, "scr", 4), get("separate", 2, "token-rs")
    out.append(("separate, N=2: scr k=4 / token-rs", scr and rs and scr["tokens_per_s"] / rs["tokens_per_s"], 3.0))
    for n in sorted({r["N"] for r in summary}):
        b = get("adapters", n, "base")
        out.append((f"adapters, N={n}: base / generate()", b and b["x_generate"], 1.0))
    return [(what, v, need, None if v is None else v >= need) for what, v, need in out]


def write_csv(rows: Sequence[dict], path: Path) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def markdown(summary: Sequence[dict]) -> str:
    def f(x, spec):
        return "-" if x is None or x == "" else format(x, spec)

    lines = ["| setting | N | method | k | tok/s (median) | min-max | x base | x generate() | forwards/token "
             "| acceptance |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['setting']} | {r['N']} | {r['method']} | {r['k'] or '-'} | {r['tokens_per_s']:.1f} | "
                     f"{r['min']:.1f}-{r['max']:.1f} | {f(r['x_base'], '.2f')} | {f(r['x_generate'], '.2f')} | "
                     f"{f(r['forwards_per_token'], '.2f')} | {f(r['acceptance'], '.1%')} |")
    return "\n".join(lines) + "\n"


def targets_markdown(summary: Sequence[dict]) -> str:
    lines = ["| target | measured | needed | met |", "|---|---|---|---|"]
    for what, v, need, ok in targets(summary):
        lines.append(f"| {what} | {'-' if v is None else f'{v:.3f}x'} | {need:.1f}x | "
                     f"{'-' if ok is None else ('yes' if ok else 'no')} |")
    return "\n".join(lines) + "\n"


def plot(summary: Sequence[dict], out_dir: Path, k_for_n: int = 4) -> list[Path]:
    """tok/s against N (k fixed), tok/s against k and acceptance against k (largest N with data)."""
    matplotlib = require("matplotlib", "report", "`personamix bench`'s plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in summary)]
    ns = sorted({r["N"] for r in summary})
    ks = sorted({r["k"] for r in summary if r["k"] != ""})
    k_for_n = k_for_n if k_for_n in ks else (ks[-1] if ks else None)
    n_for_k = 2 if 2 in ns else ns[-1]
    paths = []

    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for method in ("generate()",) + FLAT_METHODS + K_METHODS:
            pts = [(r["N"], r["tokens_per_s"]) for r in summary
                   if r["method"] == method and r["setting"] in (setting, "-")
                   and (r["k"] in ("", k_for_n))]
            if pts:
                label = method + (f" (k={k_for_n})" if method in K_METHODS else "")
                ax.plot(*zip(*sorted(pts)), marker="o", label=label)
        ax.set(title=f"{setting}: tokens/s vs N", xlabel="N preference models", ylabel="tokens/s", xticks=ns)
    paths.append(_save(plt, fig, axes[0], out_dir / "bench_tps_vs_n.png"))

    if ks:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for setting in settings:
            for method in K_METHODS:
                pts = [(r["k"], r["tokens_per_s"], r["acceptance"]) for r in summary
                       if r["setting"] == setting and r["method"] == method and r["N"] == n_for_k and r["k"] != ""]
                if pts:
                    pts.sort()
                    axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} [{setting}]")
                    axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"{method} [{setting}]")
        axes[0].set(title=f"tokens/s vs k (N={n_for_k})", xlabel="k", ylabel="tokens/s", xticks=ks)
        axes[1].set(title=f"acceptance vs k (N={n_for_k})", xlabel="k", ylabel="accepted / drafted tokens",
                    xticks=ks, ylim=(0, 1.05))
        paths.append(_save(plt, fig, axes, out_dir / "bench_vs_k.png"))
    return paths


def _save(plt, fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["BenchConfig", "run", "summarize", "targets", "markdown", "targets_markdown", "plot", "write_csv",
           "total_runs"]
