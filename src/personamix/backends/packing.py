"""A CPU model's linear layers on the fastest prepacked kernel this CPU has: `pack_linears`.

    onednn  oneDNN's blocked layout (onednn.py): CPUs without AVX2, and bf16 models
    avx2    personamix's own kernel (avx2.py): where the CPU's widest vectors are AVX2, measured
            1.3-1.7x oneDNN's speed on a decoding step's rows there (docs/bench/avx2_linear.md)
    avx512  its AVX-512 form (avx512.py): where the CPU has AVX-512, measured 1.06-1.5x oneDNN's
            speed on 1-58 rows on a Zen 5, 0.82-1.0x on 220-1,000-row prompts (docs/bench/avx512_linear.md)

"auto" (the default) picks by the CPU's widest vectors as above; the environment variable
PERSONAMIX_CPU_KERNEL (auto, onednn, avx2 or avx512) overrides it for the whole process. A
kernel that cannot run here (missing op or library, dtype, or output differing from F.linear on
the model's first layer) leaves the model to the next one in KERNELS that can, or to PyTorch's
own kernels, with a warning.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from ..errors import PersonamixError
from .avx2 import Avx2Linear, avx2_problem
from .avx512 import Avx512Linear, avx512_problem
from .onednn import PackedLinear, packing_problem

# in the order tried after the chosen one fails
KERNELS = {"onednn": (PackedLinear, packing_problem), "avx2": (Avx2Linear, avx2_problem),
           "avx512": (Avx512Linear, avx512_problem)}
AUTO = {"AVX512": "avx512", "AVX2": "avx2"}   # torch.backends.cpu.get_cpu_capability()'s prefix; else onednn
ENV = "PERSONAMIX_CPU_KERNEL"


def chosen_kernel() -> str:
    """The kernel `pack_linears` tries first: PERSONAMIX_CPU_KERNEL, or by the CPU (see above)."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice == "auto":
        capability = torch.backends.cpu.get_cpu_capability()
        return next((kernel for isa, kernel in AUTO.items() if capability.startswith(isa)), "onednn")
    if choice not in KERNELS:
        raise PersonamixError(f"{ENV} must be auto, {', '.join(KERNELS)}, got {choice!r}")
    return choice


def pack_linears(model: nn.Module, kernel: str | None = None) -> int:
    """Replace every nn.Linear of a CPU model by a prepacked one (in place) on `kernel` (None: the
    chosen one, falling back to the other where it cannot run); the number replaced. 0, with the
    model untouched, when the model is not on CPU or no kernel is usable here."""
    modules = dict(model.named_modules())
    linears = [(name, m) for name, m in modules.items() if type(m) is nn.Linear]
    if not linears:
        return 0
    first = chosen_kernel() if kernel is None else kernel
    order = [first] + ([k for k in KERNELS if k != first] if kernel is None else [])
    problems = {}
    for name in order:
        problems[name] = KERNELS[name][1](linears[0][1])
        if problems[name] is None:
            break
    else:
        w = linears[0][1].weight
        if w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16):   # expected to work: say why not
            why = "; ".join(f"{k}: {p}" for k, p in problems.items())
            warnings.warn(f"prepacked linear layers unavailable ({why}); using PyTorch's kernels (slower)",
                          stacklevel=2)
        return 0
    if name != first and linears[0][1].weight.dtype == torch.float32:
        warnings.warn(f"the {first} linear kernel is unavailable ({problems[first]}); using {name}", stacklevel=2)
    swap = KERNELS[name][0]
    for path, linear in linears:
        parent, _, child = path.rpartition(".")
        setattr(modules[parent] if parent else model, child, swap(linear))
    with torch.no_grad():   # the rest may still be views of the memory-mapped checkpoint, which would then
        for t in (*model.parameters(), *model.buffers()):   # stay mapped, plain linear weights and all
            t.data = t.data.clone()
    return len(linears)


def linear_kernel(model: nn.Module) -> str | None:
    """Which kernel runs `model`'s linear layers: onednn, avx2, avx512, or None (PyTorch's own)."""
    for m in model.modules():
        for name, (cls, _) in KERNELS.items():
            if type(m) is cls:
                return name
    return None
