"""`personamix eval attributes`: does decoding-time composition give replies with several
attributes at once? Measured with exact offline scorers (personamix/attributes.py) on prompts
no adapter trained on (the held-out share of the paper's instructions).

Three parts, each appended to a resumable JSONL under the output directory:
  singles   every attribute adapter alone, and the reference: does each adapter move its own
            attribute (and its axis partner the other way)?
  personas  pairs of poles from different axes and one triple, every method (the reference,
            prompting, single adapters, merging, geometric fusion, the MPG samplers)
  sweeps    for two pairs, weights from (1, 0) to (0, 1) for linear MPG (per token: `token`;
            per chunk: `scr`), `geometric` and `merge`: the Pareto front of each way to compose

Per answer: each axis's raw score, success on every pole (thresholds fixed in attributes.py
before the run), joint success (every pole of the persona), perplexity under the reference;
per group: distinct-n. Comparisons carry 95% paired bootstrap intervals over prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import attributes as attr
from ..errors import PersonamixError
from ..generator import Generator
from ..training.attribute_data import split_prompts
from ..training.merge import merged_adapter
from .methods import MPG_METHODS, answer, expand_methods, messages, persona_weights
from .metrics import distinct_n, perplexity

PERSONAS = attr.PERSONAS
METHODS = ("base", "prompt", "single-*", "merge", "geometric") + MPG_METHODS
SWEEP_PAIRS = ("positive+asking", "negative+complex")
SWEEP_WEIGHTS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)          # the weight on the pair's first pole
SWEEP_METHODS = ("token", "scr", "geometric", "merge")  # linear per token, linear per chunk, product, weights
BASELINES = ("merge", "prompt")
# The reference and each adapter alone answer the same whatever the persona (same prompt, seed and
# no system prompt): generated once, under "singles", and read from there for every persona.
SINGLES_METHODS = ["base"] + [f"single-{x}" for x in attr.POLES]


@dataclass
class AttributeEvalConfig:
    out: Path
    model: str
    adapters: Mapping[str, str]
    # sized for a 2-core CPU (about an hour with 8 workers, docs/attributes.md); intervals shrink as 1/sqrt(prompts)
    prompts: int = 32                    # held-out prompts for singles and personas
    sweep_prompts: int = 24              # the first of those for the weight sweeps
    max_new_tokens: int = 48
    seed: int = 0
    k: int = 4
    workers: int = 8
    personas: tuple[str, ...] = PERSONAS
    methods: tuple[str, ...] = METHODS
    sweep_pairs: tuple[str, ...] = SWEEP_PAIRS
    backend: str = "auto"
    device: str | None = None
    data_dir: str | None = None
    bootstrap: int = 2000


def held_out(n: int, data_dir=None, seed: int = 0) -> list[dict]:
    """n held-out prompts ({id, prompt}), a fixed sample."""
    _, held = split_prompts(data_dir)
    chosen = sorted(random.Random(seed).sample(range(len(held)), min(n, len(held))))
    return [{"id": str(i), "prompt": held[i]} for i in chosen]


def weights_key(w: Mapping[str, float]) -> str:
    return ",".join(f"{n}={v:g}" for n, v in w.items())


def sweep_weights(pair: str) -> list[dict[str, float]]:
    a, b = attr.parse_persona(pair)
    return [{a: w, b: round(1.0 - w, 6)} for w in SWEEP_WEIGHTS]


def run(cfg: AttributeEvalConfig, generate_only: bool = False) -> dict:
    """Generate what is missing (resumable), then score; returns the summary (also written)."""
    from .runner import Results, _each, _progress

    for p in cfg.personas:
        attr.parse_persona(p)
    missing = [p for p in attr.POLES if p not in cfg.adapters]
    if missing:
        raise PersonamixError(f"the attribute evaluation needs adapters for every pole; missing {', '.join(missing)}")
    prompts = held_out(cfg.prompts, cfg.data_dir, cfg.seed)
    sweep_prompts = prompts[: cfg.sweep_prompts]
    adapters, merges = dict(cfg.adapters), {}
    wanted_merges = {p: persona_weights(p) for p in cfg.personas if "merge" in cfg.methods}
    for pair in cfg.sweep_pairs:
        for w in sweep_weights(pair):
            wanted_merges[f"{pair}@{weights_key(w)}"] = w
    for key, w in wanted_merges.items():
        name = f"merge{len(merges)}"
        adapters[name] = merged_adapter(cfg.model, cfg.adapters, w)
        merges[key] = name
    gen = Generator.from_pretrained(cfg.model, adapters=adapters, backend=cfg.backend, device=cfg.device)
    cfg.out.mkdir(parents=True, exist_ok=True)
    sampling = dict(max_new_tokens=cfg.max_new_tokens, k=cfg.k)
    res = Results(cfg.out / "attributes.jsonl")

    def persona_jobs():
        for p in ("singles",) + tuple(cfg.personas):
            methods = SINGLES_METHODS if p == "singles" else \
                [m for m in expand_methods(cfg.methods, p) if m not in SINGLES_METHODS]
            for m in methods:
                for q in prompts:
                    if ("attributes", p, m, q["id"]) not in res:
                        yield p, m, q

    def sweep_jobs():
        for pair in cfg.sweep_pairs:
            for w in sweep_weights(pair):
                for m in SWEEP_METHODS:
                    for q in sweep_prompts:
                        if ("sweep", pair, f"{m}@{weights_key(w)}", q["id"]) not in res:
                            yield pair, m, w, q

    todo = list(persona_jobs())
    sweeps = list(sweep_jobs())

    def work(job):
        if len(job) == 3:
            persona, method, q = job
            weights = {} if persona == "singles" else persona_weights(persona)
            system = attr.prompt_instruction(list(weights)) if method == "prompt" else None
            return answer(gen, q["prompt"], method, weights, merges.get(persona), system,
                          seed=cfg.seed + int(q["id"]), **sampling)
        pair, method, w, q = job
        used = {n: v for n, v in w.items() if v > 0}
        if method == "merge":
            plan_method, kw = "token", {"weights": {merges[f"{pair}@{weights_key(w)}"]: 1.0}}
        elif method == "geometric":
            plan_method, kw = "token", {"weights": used, "aggregation": "geometric"}
        else:
            plan_method, kw = method, {"weights": used}
        r = gen.generate(messages(q["prompt"], None), method=plan_method, seed=cfg.seed + int(q["id"]), **kw,
                         **sampling)
        return {"answer": r.text, "stats": r.stats.to_dict(), "tokens": len(r.token_ids),
                "perplexity": perplexity(gen, r.prompt_ids, r.token_ids)}

    def done(job, a):
        if len(job) == 3:
            persona, method, q = job
            res.add({"task": "attributes", "persona": persona, "method": method, "id": q["id"], **a,
                     "scores": attr.scores(a["answer"])})
        else:
            pair, method, w, q = job
            res.add({"task": "sweep", "persona": pair, "method": f"{method}@{weights_key(w)}", "id": q["id"],
                     "aggregate": method, "weights": w, **a, "scores": attr.scores(a["answer"])})

    with _progress(len(todo) + len(sweeps), "attribute answers") as bar:
        _each(todo + sweeps, work, done, cfg.workers, bar)
    if generate_only:
        return {}
    summary = summarize(res.rows, cfg, prompts, sweep_prompts)
    (cfg.out / "attributes_summary.json").write_text(json.dumps(summary, indent=1))
    (cfg.out / "attributes.md").write_text(report(summary))
    plot_sweeps(summary, cfg.out)
    return summary


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def success_matrix(rows: list[dict], persona: str, method: str, ids: Sequence[str], poles: Sequence[str]
                   ) -> np.ndarray:
    """[prompts, poles + 1] 0/1: success on each pole, and joint success (last column)."""
    by_id = {r["id"]: r for r in rows if r["persona"] == persona and r["method"] == method}
    out = np.zeros((len(ids), len(poles) + 1))
    for i, q in enumerate(ids):
        r = by_id.get(q)
        if r is None:
            return np.zeros((0, len(poles) + 1))
        hits = [attr.success(p, r["scores"]) for p in poles]
        out[i, :-1] = hits
        out[i, -1] = all(hits)
    return out


def bootstrap_diff(a: np.ndarray, b: np.ndarray, n: int, seed: int = 0, relative: bool = False
                   ) -> tuple[float, float, float]:
    """Mean of a minus mean of b (or their relative difference), paired over rows, with a 95%
    percentile bootstrap interval: (estimate, low, high)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n, len(a)))
    ma, mb = a[idx].mean(1), b[idx].mean(1)

    def stat(x, y):
        return (x - y) / y if relative else x - y

    with np.errstate(divide="ignore", invalid="ignore"):
        boot = stat(ma, mb)
    boot = boot[np.isfinite(boot)]
    est = stat(a.mean(), b.mean()) if (not relative or b.mean() > 0) else float("nan")
    lo, hi = (np.percentile(boot, [2.5, 97.5]) if len(boot) else (float("nan"), float("nan")))
    return float(est), float(lo), float(hi)


