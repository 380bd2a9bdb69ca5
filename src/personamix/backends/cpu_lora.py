"""The LoRA deltas of a multi-adapter forward in one kernel call, on x86 CPUs with AVX2.

MultiLoraLinear's PyTorch path (multilora.py) gathers each adapter's positions into a padded
[U, G, in] batch, runs two batched matmuls and scatters the result back: three index ops and two
MKL calls per adapted layer, ~150-190 us for a 16-client forward's 60 positions on the 2-core Zen 3
of docs/batching.md even with everything in cache. csrc/avx2_lora.cpp reads each position's row of
x and y in place and each adapter's A and B once per tile (see there for the math), and skips the
zero blocks of a fused q/k/v layer's block-diagonal B.

`Segments` (which positions use which adapter) is built once per forward by AdapterRows;
`LoraWeights` once per layer; `add_deltas` runs a layer. Used where `lora_problem` says nothing
(fp32 on CPU, output sizes a multiple of 8, the library built and agreeing with PyTorch). The
environment variable PERSONAMIX_CPU_LORA=torch keeps PyTorch's path (for A/B measurements).
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .avx2 import bind, env_choice

_P, _I = ctypes.c_void_p, ctypes.c_int64
ENV = "PERSONAMIX_CPU_LORA"
CPU_LORA = env_choice(ENV, ("kernel", "torch"))


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The LoRA kernel's library, or why it cannot be used."""
    return bind("_avx2_lora", pml_lora=[_P, _I, _P, _I, _P, _P, _I, _P, _P, _P, _P, _P, _I])


@dataclass
class Segments:
    """Positions of a forward's flattened rows [T, ...] by adapter: segment s is positions
    pos[seg[s]] .. pos[seg[s+1] - 1], all of adapter adapter[s] (int64, CPU); no position twice.
    top_pos, top_adapter: their largest values (checked against each layer's sizes)."""

    pos: torch.Tensor
    seg: torch.Tensor
    adapter: torch.Tensor
    top_pos: int = -1
    top_adapter: int = -1

    @classmethod
    def of(cls, groups: Sequence[tuple[int, Sequence[int]]]) -> Segments:
        """From (adapter, its positions) pairs."""
        pos, seg, adapter = [], [0], []
        for a, members in groups:
            if members:
                pos += members
                seg.append(len(pos))
                adapter.append(a)
        if len(set(pos)) != len(pos):
            raise ValueError("Segments: a position belongs to two segments")
        as_tensor = functools.partial(torch.tensor, dtype=torch.int64)
        return cls(as_tensor(pos), as_tensor(seg), as_tensor(adapter), max(pos, default=-1), max(adapter, default=-1))


@dataclass
class LoraWeights:
    """One layer's stacked A [N, in, R] and B [N, R, out] (R padded to a multiple of 8 with zeros,
    exact), and per 8 output columns the rows [jlo, jhi) of B nonzero for some adapter."""

    a: torch.Tensor
    b: torch.Tensor
    jlo: torch.Tensor
    jhi: torch.Tensor

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor) -> LoraWeights:
        n, k, r = a.shape
        pad = -r % 8
        if pad:
            a, b = F.pad(a, (0, pad)), F.pad(b, (0, 0, 0, pad))
        a, b = a.contiguous(), b.contiguous()                                  # [N, in, R], [N, R, out]
        used = (b != 0).any(0).view(r + pad, -1, 8).any(2)                    # [R, out/8]
        j = torch.arange(r + pad).view(-1, 1)
        jlo = torch.where(used, j, r + pad).amin(0)                           # [out/8] (R: no rows)
        jhi = torch.where(used, j + 1, 0).amax(0)
        return cls(a, b, jlo.contiguous(), jhi.contiguous())


def lora_problem(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why the kernel cannot run a layer with stacked A [N, in, r] and B [N, r, out] here (None:
    it can): the choice, device, dtype, sizes, the library, or its output at these sizes
    disagreeing with PyTorch's."""
    if CPU_LORA != "kernel":
        return f"{ENV}={CPU_LORA}"
    if a.device.type != "cpu":
        return f"device {a.device.type}"
    if a.dtype != torch.float32:
        return f"dtype {a.dtype} (the AVX2 LoRA kernel is fp32)"
    if b.shape[-1] % 8:
        return f"{b.shape[-1]} output features, not a multiple of 8"
    lib = _library()
    return lib if isinstance(lib, str) else _probe(*a.shape, b.shape[-1])


@functools.cache
def _probe(n: int, k: int, r: int, o: int) -> str | None:
    """The kernel against PyTorch on random adapters of these sizes (7 positions, each adapter in
    turn, one of them twice), or None where they agree."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, k, r, generator=g), torch.randn(n, r, o, generator=g)
    x, y0 = torch.randn(7, k, generator=g), torch.randn(7, o, generator=g)
    adapters = [p % n for p in range(7)]
    got = y0.clone()
    with torch.inference_mode():
        add_deltas(x, got, LoraWeights.of(a, b),
                   Segments.of([(i, [p for p in range(7) if adapters[p] == i]) for i in range(n)]))
        want = y0 + torch.bmm(x.unsqueeze(1), a[adapters]).bmm(b[adapters]).squeeze(1)
    if not torch.allclose(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4):
        return f"the AVX2 LoRA kernel differs from PyTorch by {(got - want).abs().max().item():.2g}"
    return None


def add_deltas(x: torch.Tensor, y: torch.Tensor, w: LoraWeights, segments: Segments) -> None:
    """y[p] += (x[p] A[a]) B[a] for every position p of every segment (a its adapter), in place:
    x [..., in] and y [..., out] over the same T positions, y contiguous."""
    k, o = w.a.shape[1], w.b.shape[2]
    x2 = x.reshape(-1, k).contiguous()
    if x.shape[-1] != k or y.shape[-1] != o or not y.is_contiguous() or y.numel() // o != x2.shape[0]:
        raise ValueError(f"add_deltas: x {tuple(x.shape)} and y {tuple(y.shape)} (contiguous: {y.is_contiguous()}) "
                         f"for a layer of {k} -> {o} features")
    if segments.top_pos >= x2.shape[0] or segments.top_adapter >= w.a.shape[0]:
        raise ValueError(f"add_deltas: segments reach position {segments.top_pos} and adapter "
                         f"{segments.top_adapter}, the layer has {x2.shape[0]} positions and {w.a.shape[0]} adapters")
    n_seg = segments.adapter.shape[0]
    if n_seg:
        _library().pml_lora(x2.data_ptr(), k, y.data_ptr(), o, w.a.data_ptr(), w.b.data_ptr(), w.a.shape[2],
                            w.jlo.data_ptr(), w.jhi.data_ptr(), segments.pos.data_ptr(), segments.seg.data_ptr(),
                            segments.adapter.data_ptr(), n_seg)
