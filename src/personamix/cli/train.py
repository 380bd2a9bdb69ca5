"""`personamix train ATTRIBUTE` (one DPO-trained LoRA adapter) and `personamix train-shipped`
(reproduce the adapters that ship with personamix)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..adapters import SHIPPED_DIR, SHIPPED_SETS
from ..loading import DEFAULT_MODEL
from ..training.train import TrainConfig

#: TrainConfig fields that become flags of `personamix train` (the rest have flags of their own)
TRAIN_FLAGS = ("rank", "alpha", "dropout", "beta", "learning_rate", "epochs", "max_steps", "batch_size",
               "grad_accum", "max_length", "max_pairs", "holdout", "split_seed", "seed", "evals", "device")


def register(sub) -> None:
    t = sub.add_parser("train", help="DPO-train one single-attribute LoRA adapter (TRL DPOTrainer)")
    t.add_argument("attribute", help="an MBTI pole (E I S N T F J P), 'personality' or 'profile'")
    t.add_argument("--out", required=True, help="adapter directory (re-running resumes from its checkpoints)")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--data", default=None, help="preference data: .json/.jsonl file, directory or hub id "
                                                "(default: the paper's data for the attribute)")
    t.add_argument("--data-dir", default=None,
                   help="the paper's data root (default $PERSONAMIX_DATA or ../shared/data/mpg)")
    t.add_argument("--keep-description", action="store_true", help="MBTI: keep the pole description in the prompt")
    defaults = TrainConfig(attribute="E", output_dir="")
    help_of = {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}
    for name in TRAIN_FLAGS:
        value = getattr(defaults, name)
        kind = float if isinstance(value, float) else (int if isinstance(value, int) or value is None else str)
        if name == "device":
            kind = str
        t.add_argument("--" + name.replace("_", "-"), type=kind, default=value,
                       help=f"{help_of[name]} (default: {value})".replace("%", "%%"))
    t.add_argument("--target-modules", default=",".join(defaults.target_modules),
                   help="comma-separated module names the LoRA adapts (default: %(default)s)")
    t.set_defaults(func=run_train)

    ts = sub.add_parser("train-shipped", help="reproduce the adapters that ship with personamix")
    ts.add_argument("--sets", nargs="+", default=list(SHIPPED_SETS), choices=list(SHIPPED_SETS))
    ts.add_argument("--only", default=None, help="comma-separated attributes, e.g. E,I")
    ts.add_argument("--out-root", default=str(SHIPPED_DIR))
    ts.add_argument("--data-dir", default=None)
    ts.add_argument("--device", default=None)
    ts.set_defaults(func=run_train_shipped)


def _print_meta(meta: dict) -> None:
    h = meta["held_out"]
    print(f"{meta['attribute']}: {meta['steps']} steps on {meta['pairs_train']} pairs in {meta['wall_time_s']:.0f} s; "
          f"held-out ({meta['pairs_held_out']} pairs) reward accuracy {h['reward_accuracy']:.3f}, "
          f"mean margin {h['reward_margin']:.3f}")


def run_train(a: argparse.Namespace) -> None:
    from ..training.train import train_adapter

    kwargs = {name: getattr(a, name) for name in TRAIN_FLAGS}
    cfg = TrainConfig(attribute=a.attribute, output_dir=a.out, model=a.model, data=a.data, data_dir=a.data_dir,
                      keep_description=a.keep_description,
                      target_modules=[m for m in a.target_modules.split(",") if m], **kwargs)
    _print_meta(train_adapter(cfg))
    print(f"saved to {a.out}")


def run_train_shipped(a: argparse.Namespace) -> None:
    from ..training.train import read_meta, shipped_config, train_adapter

    only = set(a.only.split(",")) if a.only else None
    if "attributes" in a.sets:
        from ..training.attribute_data import AttributeDataConfig, build, default_dir

        if not (default_dir() / "stats.json").is_file():
            print(f"attributes: sampling the reference's replies for the preference data into {default_dir()} "
                  "(resumable; about 15 min on 2 CPU cores)")
            build(AttributeDataConfig(device=a.device))
    for set_name in a.sets:
        for attribute in SHIPPED_SETS[set_name]:
            if only is None or attribute in only:
                cfg = shipped_config(set_name, attribute, a.out_root, data_dir=a.data_dir, device=a.device)
                if read_meta(cfg.output_dir) is not None:
                    print(f"{set_name}/{attribute}: already trained ({cfg.output_dir}); delete it to retrain")
                    continue
                _print_meta(train_adapter(cfg))