def summarize(rows: list[dict], cfg: AttributeEvalConfig, prompts: list[dict], sweep_prompts: list[dict]) -> dict:
    ids = [q["id"] for q in prompts]
    persona_rows = [r for r in rows if r["task"] == "attributes"]
    shared = [r for r in persona_rows if r["persona"] == "singles"]
    persona_rows += [{**r, "persona": p} for p in cfg.personas for r in shared]
    out: dict = {"prompts": len(ids), "sweep_prompts": len(sweep_prompts), "success_thresholds": attr.SUCCESS_TEXT,
                 "singles": {}, "personas": {}, "comparisons": {}, "sweeps": {}}
    # singles: each adapter's success on its own pole and its partner's, against the reference
    base = {p: success_matrix(persona_rows, "singles", "base", ids, [p])[:, 0] for p in attr.POLES}
    for pole in attr.POLES:
        partner = next(q for q in attr.axis_of(pole).poles if q != pole)
        m = success_matrix(persona_rows, "singles", f"single-{pole}", ids, [pole, partner])
        if not len(m):
            continue
        own = bootstrap_diff(m[:, 0], base[pole], cfg.bootstrap, cfg.seed)
        other = bootstrap_diff(m[:, 1], base[partner], cfg.bootstrap, cfg.seed)
        out["singles"][pole] = {"success": float(m[:, 0].mean()), "base": float(base[pole].mean()),
                                "gain": own, "partner": partner, "partner_success": float(m[:, 1].mean()),
                                "partner_base": float(base[partner].mean()), "partner_gain": other}
    # personas x methods
    joint: dict[str, list[np.ndarray]] = {}
    for persona in cfg.personas:
        poles = attr.parse_persona(persona)
        section = out["personas"][persona] = {}
        for method in expand_methods(cfg.methods, persona):
            m = success_matrix(persona_rows, persona, method, ids, poles)
            if not len(m):
                continue
            mine = [r for r in persona_rows if r["persona"] == persona and r["method"] == method]
            section[method] = {
                "success": {p: float(m[:, i].mean()) for i, p in enumerate(poles)}, "joint": float(m[:, -1].mean()),
                "raw": {a.name: float(np.mean([r["scores"][a.name] for r in mine])) for a in attr.AXES},
                "perplexity": float(np.nanmedian([r["perplexity"] for r in mine])),
                "distinct_1": distinct_n([r["answer"] for r in mine], 1),
                "distinct_2": distinct_n([r["answer"] for r in mine], 2)}
            joint.setdefault(method, []).append(m[:, -1])
    # joint success over all personas: the headline comparison (prompts paired, personas pooled)
    pooled = {m: np.stack(v, 1) for m, v in joint.items() if len(v) == len(cfg.personas)}   # [prompts, personas]
    means = {m: float(v.mean()) for m, v in pooled.items()}
    out["joint_by_method"] = means
    mpg = {m: means[m] for m in MPG_METHODS if m in means}
    base_methods = {m: means[m] for m in BASELINES if m in means}
    if mpg and base_methods:
        best, rival = max(mpg, key=mpg.get), max(base_methods, key=base_methods.get)
        rel = bootstrap_diff(pooled[best].mean(1), pooled[rival].mean(1), cfg.bootstrap, cfg.seed, relative=True)
        diff = bootstrap_diff(pooled[best].mean(1), pooled[rival].mean(1), cfg.bootstrap, cfg.seed)
        out["comparisons"]["goal"] = {"best_mpg": best, "best_baseline": rival, "relative_gain": rel,
                                      "difference": diff}
        for m in means:
            if m != best:
                out["comparisons"][f"{best} vs {m}"] = bootstrap_diff(pooled[best].mean(1), pooled[m].mean(1),
                                                                       cfg.bootstrap, cfg.seed)
        if "geometric" in pooled:
            out["comparisons"]["geometric vs token"] = bootstrap_diff(pooled["geometric"].mean(1),
                                                                      pooled["token"].mean(1), cfg.bootstrap, cfg.seed)
    # sweeps
    sweep_ids = [q["id"] for q in sweep_prompts]
    sweep_rows = [r for r in rows if r["task"] == "sweep"]
    for pair in cfg.sweep_pairs:
        a, b = attr.parse_persona(pair)
        curves: dict = {}
        for method in SWEEP_METHODS:
            pts = []
            for w in sweep_weights(pair):
                m = success_matrix(sweep_rows, pair, f"{method}@{weights_key(w)}", sweep_ids, [a, b])
                if not len(m):
                    continue
                mine = [r for r in sweep_rows if r["persona"] == pair and r["method"] == f"{method}@{weights_key(w)}"]
                pts.append({"weight": w[a], "success_a": float(m[:, 0].mean()), "success_b": float(m[:, 1].mean()),
                            "joint": float(m[:, 2].mean()),
                            "raw_a": float(np.mean([attr.pole_score(a, r["answer"]) for r in mine])),
                            "raw_b": float(np.mean([attr.pole_score(b, r["answer"]) for r in mine]))})
            curves[method] = {"points": pts,
                              "hypervolume": hypervolume([(p["success_a"], p["success_b"]) for p in pts]),
                              "best_joint": max((p["joint"] for p in pts), default=0.0)}
        out["sweeps"][pair] = curves
    return out


