"""`personamix eval`: run a task over personas x methods, write raw JSONL, a summary JSON and a
Markdown table under one output directory. Runs resume from their JSONL files."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..adapters import shipped_adapters
from ..errors import PersonamixError
from ..generator import Generator
from ..loading import DEFAULT_MODEL
from ..mbti import ALL_TYPES, parse_persona, pole_of
from .judges import MBTI_FEATURES
from .methods import (
    BASELINES,
    MPG_METHODS,
    ROLEPLAY,
    answer,
    check_methods,
    eval_generator,
    expand_methods,
    mcqa_probs,
    persona_weights,
    readout_methods,
)
from .metrics import mcqa_summary, score_answers
from .report import answers_table, judges_table, mcqa_table
from .tasks import (
    PAPER_TYPES,
    load_mcqa,
    load_qa,
    load_roleplay,
    parse_choice,
    persona_system_prompt,
    pole_descriptions,
)

TASKS = ("mcqa", "qa", "roleplay", "attributes")
MCQA_READOUTS = ("prob", "gen")
#: Methods when none are named; the questionnaire's exact read-out also shows each pole alone.
DEFAULT_METHODS = {"mcqa": BASELINES + ("single-*",) + MPG_METHODS, "qa": BASELINES + MPG_METHODS,
                   "roleplay": ("prompt", "single-*", "merge", "geometric") + MPG_METHODS,
                   "attributes": ("base", "prompt", "single-*", "merge", "geometric") + MPG_METHODS}


@dataclass
class EvalConfig:
    """One evaluation run; `check()` validates it before anything loads."""

    task: str                                   # "mcqa" | "qa" | "roleplay"
    out: Path
    personas: tuple[str, ...] = PAPER_TYPES
    methods: tuple[str, ...] = ()               # empty: DEFAULT_METHODS[task]
    limit: int | None = None                    # items / questions / profiles per persona
    max_new_tokens: int = 96
    seed: int = 0
    temperature: float = 1.0
    k: int = 4
    readouts: tuple[str, ...] = ("prob",)       # mcqa only
    data_dir: str | None = None
    judge_limit: int | None = None              # training pairs per judge (None: all)
    workers: int = 1                            # generations in flight at once (threads)
    judges: tuple[str, ...] = MBTI_FEATURES     # qa: judge feature sets, the first is the headline
    generate_only: bool = False                 # qa/roleplay: write the answers, skip the judges
    model: str = DEFAULT_MODEL
    adapters: dict[str, str] = field(default_factory=dict)   # empty: the shipped set for the task
    backend: str = "auto"
    device: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.methods = tuple(self.methods) or DEFAULT_METHODS.get(self.task, ())
        if self.task == "roleplay":
            self.personas = (ROLEPLAY,)
        if self.task == "attributes" and self.personas == PAPER_TYPES:
            from .composition import PERSONAS

            self.personas = PERSONAS

    def check(self) -> None:
        if self.task not in TASKS:
            raise PersonamixError(f"unknown task {self.task!r}; tasks are {', '.join(TASKS)}")
        if self.limit is not None and self.limit < 1:
            raise PersonamixError(f"--limit must be >= 1, got {self.limit}")
        if self.workers < 1:
            raise PersonamixError(f"--workers must be >= 1, got {self.workers}")
        check_methods(self.methods)
        if self.task == "attributes":
            from ..attributes import parse_persona as parse_attributes

            for t in self.personas:
                parse_attributes(t)
        elif self.task != "roleplay":
            for t in self.personas:
                if len(parse_persona(t)) != 4:
                    raise PersonamixError(f"--types: {t!r} is not a four-letter MBTI type")
        if self.task == "qa" and (not self.judges or set(self.judges) - set(MBTI_FEATURES)):
            raise PersonamixError(f"--judges: use one or more of {', '.join(MBTI_FEATURES)}, got "
                                  f"{','.join(self.judges)!r}")
        if self.task == "qa" and not set(self.personas) <= set(PAPER_TYPES):
            raise PersonamixError(f"open questions exist for {', '.join(PAPER_TYPES)} only")
        bad = [r for r in self.readouts if r not in MCQA_READOUTS]
        if bad:
            raise PersonamixError(f"--readout: unknown {', '.join(bad)}; use prob, gen or prob,gen")


def _evaluate_attributes(cfg: EvalConfig) -> EvalOutcome:
    from .composition import AttributeEvalConfig, report, run

    acfg = AttributeEvalConfig(out=cfg.out, model=cfg.model, adapters=cfg.adapters or shipped_adapters(
        "attributes", cfg.model), prompts=cfg.limit or AttributeEvalConfig.prompts, max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed, k=cfg.k, workers=cfg.workers, personas=cfg.personas, methods=cfg.methods,
        backend=cfg.backend, device=cfg.device, data_dir=cfg.data_dir)
    acfg.sweep_prompts = min(acfg.sweep_prompts, acfg.prompts)
    summary = run(acfg, generate_only=cfg.generate_only)
    if cfg.generate_only:
        return EvalOutcome({}, "", [f"answers in {cfg.out / 'attributes.jsonl'}; scored by the same command without "
                                    "--generate-only"])
    goal = summary["comparisons"].get("goal")
    notes = [] if not goal else [
        f"joint success: best MPG ({goal['best_mpg']}) vs best of merge/prompt ({goal['best_baseline']}): "
        f"{100 * goal['relative_gain'][0]:+.1f}% relative, 95% interval [{100 * goal['relative_gain'][1]:+.1f}, "
        f"{100 * goal['relative_gain'][2]:+.1f}]"]
    return EvalOutcome(summary, report(summary), notes)


def parse_types(text: str) -> tuple[str, ...]:
    """"paper" (ENTJ, ESTP, INFJ), "all" (the 16 types) or comma-separated types."""
    if text in ("paper", "all"):
        return PAPER_TYPES if text == "paper" else ALL_TYPES
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclass
class EvalOutcome:
    summary: dict
    table: str              # Markdown
    notes: list[str]        # one-line findings to print (answers written, quality gap)


def evaluate(cfg: EvalConfig) -> EvalOutcome:
    """Run (or resume) `cfg`, writing <out>/<task>.jsonl, <task>_summary.json and <task>.md."""
    cfg.check()
    if cfg.task == "attributes":
        return _evaluate_attributes(cfg)
    adapters = cfg.adapters or shipped_adapters("roleplay" if cfg.task == "roleplay" else "mbti", cfg.model)
    gen, merges = eval_generator(cfg.model, adapters, cfg.personas, cfg.methods, cfg.backend, cfg.device)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.task == "mcqa":
        summary = run_mcqa(gen, merges, cfg)
        table = mcqa_table(summary)
        key = "prob" if "prob" in summary else "gen"
        summary["quality_gap"] = quality_gap({m: s["mean_agreement"] for m, s in summary[key].items()})
    else:
        res = run_answers(gen, merges, cfg)
        if cfg.generate_only:
            return EvalOutcome({}, "", [f"{len(res.rows)} answers in {res.path}; scored by the same command "
                                        "without --generate-only"])
        summary, table = score_run(res.rows, cfg, cfg.judges)
    summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    (cfg.out / f"{cfg.task}_summary.json").write_text(json.dumps(summary, indent=1))
    (cfg.out / f"{cfg.task}.md").write_text(table)
    notes = []
    for judge, section in summary.get("by_judge", {"": summary}).items():
        gap = section.get("quality_gap")
        if gap:
            notes.append(f"MPG best ({gap['best_mpg']}) vs best of prompting/merging ({gap['best_baseline']}): "
                         f"{100 * gap['relative_gain']:+.1f}% relative on mean per-axis agreement"
                         + (f" ({judge} judges)" if judge else ""))
    return EvalOutcome(summary, table, notes)


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
    items = load_mcqa(cfg.data_dir)[:cfg.limit]
    desc = pole_descriptions(cfg.data_dir)
    summary: dict = {"items": len(items), "personas": list(cfg.personas)}
    adapters = [n for n in gen.adapter_names if not n.startswith("merge-")]
    if "prob" in cfg.readouts:
        path = cfg.out / "mcqa_prob.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        wanted = {(p, m) for p in cfg.personas for m in readout_methods(cfg.methods, p)}
        if ({r["persona"] for r in rows} != set(cfg.personas) or {r["item"] for r in rows} != {i.id for i in items}
                or not wanted <= {(r["persona"], r["method"]) for r in rows}):
            # a file from another run (other personas / items / methods) is recomputed, not mixed in
            with _progress(len(items), "questionnaire (probabilities)") as bar:
                rows = mcqa_probs(gen, items, cfg.personas, adapters, merges, desc, cfg.methods, progress=bar,
                                  workers=cfg.workers)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary["prob"] = mcqa_summary([r for r in rows if (r["persona"], r["method"]) in wanted])
    if "gen" in cfg.readouts:
        res = Results(cfg.out / "mcqa_gen.jsonl")
        todo = [(i, p, m) for i in items for p in cfg.personas for m in expand_methods(cfg.methods, p)
                if ("mcqa", p, m, i.id) not in res]

        def work(t):
            item, persona, method = t
            return answer(gen, item.prompt(), method, persona_weights(persona), merges.get(persona),
                             persona_system_prompt(persona, desc), **_sampling(cfg, cfg.seed + int(item.id), 8))

        def done(t, a):
            item, persona, method = t
            choice = parse_choice(a["answer"])
            res.add({"task": "mcqa", "persona": persona, "method": method, "id": item.id, "axis": item.axis,
                     "pole_a": item.poles["A"], "answer": a["answer"], "choice": choice,
                     "target_pole": pole_of(persona, item.axis),
                     "p_a": {"A": 1.0, "B": 0.0}.get(choice, 0.5)})   # unparsed counts as a coin flip

        with _progress(len(todo), "questionnaire (generated answers)") as bar:
            _each(todo, work, done, cfg.workers, bar)
        rows = [r for r in res.rows if r["persona"] in cfg.personas
                and r["method"] in expand_methods(cfg.methods, r["persona"])]
        summary["gen"] = mcqa_summary(rows)
        for method, s in summary["gen"].items():
            mine = [r for r in rows if r["method"] == method]
            s["unparsed"] = sum(r["choice"] is None for r in mine) / max(1, len(mine))
    return summary


# ---------------------------------------------------------------------------------------------
# Open answers: MBTI questions and role-play
# ---------------------------------------------------------------------------------------------

def _prompts(cfg: EvalConfig) -> list[tuple[str, dict, str, str | None]]:
    """(persona, item {id, reference, ...}, user message, system prompt for the prompting baseline)."""
    out = []
    if cfg.task == "qa":
        desc = pole_descriptions(cfg.data_dir)
        for persona in cfg.personas:
            for q in load_qa(persona, cfg.data_dir)[:cfg.limit]:
                out.append((persona, q, q["question"], persona_system_prompt(persona, desc)))
    elif cfg.task == "roleplay":
        rows, template = load_roleplay(cfg.data_dir)
        for r in rows[:cfg.limit]:
            user = template.replace("{profile}", r["profile"]).replace("{personality}", r["personality"])
            out.append((ROLEPLAY, {**r, "reference": r["reference_answer"]}, user, None))
    else:
        raise PersonamixError(f"unknown open-answer task {cfg.task!r}")
    return out


def run_answers(gen: Generator, merges: Mapping[str, str], cfg: EvalConfig) -> Results:
    """Generate every (prompt, method) answer not yet in <out>/<task>.jsonl."""
    res = Results(cfg.out / f"{cfg.task}.jsonl")
    todo = [(p, item, user, system, m) for p, item, user, system in _prompts(cfg)
            for m in expand_methods(cfg.methods, p) if (cfg.task, p, m, item["id"]) not in res]

    def work(t):
        persona, item, user, system, method = t
        return answer(gen, user, method, persona_weights(persona), merges.get(persona), system,
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
        if item is not None and r["method"] in expand_methods(cfg.methods, r["persona"]):
            out.append({**r, **{k: item[k] for k in ("reference", "profile", "personality") if k in item}})
    return out


def quality_gap(by_method: Mapping[str, float]) -> dict:
    """MPG's best vs the best of prompting and merging (relative gain on mean agreement)."""
    mpg = {m: v for m, v in by_method.items() if m in MPG_METHODS + ("mpg",)}
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


# ---------------------------------------------------------------------------------------------
# Result files
# ---------------------------------------------------------------------------------------------

class Results:
    """An append-only JSONL file of answers keyed by (task, persona, method, id): resumable."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        for n, line in enumerate(lines):
            if line.strip():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:       # a last line cut by an interrupted run: drop it, redo it
                    if n != len(lines) - 1:
                        raise PersonamixError(f"{self.path} line {n + 1} is not JSON") from None
                    self.path.write_text("".join(x + "\n" for x in lines[:n]))
        self._done = {self.key(r) for r in self.rows}

    @staticmethod
    def key(r: Mapping) -> tuple:
        return (r["task"], r["persona"], r["method"], str(r["id"]))

    def __contains__(self, key: tuple) -> bool:
        return key in self._done

    def add(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self._done.add(self.key(row))


__all__ = ["EvalConfig", "EvalOutcome", "evaluate", "parse_types", "run_mcqa", "run_answers", "with_items",
           "score_run", "quality_gap", "Results", "TASKS", "MCQA_READOUTS", "DEFAULT_METHODS"]
