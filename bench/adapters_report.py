"""docs/adapters.md for the shipped adapters: data, settings, wall time, held-out DPO reward
accuracy and margin, a training-curve plot, and a sanity check that each MBTI adapter moves
generations towards its pole.

Sanity check (objective, independent of the adapters): per axis, a TF-IDF + logistic-regression
judge is trained on the answers of the axis's TRAINING pairs (each pair gives one answer in
each pole's voice) and its accuracy is measured on the held-out pairs' answers. Then, on
held-out instructions, the reference is sampled through each pole's adapter alone (method
"token", weight 1: exactly pi_pole), same seed per instruction, and the judge scores how
strongly each generation reads as the first pole of the axis.

    python bench/adapters_report.py                   # table + plot from the shipped adapters
    python bench/adapters_report.py --sanity e_i s_n  # plus the sanity check for these axes
    python bench/adapters_report.py --sets attributes --prefix attributes   # docs/attributes_table.md, ..._training.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from personamix.adapters import SHIPPED_DIR, SHIPPED_SETS
from personamix.cli.common import quiet
from personamix.mbti import axis_key
from personamix.training.data import attribute_pairs, split
from personamix.training.train import LOG_FILE, read_meta


def table(rows: list[dict]) -> str:
    head = ("| adapter | data (pairs: total / trained on / held out) | steps | wall time | "
            "held-out reward accuracy | held-out mean margin | size |\n|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['set']}/{r['attribute']} | {r['source']}: "
        f"{r['pairs_total']} / {r['pairs_train']} / {r['pairs_held_out']} "
        f"| {r['steps']} | {r['wall_time_s'] / 60:.1f} min | {r['held_out']['reward_accuracy']:.3f} "
        f"| {r['held_out']['reward_margin']:.3f} | {r['size_mb']:.2f} MB |\n" for r in rows)


SOURCES = {"mbti": lambda a: f"MBTI_dpo_{axis_key(a)}", "roleplay": lambda a: f"dpo_{a}",
           "attributes": lambda a: "reference's replies"}


def collect(sets=("mbti", "roleplay")) -> list[dict]:
    rows = []
    for set_name in sets:
        attributes = SHIPPED_SETS[set_name]
        for attribute in attributes:
            path = SHIPPED_DIR / set_name / attribute
            meta = read_meta(path)
            if meta is None:
                print(f"missing: {path}", file=sys.stderr)
                continue
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20
            source = SOURCES[set_name](attribute)
            rows.append({**meta, "set": set_name, "size_mb": size, "source": source,
                         "log": json.loads((path / LOG_FILE).read_text())})
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in rows:
        log = [e for e in r["log"] if "loss" in e and "rewards/accuracies" in e]
        steps = [e["step"] for e in log]
        label = r["attribute"]
        axes[0].plot(steps, [e["loss"] for e in log], label=label)
        axes[1].plot(steps, [e["rewards/accuracies"] for e in log], label=label)
        axes[2].plot(steps, [e["rewards/margins"] for e in log], label=label)
    for ax, title in zip(axes, ("DPO loss (train batches)", "reward accuracy (train batches)",
                                "reward margin (train batches)")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def sanity(axis: str, n_prompts: int, max_new_tokens: int, root: Path = SHIPPED_DIR) -> dict:
    """Judge accuracy on held-out answers, and judge scores of generations with each pole's adapter."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from personamix import Generator

    first, second = axis.upper().split("_")
    train, held = split(attribute_pairs(first))        # chosen = first pole's voice
    texts = [p.chosen for p in train] + [p.rejected for p in train]
    labels = [1] * len(train) + [0] * len(train)
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(vec.fit_transform(texts), labels)
    held_texts = [p.chosen for p in held] + [p.rejected for p in held]
    held_labels = [1] * len(held) + [0] * len(held)
    judge_acc = float(clf.score(vec.transform(held_texts), held_labels))

    gen = Generator.from_pretrained(adapters={p: str(root / "mbti" / p) for p in (first, second)})
    prompts = [p.prompt for p in held[:n_prompts]]
    scores = {first: [], second: []}
    samples = {first: [], second: []}
    for i, prompt in enumerate(prompts):
        for pole in (first, second):
            out = gen.generate(prompt, weights={pole: 1.0}, method="token", max_new_tokens=max_new_tokens,
                               seed=1000 + i, temperature=0.7, top_p=0.9)
            scores[pole].append(float(clf.predict_proba(vec.transform([out.text]))[0, 1]))
            samples[pole].append(out.text)
        print(f"{axis} {i + 1}/{len(prompts)}: P({first}) {first}-adapter {scores[first][-1]:.2f}, "
              f"{second}-adapter {scores[second][-1]:.2f}", file=sys.stderr)
    from scipy.stats import wilcoxon

    wins = sum(a > b for a, b in zip(scores[first], scores[second]))
    p_value = float(wilcoxon(scores[first], scores[second], alternative="greater").pvalue)
    return {"axis": axis, "judge_held_out_accuracy": judge_acc, "judge_held_out_answers": len(held_texts),
            "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            f"mean_P({first})_with_{first}": statistics.mean(scores[first]),
            f"mean_P({first})_with_{second}": statistics.mean(scores[second]),
            f"pairs_where_{first}_scores_higher": f"{wins}/{len(prompts)}",
            "wilcoxon_one_sided_p": p_value, "scores": scores,
            "example": {"prompt": prompts[0], first: samples[first][0], second: samples[second][0]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sanity", nargs="*", default=[], help="MBTI axes to sanity-check (e_i s_n t_f j_p)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--root", default=str(SHIPPED_DIR), help="where the adapters are (default: the shipped ones)")
    ap.add_argument("--no-table", action="store_true", help="only run the sanity check")
    ap.add_argument("--sets", default="mbti,roleplay", help="adapter sets in the table and plot")
    ap.add_argument("--prefix", default="adapters", help="docs/<prefix>_table.md and docs/<prefix>_training.png")
    a = ap.parse_args()
    quiet()
    docs = Path(a.docs)
    if not a.no_table:
        rows = collect(tuple(a.sets.split(",")))
        plot(rows, docs / f"{a.prefix}_training.png")
        (docs / f"{a.prefix}_table.md").write_text(table(rows))
        print(table(rows))
    sanity_file = docs / "adapters_sanity.json"
    results = json.loads(sanity_file.read_text()) if sanity_file.is_file() else {}
    for axis in a.sanity:
        results[axis] = sanity(axis, a.prompts, a.max_new_tokens, Path(a.root))
        sanity_file.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in results[axis].items() if k != "example"}, indent=1))


if __name__ == "__main__":
    main()