def hypervolume(points: Sequence[tuple[float, float]]) -> float:
    """Area of [0, 1]^2 dominated by the points (both coordinates to be maximised, reference (0, 0))."""
    area, best_y = 0.0, 0.0
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            area += x * (y - best_y)
            best_y = y
    return area


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}"


def _ci(t) -> str:
    est, lo, hi = t
    return f"{100 * est:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def report(summary: dict) -> str:
    lines = [f"Held-out prompts: {summary['prompts']} (sweeps: {summary['sweep_prompts']}); success thresholds: "
             + "; ".join(f"{p}: {t}" for p, t in summary["success_thresholds"].items()), "",
             "**Single adapters** (success %, and the change from the reference with its 95% paired bootstrap "
             "interval, in points):", "",
             "| adapter | own pole: success | vs reference | partner pole | partner: success | vs reference |",
             "|---|---|---|---|---|---|"]
    for pole, s in summary["singles"].items():
        lines.append(f"| {pole} | {_pct(s['success'])} (ref {_pct(s['base'])}) | {_ci(s['gain'])} | {s['partner']} | "
                     f"{_pct(s['partner_success'])} (ref {_pct(s['partner_base'])}) | {_ci(s['partner_gain'])} |")
    lines += ["", "**Personas** (success % per pole, joint = every pole at once):", ""]
    for persona, methods in summary["personas"].items():
        poles = attr.parse_persona(persona)
        lines += [f"*{persona}*", "", "| method | " + " | ".join(poles) + " | joint | perplexity | distinct-2 |",
                  "|---|" + "---|" * (len(poles) + 3)]
        for method, s in methods.items():
            lines.append(f"| {method} | " + " | ".join(_pct(s["success"][p]) for p in poles)
                         + f" | {_pct(s['joint'])} | {s['perplexity']:.1f} | {s['distinct_2']:.2f} |")
        lines.append("")
    lines += ["**Joint success over all personas** (mean %):", "",
              "| method | joint |", "|---|---|"]
    lines += [f"| {m} | {_pct(v)} |" for m, v in sorted(summary.get("joint_by_method", {}).items(),
                                                         key=lambda kv: -kv[1])]
    goal = summary["comparisons"].get("goal")
    if goal:
        lines += ["", f"**Goal**: best MPG ({goal['best_mpg']}) vs the best of merge and prompt "
                      f"({goal['best_baseline']}) on joint success: relative gain {_ci(goal['relative_gain'])} % "
                      f"(needed: >= +18 %, interval excluding 0); difference {_ci(goal['difference'])} points.", ""]
        lines += ["| comparison (joint success, points) | estimate [95% interval] |", "|---|---|"]
        lines += [f"| {k} | {_ci(v)} |" for k, v in summary["comparisons"].items() if k != "goal"]
    lines += ["", "**Weight sweeps** (success % of each pole; hypervolume of the front in success space):", ""]
    for pair, curves in summary["sweeps"].items():
        a, b = attr.parse_persona(pair)
        lines += [f"*{pair}*", "", f"| method | hypervolume | best joint | points ({a} weight: {a} / {b} / joint) |",
                  "|---|---|---|---|"]
        for method, c in curves.items():
            pts = "; ".join(f"{p['weight']:.1f}: {_pct(p['success_a'])}/{_pct(p['success_b'])}/{_pct(p['joint'])}"
                            for p in c["points"])
            lines.append(f"| {method} | {c['hypervolume']:.3f} | {_pct(c['best_joint'])} | {pts} |")
        lines += ["", f"![{pair}](sweep_{pair.replace('+', '_')}.png)", ""]
    return "\n".join(lines) + "\n"


