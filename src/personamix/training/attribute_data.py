"""On-policy preference data for the attribute adapters (personamix/attributes.py), built from
one sampling run of the reference.

Prompts: the paper's instructions (the bare instructions of its MBTI preference data, every axis,
without the persona preamble), deduplicated; a fixed, seeded share of them is held out
(data.is_held_out) and never sampled for training: the evaluation asks those. For each training
prompt the reference answers K times (batched generate(), temperature 1); every answer is scored
on every axis. For each pole, chosen = the answer with the highest score for that pole and
rejected = the one with the lowest, kept when they differ by at least the axis's margin.

Files under `out`: samples.jsonl (one line per prompt: its K answers and their scores; a run
resumes from it), pairs/<pole>.json (TRL conversational records, for `personamix train
--data`), stats.json (pairs per pole, margins, score correlations between axes).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..attributes import AXES, POLES, pole_score, scores
from ..errors import PersonamixError
from ..loading import DEFAULT_MODEL
from .data import AXES as MBTI_DATA_AXES
from .data import bare_instruction, data_source, is_held_out, load_records


def default_dir() -> Path:
    """Where the data of the shipped attribute adapters is built: <cache>/attribute-data."""
    from ..loading import cache_dir

    return cache_dir() / "attribute-data"


@dataclass
class AttributeDataConfig:
    """One sampling run; the shipped adapters' data used these defaults (960 training prompts)."""

    out: Path = field(default_factory=default_dir)
    model: str = DEFAULT_MODEL
    prompts: int | None = 960          # training prompts to sample (None: all)
    samples: int = 4                   # answers per prompt (K)
    max_new_tokens: int = 48
    batch_size: int = 16               # prompts per generate() call (x samples rows)
    holdout: float = 0.15              # share of prompts held out for the evaluation
    seed: int = 0
    data_dir: str | None = None
    device: str | None = None


def instructions(data_dir=None) -> list[str]:
    """The paper's bare instructions, deduplicated, in a fixed order."""
    seen: dict[str, None] = {}
    for axis in MBTI_DATA_AXES:
        for r in load_records(data_source(axis, data_dir)):
            seen.setdefault(bare_instruction(r["prompt"]), None)
    return sorted(seen)


def split_prompts(data_dir=None, holdout: float = 0.15, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), fixed by hashing each prompt."""
    prompts = instructions(data_dir)
    held = [p for p in prompts if is_held_out(p, holdout, seed)]
    return [p for p in prompts if not is_held_out(p, holdout, seed)], held


def build(cfg: AttributeDataConfig, progress=None) -> dict:
    """Sample (resuming), then write the pairs and their statistics; returns the statistics."""
    train, held = split_prompts(cfg.data_dir, cfg.holdout, cfg.seed)
    if cfg.prompts is not None:
        train = random.Random(cfg.seed).sample(train, min(cfg.prompts, len(train)))
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / "samples.jsonl"
    done = {json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()} \
        if path.is_file() else set()
    todo = [p for p in train if p not in done]
    if progress is not None:
        progress.total = len(train)
        progress.update(len(train) - len(todo))
    if todo:
        _sample(cfg, todo, path, progress)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["prompt"] in set(train)]
    stats = write_pairs(rows, cfg.out)
    stats.update(prompts_train=len(train), prompts_held_out=len(held), samples_per_prompt=cfg.samples,
                 max_new_tokens=cfg.max_new_tokens, model=cfg.model)
    (cfg.out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def _sample(cfg: AttributeDataConfig, prompts: list[str], path: Path, progress) -> None:
    """K answers per prompt with the reference's own generate() (batched, left-padded), appended
    to samples.jsonl prompt by prompt."""
    import torch

    from ..loading import load_reference, pick_device

    model, tok = load_reference(cfg.model, pick_device(cfg.device))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start: start + cfg.batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                 for p in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        torch.manual_seed(cfg.seed * 1_000_003 + start)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.samples,
                                 pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        with path.open("a") as f:
            for i, prompt in enumerate(batch):
                answers = [tok.decode(new[i * cfg.samples + j], skip_special_tokens=True).strip()
                           for j in range(cfg.samples)]
                f.write(json.dumps({"prompt": prompt, "answers": answers,
                                    "scores": [scores(a) for a in answers]}) + "\n")
        if progress is not None:
            progress.update(len(batch))


def write_pairs(rows: list[dict], out: Path) -> dict:
    """pairs/<pole>.json for every pole, and their statistics."""
    (out / "pairs").mkdir(exist_ok=True)
    stats: dict = {"poles": {}}
    for axis in AXES:
        for pole in axis.poles:
            pairs, margins = [], []
            for r in rows:
                s = [pole_score(pole, a) for a in r["answers"]]
                best, worst = max(range(len(s)), key=s.__getitem__), min(range(len(s)), key=s.__getitem__)
                if s[best] - s[worst] >= axis.margin:
                    pairs.append({"prompt": r["prompt"],
                                  "chosen": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["answers"][best]}],
                                  "rejected": [{"role": "user", "content": r["prompt"]},
                                               {"role": "assistant", "content": r["answers"][worst]}]})
                    margins.append(s[best] - s[worst])
            if not pairs:
                raise PersonamixError(f"no pair for pole {pole!r} reaches the margin {axis.margin}: sample more "
                                      "answers per prompt")
            (out / "pairs" / f"{pole}.json").write_text(json.dumps(pairs, indent=0))
            stats["poles"][pole] = {"pairs": len(pairs), "mean_margin": sum(margins) / len(margins)}
    stats["correlations"] = correlations(rows)
    stats["reference"] = {a.name: _summary([s[a.name] for r in rows for s in r["scores"]]) for a in AXES}
    return stats


def correlations(rows: list[dict]) -> dict[str, float]:
    """Spearman rank correlation between every two axes' scores over all sampled answers."""
    from scipy.stats import spearmanr

    values = {a.name: [s[a.name] for r in rows for s in r["scores"]] for a in AXES}
    out = {}
    for i, a in enumerate(AXES):
        for b in AXES[i + 1:]:
            rho = spearmanr(values[a.name], values[b.name]).statistic
            out[f"{a.name}~{b.name}"] = float(rho)
    return out


def _summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    n = len(xs)
    return {"n": n, "mean": sum(xs) / n, "p10": xs[n // 10], "median": xs[n // 2], "p90": xs[(9 * n) // 10]}


def pairs_path(out: Path, pole: str) -> Path:
    if pole not in POLES:
        raise PersonamixError(f"unknown attribute pole {pole!r}; poles are {', '.join(POLES)}")
    return Path(out) / "pairs" / f"{pole}.json"


__all__ = ["AttributeDataConfig", "default_dir", "instructions", "split_prompts", "build", "write_pairs",
           "correlations", "pairs_path"]
