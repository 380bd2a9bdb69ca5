"""Weight merging (the Personalized / Rewarded Soups baseline) with PEFT's `add_weighted_adapter`.

Soups interpolate the fine-tuned weights: theta = sum_i w_i theta_i. For LoRA fine-tunes of one
reference that is W + sum_i w_i s_i B_i A_i (s_i = each adapter's alpha/r scaling), which PEFT
builds exactly with combination_type="cat" (the ranks are concatenated, no cross terms).
PEFT's "linear" instead averages the A's and the B's separately, so its delta is
(sum sqrt(w_i) B_i)(sum sqrt(w_i) A_i): not a weight interpolation, hence not used here.
A test checks the merged delta against sum_i w_i s_i B_i A_i.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import PersonamixError
from ..loading import cache_dir, load_reference, resolve_model


def merged_adapter(model: str, adapters: Mapping[str, str], weights: Mapping[str, float],
                   out: str | os.PathLike | None = None) -> str:
    """A PEFT LoRA directory whose delta is sum_i weights[i] * delta_i; cached by its inputs."""
    from peft import PeftModel

    used = {n: float(w) for n, w in weights.items() if w != 0}
    if not used:
        raise PersonamixError("merging needs at least one non-zero weight")
    missing = [n for n in used if n not in adapters]
    if missing:
        raise PersonamixError(f"cannot merge unknown adapter(s) {', '.join(missing)}; known: {', '.join(adapters)}")
    if out is None:
        inputs = {n: [os.path.abspath(adapters[n]), w] for n, w in sorted(used.items())}
        key = json.dumps([resolve_model(model), inputs])
        out = cache_dir() / "merged" / hashlib.sha256(key.encode()).hexdigest()[:16]
    out = Path(out)
    if (out / "adapter_config.json").is_file():
        return str(out)
    ref, _ = load_reference(model, device=torch.device("cpu"))
    names = list(used)
    peft_model = PeftModel.from_pretrained(ref, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(adapters[n], adapter_name=n)
    peft_model.add_weighted_adapter(names, [used[n] for n in names], "merged", combination_type="cat")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=["merged"])
        saved = next(p.parent for p in Path(tmp).rglob("adapter_config.json"))
        _publish(saved, out)
    return str(out)


def _publish(saved: Path, out: Path) -> None:
    """Rename a finished adapter directory to `out` in one step (same parent: atomic), so a
    half-written merge is never visible; when another process published `out` first (two
    evaluations merging the same persona at once), keep theirs: it is the same merge."""
    try:
        os.rename(saved, out)
    except OSError:
        if not (out / "adapter_config.json").is_file():
            raise


__all__ = ["merged_adapter"]