def plot_sweeps(summary: dict, out: Path) -> list[Path]:
    """One PNG per swept pair, every method on each panel: mean score on A against mean score on B,
    the fronts in success rates (A against B), and joint success against the weight on A."""
    from ..errors import require

    matplotlib = require("matplotlib", "report", "the sweep plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    styles = {"token": ("linear, per token (token)", "o-"), "scr": ("linear, per chunk (scr)", "s-"),
              "geometric": ("geometric (product)", "^-"), "merge": ("merge (weights)", "d--")}
    for pair, curves in summary["sweeps"].items():
        a, b = attr.parse_persona(pair)
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for method, c in curves.items():
            label, style = styles[method]
            pts = c["points"]
            axes[0].plot([p["raw_a"] for p in pts], [p["raw_b"] for p in pts], style, label=label)
            axes[1].plot([100 * p["success_a"] for p in pts], [100 * p["success_b"] for p in pts], style,
                         label=f"{label}, HV {c['hypervolume']:.3f}")
            axes[2].plot([p["weight"] for p in pts], [100 * p["joint"] for p in pts], style, label=label)
        axes[0].set(title=f"{pair}: mean scores, weights {a}:{b} = 1:0 .. 0:1",
                    xlabel=f"{a} score ({attr.axis_of(a).name}, signed)",
                    ylabel=f"{b} score ({attr.axis_of(b).name}, signed)")
        axes[1].set(title="fronts in success rates", xlabel=f"{a} success %", ylabel=f"{b} success %")
        axes[2].set(title=f"both at once ({a} and {b})", xlabel=f"weight on {a}", ylabel="joint success %")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"sweep_{pair.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["AttributeEvalConfig", "PERSONAS", "METHODS", "SWEEP_PAIRS", "SWEEP_WEIGHTS", "SWEEP_METHODS", "run",
           "held_out", "summarize", "hypervolume", "bootstrap_diff", "report", "plot_sweeps"]
