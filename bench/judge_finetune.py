"""Experiment: does fine-tuning all-MiniLM-L6-v2 make a better MBTI judge than the logistic
regression on its frozen embeddings (src/personamix/judges.py)?

Mean pooling + a linear head, every weight trained, binary cross-entropy on single answers of the
DPO pairs labelled by pole, the adapters' train / held-out split (data.split). Prints the held-out
accuracy after each epoch. Not used by the evaluations (yet); see docs/results.md for the judges.

    python bench/judge_finetune.py e_i [--epochs 2] [--limit 400]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from personamix.evaluation.judges import default_embedder_path
from personamix.training.data import attribute_pairs, split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("axis", choices=["e_i", "s_n", "t_f", "j_p"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="training pairs (default: all)")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    train, held = split(attribute_pairs(a.axis.split("_")[0].upper()))
    if a.limit and len(train) > a.limit:
        train = [train[i] for i in sorted(np.random.default_rng(a.seed).choice(len(train), a.limit, replace=False))]
    path = default_embedder_path()
    tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    head = torch.nn.Linear(enc.config.hidden_size, 1)

    def logits(texts: list[str]) -> torch.Tensor:
        b = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        m = b["attention_mask"].unsqueeze(-1).float()
        return head((enc(**b).last_hidden_state * m).sum(1) / m.sum(1)).squeeze(-1)

    def labelled(pairs) -> tuple[list[str], torch.Tensor]:
        return [t for p in pairs for t in (p.chosen, p.rejected)], torch.tensor([1.0, 0.0] * len(pairs))

    (xt, yt), (xh, yh) = labelled(train), labelled(held)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=a.lr, weight_decay=0.01)
    bs = 16
    steps = a.epochs * -(-len(xt) // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps))
    start = time.time()
    for epoch in range(a.epochs):
        enc.train()
        for idx in torch.randperm(len(xt)).split(bs):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits([xt[j] for j in idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        enc.eval()
        with torch.no_grad():
            pred = torch.cat([logits(xh[i: i + 64]) for i in range(0, len(xh), 64)]) > 0
        print(f"{a.axis} epoch {epoch + 1}: held-out accuracy {(pred.float() == yh).float().mean():.3f} "
              f"({len(xt)} training answers, {len(xh)} held out, {time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
