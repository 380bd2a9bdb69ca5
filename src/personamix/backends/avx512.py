"""Linear layers on personamix's own AVX-512 kernel, for x86 CPUs with AVX-512.

The AVX2 kernel (avx2.py) with 16-wide registers and twice as many of them: panels of 32 output
columns and tiles of 12 rows x 32 columns (csrc/avx512_linear.cpp). On the 2-core AMD EPYC /
Zen 5 of docs/bench/avx512_linear.md oneDNN's matmul is close to the weights' stream at one row
but not past a few: for the 1-58 rows of decoding steps and packed server forwards this kernel
ran at 1.06-1.5x oneDNN's speed, at 0.82-1.0x for 220-1,000-row prompts; the AVX2 kernel, bound by
8-wide arithmetic, fell to 0.63x oneDNN's at 58 rows there.

`Avx512Linear` swaps in for an fp32 nn.Linear on CPU (outputs equal up to float rounding); the
library is built by `pip install` where the compiler can target AVX-512 (setup.py; optional:
where it was not built or the CPU lacks AVX-512, `avx512_problem` says so and packing.py uses
another kernel). Threads and the GIL as for the AVX2 kernel.
"""
from __future__ import annotations

from torch import nn

from .avx2 import PanelLinear


class Avx512Linear(PanelLinear):
    """y = x W^T + b on the AVX-512 kernel (panels of 32 columns, 12 x 32 tiles)."""

    STEM, ISA, PANEL = "_avx512_linear", "AVX512", 32


def avx512_problem(linear: nn.Linear) -> str | None:
    """Why `linear` cannot run on the AVX-512 kernel here (None: it can)."""
    return Avx512Linear.problem(linear)
