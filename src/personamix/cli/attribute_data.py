"""`personamix attribute-data`: the on-policy preference data of the attribute adapters, from one
sampling run of the reference (training/attribute_data.py); then `personamix train POLE --data
DIR/pairs/POLE.json` trains each adapter (`personamix train-shipped --sets attributes` does both)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..loading import DEFAULT_MODEL


def register(sub) -> None:
    from ..training.attribute_data import AttributeDataConfig

    d = AttributeDataConfig()
    p = sub.add_parser("attribute-data", help="sample the reference and build preference pairs for every attribute "
                                              "pole (sentiment, wording, question)")
    p.add_argument("--out", default=str(d.out), help="directory (re-running resumes; default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompts", type=int, default=d.prompts, help="training prompts to sample (default: %(default)s)")
    p.add_argument("--samples", type=int, default=d.samples, help="replies per prompt (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per generate() call")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-dir", default=None,
                   help="the paper's data root (default $PERSONAMIX_DATA or ../shared/data/mpg)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from ..training.attribute_data import AttributeDataConfig, build

    cfg = AttributeDataConfig(out=Path(a.out), model=a.model, prompts=a.prompts, samples=a.samples,
                              max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, seed=a.seed,
                              data_dir=a.data_dir, device=a.device)
    with tqdm(desc="sampling the reference", unit="prompt", dynamic_ncols=True) as bar:
        stats = build(cfg, progress=bar)
    print(json.dumps(stats["poles"], indent=1))
    print(f"pairs in {cfg.out / 'pairs'}; statistics in {cfg.out / 'stats.json'}")
