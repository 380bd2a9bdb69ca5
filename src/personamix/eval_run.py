"""`personamix eval`: run a task over personas x methods, write raw JSONL, a summary JSON and a
Markdown table under one output directory. Runs resume from their JSONL files."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from . import evaluation as ev
from .errors import PersonamixError
from .generator import Generator
from .merge import merged_adapter
from .targets import parse_persona

MCQA_READOUTS = ("prob", "gen")
ROLEPLAY = "personality+profile"


@dataclass
class EvalConfig:
    task: str                                   # "mcqa" | "qa" | "roleplay"
    out: Path
    personas: tuple[str, ...] = ev.PAPER_TYPES
    methods: tuple[str, ...] = ev.BASELINES + ev.MPG_METHODS
    limit: int | None = None                    # items / questions / profiles per persona
    max_new_tokens: int = 96
    seed: int = 0
    temperature: float = 1.0
    k: int = 4
    readouts: tuple[str, ...] = ("prob",)       # mcqa only
    data_dir: str | None = None
    judge_limit: int | None = None              # training pairs per judge (None: all)
    workers: int = 1                            # generations in flight at once (threads)


def persona_weights(persona: str) -> dict[str, float]:
    if persona == ROLEPLAY:
        return {"personality": 0.5, "profile": 0.5}
    letters = parse_persona(persona)
    return {p: 1.0 / len(letters) for p in letters}


def eval_generator(model: str, adapters: Mapping[str, str], personas, methods, backend: str = "auto",
                   device=None) -> tuple[Generator, dict[str, str]]:
    """A generator over the adapters plus, when `merge` is asked for, one merged adapter per persona."""
    adapters = dict(adapters)
    merges = {}
    if "merge" in methods:
        for persona in personas:
            name = "merge-" + ("rp" if persona == ROLEPLAY else persona)
            adapters[name] = merged_adapter(model, adapters, persona_weights(persona))
            merges[persona] = name
    return Generator.from_pretrained(model, adapters=adapters, backend=backend, device=device), merges


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True)


def _each(todo: list, work, done, workers: int, bar) -> None:
    """done(item, work(item)) for every item, `workers` generations at a time. With the batched
    backend, concurrent generations share one model forward per step (as the server's requests
    do); every other backend serialises its forwards. `done` runs under a lock, in completion
    order: result rows are keyed, so their order in the file does not matter."""
    if workers <= 1:
        for item in todo:
            done(item, work(item))
            bar.update(1)
        return
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="personamix-eval") as pool:
        futures = {pool.submit(work, item): item for item in todo}
        try:
            for f in as_completed(futures):
                with lock:
                    done(futures[f], f.result())
                bar.update(1)
        except BaseException:
            for f in futures:               # an error (or Ctrl-C) stops the queue, not only this item
                f.cancel()
            raise


def _sampling(cfg: EvalConfig, seed: int, max_new_tokens: int | None = None) -> dict:
    return dict(max_new_tokens=max_new_tokens or cfg.max_new_tokens, seed=seed, temperature=cfg.temperature,
                k=cfg.k)


# ---------------------------------------------------------------------------------------------
# Questionnaire
# ---------------------------------------------------------------------------------------------

def run_mcqa(gen: Generator, merges: Mapping[str, str], cfg: EvalConfig) -> dict:
    items = ev.load_mcqa(cfg.data_dir)[:cfg.limit]
    desc = ev.pole_descriptions(cfg.data_dir)
    summary: dict = {"items": len(items), "personas": list(cfg.personas)}
    adapters = [n for n in gen.adapter_names if not n.startswith("merge-")]
    if "prob" in cfg.readouts:
        path = cfg.out / "mcqa_prob.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        if {r["persona"] for r in rows} != set(cfg.personas) or {r["item"] for r in rows} != {i.id for i in items}:
            # a file from another run (other personas / items) is recomputed, not mixed in
            with _progress(len(items), "questionnaire (probabilities)") as bar:
                rows = ev.mcqa_probs(gen, items, cfg.personas, adapters, merges, desc, progress=bar,
                                     workers=cfg.workers)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary["prob"] = ev.mcqa_summary(rows)
    if "gen" in cfg.readouts:
        res = ev.Results(cfg.out / "mcqa_gen.jsonl")
        todo = [(i, p, m) for i in items for p in cfg.personas for m in cfg.methods
                if ("mcqa", p, m, i.id) not in res]

        def work(t):
            item, persona, method = t
            return ev.answer(gen, item.prompt(), method, persona_weights(persona), merges.get(persona),
                             ev.persona_system_prompt(persona, desc), **_sampling(cfg, cfg.seed + int(item.id), 8))

        def done(t, a):
            item, persona, method = t
            choice = ev.parse_choice(a["answer"])
            res.add({"task": "mcqa", "persona": persona, "method": method, "id": item.id, "axis": item.axis,
                     "pole_a": item.poles["A"], "answer": a["answer"], "choice": choice,
                     "target_pole": next(x for x in persona if ev.AXIS_OF[x] == item.axis),
                     "p_a": {"A": 1.0, "B": 0.0}.get(choice, 0.5)})   # unparsed counts as a coin flip

        with _progress(len(todo), "questionnaire (generated answers)") as bar:
            _each(todo, work, done, cfg.workers, bar)
        rows = [r for r in res.rows if r["persona"] in cfg.personas and r["method"] in cfg.methods]
        summary["gen"] = ev.mcqa_summary(rows)
        for method, s in summary["gen"].items():
            mine = [r for r in rows if r["method"] == method]
            s["unparsed"] = sum(r["choice"] is None for r in mine) / max(1, len(mine))
    return summary


def mcqa_table(summary: dict) -> str:
    lines = []
    for readout, title in (("prob", "P(A) vs P(B) of the method's next-token distribution"),
                           ("gen", "parsed from a generated answer (8 tokens; unparsed = coin flip)")):
        if readout not in summary:
            continue
        lines += [f"**Read-out: {title}** ({summary['items']} items, personas: {', '.join(summary['personas'])})", "",
                  "| method | E/I | S/N | T/F | J/P | mean agreement | mean P(target pole) | whole type |"
                  + (" unparsed |" if readout == "gen" else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if readout == "gen" else "")]
        for method, s in _ordered(summary[readout]):
            ax = s["axis_agreement"]
            soft = np.mean(list(s["axis_soft"].values()))
            lines.append(f"| {method} | " + " | ".join(ev.fmt(ax.get(a), True) for a in ("EI", "SN", "TF", "JP"))
                         + f" | {ev.fmt(s['mean_agreement'], True)} | {ev.fmt(soft, True)} | "
                         f"{ev.fmt(s['type_accuracy'], True)} |"
                         + (f" {ev.fmt(s['unparsed'], True)} |" if readout == "gen" else ""))
        lines.append("")
    return "\n".join(lines)


def _ordered(by_method: Mapping[str, dict]):
    order = ["reference answers"] + list(ev.BASELINES) + ["mpg"] + list(ev.MPG_METHODS)
    return sorted(by_method.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


# ---------------------------------------------------------------------------------------------
# Open answers: MBTI questions and role-play
# ---------------------------------------------------------------------------------------------

def _prompts(cfg: EvalConfig) -> list[tuple[str, dict, str, str | None]]:
    """(persona, item {id, reference, ...}, user message, system prompt for the prompting baseline)."""
    out = []
    if cfg.task == "qa":
        desc = ev.pole_descriptions(cfg.data_dir)
        for persona in cfg.personas:
            for q in ev.load_qa(persona, cfg.data_dir)[:cfg.limit]:
                out.append((persona, q, q["question"], ev.persona_system_prompt(persona, desc)))
    elif cfg.task == "roleplay":
        rows, template = ev.load_roleplay(cfg.data_dir)
        for r in rows[:cfg.limit]:
            user = template.replace("{profile}", r["profile"]).replace("{personality}", r["personality"])
            out.append((ROLEPLAY, {**r, "reference": r["reference_answer"]}, user, None))
    else:
        raise PersonamixError(f"unknown open-answer task {cfg.task!r}")
    return out


def run_answers(gen: Generator, merges: Mapping[str, str], cfg: EvalConfig) -> ev.Results:
    """Generate every (prompt, method) answer not yet in <out>/<task>.jsonl."""
    res = ev.Results(cfg.out / f"{cfg.task}.jsonl")
    todo = [(p, item, user, system, m) for p, item, user, system in _prompts(cfg) for m in cfg.methods
            if (cfg.task, p, m, item["id"]) not in res]

    def work(t):
        persona, item, user, system, method = t
        return ev.answer(gen, user, method, persona_weights(persona), merges.get(persona), system,
                         **_sampling(cfg, cfg.seed + int(item["id"])))

    def done(t, a):
        persona, item, _, _, method = t
        res.add({"task": cfg.task, "persona": persona, "method": method, "id": item["id"], **a})

    with _progress(len(todo), f"{cfg.task} answers") as bar:
        _each(todo, work, done, cfg.workers, bar)
    return res


def with_items(rows: list[dict], cfg: EvalConfig) -> list[dict]:
    """The answers of this run's personas and methods, joined with their items' reference answer
    (and role-play traits) read from the data: result files hold ids, not copies of the data."""
    items = {(p, item["id"]): item for p, item, _, _ in _prompts(cfg)}
    out = []
    for r in rows:
        item = items.get((r["persona"], str(r["id"])))
        if item is not None and r["method"] in cfg.methods:
            out.append({**r, **{k: item[k] for k in ("reference", "profile", "personality") if k in item}})
    return out


def score_answers(rows: list[dict], task: str, judges: dict, embed) -> dict:
    """Per (persona, method): judge agreement, similarity to the reference, perplexity, distinct-n.
    The judges also score the reference answers themselves (method "reference answers"): how
    well a judge reads this task's answers, i.e. the ceiling of its agreement."""
    out: dict = {}
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["persona"], r["method"]), []).append(r)
    for (persona, method), rs in sorted(groups.items()):
        texts = [r["answer"] for r in rs]
        sim = ev.cosine(embed(texts), embed([r["reference"] for r in rs]))
        out.setdefault(method, {})[persona] = {
            "n": len(rs), "similarity": float(sim.mean()),
            "perplexity": float(np.nanmedian([r["perplexity"] for r in rs])),
            "distinct_1": ev.distinct_n(texts, 1), "distinct_2": ev.distinct_n(texts, 2),
            "tokens_per_s": float(np.median([r["stats"]["tokens_per_s"] for r in rs])),
            **judge_scores(task, persona, texts, rs, judges, embed)}
    for persona in sorted({p for p, _ in groups}):
        refs = list({r["id"]: r for r in rows if r["persona"] == persona}.values())
        out.setdefault("reference answers", {})[persona] = {
            "n": len(refs), **judge_scores(task, persona, [r["reference"] for r in refs], refs, judges, embed)}
    return out


