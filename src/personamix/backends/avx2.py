"""Linear layers on personamix's own AVX2 kernel, for x86 CPUs whose widest vectors are AVX2.

On such a CPU (the 2-core AMD EPYC / Zen 3 of docs/bench/avx2_linear.md) oneDNN's matmul for the
few rows of a decoding step neither streams the weights at the memory's bandwidth nor hides
its arithmetic behind that stream: SmolLM2-135M's 151 linear layers take 24 ms for one row and
32 ms for five (the N+1 rows of `token` at N=4), where reading their 537 MB takes ~16 ms. The
kernel in csrc/avx2_linear.cpp reads each weight once per call, packed into panels of 16 output
columns, and keeps 6 rows' partial sums in registers: 1.23x oneDNN's speed at one row, 1.45x at
five, 1.33x at sixteen, about even at prompt-sized batches (where both are bound by arithmetic).

`Avx2Linear` swaps in for an fp32 nn.Linear on CPU (outputs equal up to float rounding: another
summation order). The kernel is a shared library built by `pip install` (setup.py; optional:
where it was not built, `avx2_problem` says so and packing.py uses oneDNN). It runs on the
OpenMP team of the calling thread, in PyTorch's own OpenMP runtime (torch.set_num_threads and
omp.py apply), and releases the GIL while it runs (ctypes). `PanelLinear` is what it shares with
the AVX-512 kernel (avx512.py); `kernel_library` and `bind` load every compiled kernel.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PersonamixError, first_line

_P, _I = ctypes.c_void_p, ctypes.c_int64


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The environment variable `name`, one of `choices` (the first where it is unset or empty)."""
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise PersonamixError(f"{name}={value!r}: expected {' or '.join(choices)}")
    return value


@functools.cache
def kernel_library(stem: str, isa: str = "AVX2") -> ctypes.CDLL | str:
    """The compiled library `stem` next to this file (setup.py builds `_avx2_linear`,
    `_avx2_attention`, ... and `_avx512_linear`), or why it cannot be used: `isa` is the
    instruction set it was built for, AVX2 (which every AVX-512 CPU also has) or AVX512."""
    capability = torch.backends.cpu.get_cpu_capability()   # ATen's: AVX2 implies FMA; AVX-512 CPUs have both
    if not capability.startswith(("AVX2", "AVX512") if isa == "AVX2" else isa):
        return f"this CPU has no {isa} (PyTorch reports {capability})"
    here = Path(__file__).parent
    found = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in here.glob(f"{stem}{suffix}")]
    if not found:
        return f"the {isa} kernel {stem} was not built (setup.py builds it on x86-64 Linux with a C++ compiler)"
    torch.get_num_threads()   # PyTorch's OpenMP runtime first: the library's libgomp.so.1 resolves to it
    try:
        return ctypes.CDLL(str(found[0]))
    except OSError as e:
        return f"the {isa} kernel {stem} does not load: {first_line(e)}"


def bind(stem: str, isa: str = "AVX2", **signatures: list) -> ctypes.CDLL | str:
    """kernel_library(stem, isa) with each named function's argument types set, or why it cannot be used."""
    lib = kernel_library(stem, isa)
    if isinstance(lib, str):
        return lib
    try:
        for name, argtypes in signatures.items():
            getattr(lib, name).argtypes = argtypes
    except AttributeError as e:
        return f"the {isa} kernel {stem} does not load: {first_line(e)}"
    return lib


@functools.cache
def linear_library(stem: str, isa: str) -> ctypes.CDLL | str:
    """A linear-layer kernel's library (pml_pack, pml_linear), or why it cannot be used."""
    return bind(stem, isa, pml_pack=[_P, _I, _I, _P], pml_linear=[_P, _I, _I, _P, _P, _I, _P])


class PanelLinear(nn.Module):
    """y = x W^T + b with W held as one of personamix's linear kernels' panels (fp32, CPU,
    inference only): W [N, K] packed once as [ceil(N/PANEL), K, PANEL] (zero columns pad the
    last). A subclass names its library, instruction set and panel width."""

    STEM: str     # the library's file name before its suffix
    ISA: str      # what kernel_library needs: AVX2 or AVX512
    PANEL: int    # output columns per panel (the .cpp's NR)

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        lib = self.library()
        assert not isinstance(lib, str), lib
        w = linear.weight.detach().contiguous()
        n, k = w.shape
        self.panels = torch.empty(-(-n // self.PANEL), k, self.PANEL)                  # [ceil(N/PANEL), K, PANEL]
        lib.pml_pack(w.data_ptr(), n, k, self.panels.data_ptr())
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    @classmethod
    def library(cls) -> ctypes.CDLL | str:
        return linear_library(cls.STEM, cls.ISA)

    @classmethod
    def problem(cls, linear: nn.Linear) -> str | None:
        """Why `linear` cannot run on this kernel here (None: it can): device, dtype, the
        library, or its output disagreeing with F.linear."""
        w = linear.weight
        if w.device.type != "cpu":
            return f"weights on {w.device.type}"
        if w.dtype != torch.float32:
            return f"dtype {w.dtype} (the {cls.ISA} kernel is fp32)"
        lib = cls.library()
        if isinstance(lib, str):
            return lib
        with torch.inference_mode():
            x = torch.randn(7, linear.in_features, generator=torch.Generator().manual_seed(0))
            got, want = cls(linear)(x), F.linear(x, w, linear.bias)
        if not torch.allclose(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4):
            return f"the {cls.ISA} kernel differs from F.linear by {(got - want).abs().max().item():.2g}"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        if k != self.in_features or x.dtype != torch.float32 or x.device.type != "cpu":
            raise RuntimeError(f"{type(self).__name__}: input of {k} features, {x.dtype}, on {x.device.type}; "
                               f"expected {self.in_features} features, torch.float32, on cpu")
        x2 = x.reshape(-1, k).contiguous()                                         # [M, K]
        y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        if x2.shape[0]:
            self.library().pml_linear(x2.data_ptr(), x2.shape[0], k, self.panels.data_ptr(),
                                      None if self.bias is None else self.bias.data_ptr(), self.out_features,
                                      y.data_ptr())
        return y.view(*lead, self.out_features)

    def unpacked_weight(self) -> torch.Tensor:
        """The plain weight [N, K], unpacked (a copy; for tests and inspection)."""
        return self.panels.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Avx2Linear(PanelLinear):
    """y = x W^T + b on the AVX2 kernel (csrc/avx2_linear.cpp: panels of 16 columns, 6 x 16 tiles)."""

    STEM, ISA, PANEL = "_avx2_linear", "AVX2", 16


def avx2_problem(linear: nn.Linear) -> str | None:
    """Why `linear` cannot run on the AVX2 kernel here (None: it can)."""
    return Avx2Linear.problem(linear)