def judge_scores(task: str, persona: str, texts: list[str], rows: list[dict], judges: dict, embed) -> dict:
    """Share of texts the judges place on the persona's side (per axis / attribute, and all at once)."""
    s = {}
    if task == "qa":
        from .judges import judge_mbti
        hits = []
        for axis, p in judge_mbti(judges, embed, texts).items():
            first = axis.split("_")[0].upper()
            target = next(x for x in persona if ev.AXIS_OF[x] == ev.AXIS_OF[first])
            hit = (p > 0.5) if target == first else (p < 0.5)
            s[f"agree_{axis}"] = float(hit.mean())
            hits.append(hit)
        s["mean_agreement"] = float(np.mean([h.mean() for h in hits]))
        s["type_match"] = float(np.all(hits, axis=0).mean())
    else:
        from .judges import judge_roleplay
        probs = judge_roleplay(judges, embed, {a: [r[a] for r in rows] for a in judges}, texts)
        for attr, p in probs.items():
            s[f"follows_{attr}"] = float((p > 0.5).mean())
        s["mean_agreement"] = float(np.mean([s[f"follows_{a}"] for a in probs]))
        s["both"] = float(np.all([p > 0.5 for p in probs.values()], axis=0).mean())
    return s


def answers_table(scores: dict, task: str) -> str:
    """One row per method, averaged over personas (every persona weighs the same)."""
    if task == "qa":
        cols = [("agree_e_i", "E/I", True), ("agree_s_n", "S/N", True), ("agree_t_f", "T/F", True),
                ("agree_j_p", "J/P", True), ("mean_agreement", "mean agreement", True),
                ("type_match", "whole type", True)]
    else:
        cols = [("follows_personality", "follows personality", True), ("follows_profile", "follows profile", True),
                ("mean_agreement", "mean agreement", True), ("both", "both", True)]
    cols += [("similarity", "similarity to reference", False), ("perplexity", "perplexity", False),
             ("distinct_1", "distinct-1", False), ("distinct_2", "distinct-2", False)]
    # tokens/s stays in the summary JSON but not in the table: with --workers (or other jobs on the
    # machine) it measures sharing, not a method's speed; `personamix bench` does that
    lines = ["| method | n | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, per in _ordered(scores):
        n = sum(s["n"] for s in per.values())
        vals = [ev.fmt(float(np.mean([s[c] for s in per.values()])) if all(c in s for s in per.values()) else None,
                       pct) for c, _, pct in cols]
        lines.append(f"| {method} | {n} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def quality_gap(by_method: Mapping[str, float]) -> dict:
    """MPG's best vs the best of prompting and merging (the issue's quality target: >= +10% relative)."""
    mpg = {m: v for m, v in by_method.items() if m in ev.MPG_METHODS + ("mpg",)}
    base = {m: v for m, v in by_method.items() if m in ("prompt", "merge")}
    if not mpg or not base:
        return {}
    bm, bb = max(mpg, key=mpg.get), max(base, key=base.get)
    rel = (mpg[bm] - base[bb]) / base[bb] if base[bb] else float("nan")
    return {"best_mpg": bm, "best_mpg_value": mpg[bm], "best_baseline": bb, "best_baseline_value": base[bb],
            "relative_gain": rel}


def score_run(rows: list[dict], cfg: EvalConfig, judge_features: tuple[str, ...] = ("lexical", "minilm")
              ) -> tuple[dict, str]:
    """(summary, Markdown) of an open-answer run: one section per judge feature set (qa; the first
    is the headline, also under summary["scores"/"judges"/"quality_gap"]); role-play has one."""
    from .judges import Embedder, train_mbti_judges, train_roleplay_judges

    embed = Embedder()
    rows = with_items(rows, cfg)
    kinds = tuple(judge_features) if cfg.task == "qa" else ("minilm",)
    sections, tables = {}, []
    for kind in kinds:
        if cfg.task == "qa":
            judges = train_mbti_judges(embed, cfg.data_dir, limit=cfg.judge_limit, seed=cfg.seed, features=kind)
        else:
            judges = train_roleplay_judges(embed, cfg.data_dir, limit=cfg.judge_limit, seed=cfg.seed)
        scores = score_answers(rows, cfg.task, judges, embed)
        sections[kind] = {
            "scores": scores,
            "judges": {n: {"held_out_accuracy": j.held_out_accuracy, "n_train": j.n_train, "n_held_out": j.n_held_out}
                       for n, j in judges.items()},
            "quality_gap": quality_gap({m: float(np.mean([s["mean_agreement"] for s in per.values()]))
                                        for m, per in scores.items()})}
        head = f"**Judges: {kind}**\n\n" if cfg.task == "qa" else ""
        tables.append(head + answers_table(scores, cfg.task) + "\nJudges:\n\n" + judges_table(judges))
    return {**sections[kinds[0]], "judge_features": kinds[0], "by_judge": sections}, "\n".join(tables)


def judges_table(judges: dict) -> str:
    lines = ["| judge | label 1 | training texts | held-out texts | held-out accuracy |", "|---|---|---|---|---|"]
    for name, j in judges.items():
        lines.append(f"| {name} | {j.positive} | {j.n_train} | {j.n_held_out} | {100 * j.held_out_accuracy:.1f} |")
    return "\n".join(lines) + "\n"


__all__ = ["EvalConfig", "eval_generator", "run_mcqa", "mcqa_table", "run_answers", "with_items", "score_answers",
           "score_run",
           "answers_table", "quality_gap", "judges_table", "persona_weights", "ROLEPLAY"]
