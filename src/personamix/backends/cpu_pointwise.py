"""A decoder layer's pointwise steps in one kernel call each, on x86 CPUs with AVX2.

Between a Llama layer's matmuls decoder.py runs transformers' ops one by one: the residual add
and RMSNorm (8 ops), rotary embeddings (4) and SiLU times up (2), twice a norm per layer. On the
2-core Zen 3 of docs/batching.md each costs ~10 us of dispatch, allocation and a pass over memory
whatever its size, ~145 us per layer at a decoding step's 5 rows: ~4 ms of a 5-row packed
forward's ~55. csrc/avx2_pointwise.cpp does each step in one pass (see there for the math).

`KernelOps` swaps in for decoder.py's `TorchOps` (PackedDecoder.ops), where `pointwise_problem`
says nothing (fp32 on CPU, SiLU layers, sizes the kernel takes, the library built and agreeing
with PyTorch on a probe). Its outputs equal PyTorch's up to float rounding: rope bit for bit,
the norm's mean and silu's e^x to a few ulp, so the packed decoder then computes the model's
own forward to rounding instead of bit for bit (the batched backend checks it at load time as
before, `BatchingBackend._packed_decoder`). The environment variable
PERSONAMIX_CPU_POINTWISE=torch keeps PyTorch's ops (for A/B measurements).
"""
from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn
from transformers import activations

from .avx2 import bind, env_choice
from .decoder import PackedDecoder, TorchOps

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
ENV = "PERSONAMIX_CPU_POINTWISE"
CPU_POINTWISE = env_choice(ENV, ("kernel", "torch"))


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The pointwise kernels' library, or why it cannot be used."""
    return bind("_avx2_pointwise", pml_add_rms_norm=[_P, _P, _P, _F, _P, _I, _I],
                pml_rope=[_P, _I, _I, _I, _P, _P, _P, _I], pml_silu_mul=[_P, _P, _I])


class KernelOps(TorchOps):
    """decoder.py's pointwise steps (TorchOps' contract, every method its own) in
    csrc/avx2_pointwise.cpp: fp32 CPU tensors, hidden sizes a multiple of 8, head sizes of 16."""

    name = "kernel"

    @staticmethod
    def add_norm(h: torch.Tensor, a: torch.Tensor | None, w: torch.Tensor, eps: float) -> torch.Tensor:
        """h += a (in place; h contiguous), then RMSNorm(h) * w, a new tensor."""
        d = h.shape[-1]
        a = None if a is None else a.contiguous()
        if not h.is_contiguous() or (a is not None and a.shape != h.shape) or w.shape != (d,):
            raise ValueError(f"add_norm: h {tuple(h.shape)} (contiguous: {h.is_contiguous()}), "
                             f"a {None if a is None else tuple(a.shape)}, w {tuple(w.shape)}")
        out = torch.empty_like(h)
        _library().pml_add_rms_norm(h.data_ptr(), None if a is None else a.data_ptr(), w.data_ptr(), eps,
                                    out.data_ptr(), h.numel() // d, d)
        return out

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """x [1, S, heads, D] with cos, sin_signed [1, S, 1, D] -> [1, S, heads, D], a new tensor.
        x is read in place where each head's D floats are contiguous and heads D apart (a slice of
        a fused q/k/v output is), else from a contiguous copy."""
        _, s, heads, d = x.shape
        if cos.shape != (1, s, 1, d) or sin_signed.shape != cos.shape:
            raise ValueError(f"rope: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin_signed.shape)}")
        if x.stride(3) != 1 or x.stride(2) != d:
            x = x.contiguous()
        cos, sin_signed = cos.contiguous(), sin_signed.contiguous()
        out = x.new_empty(1, s, heads, d)
        _library().pml_rope(x.data_ptr(), x.stride(1), heads, d, cos.data_ptr(), sin_signed.data_ptr(),
                            out.data_ptr(), s)
        return out

    @staticmethod
    def act_mul(act: nn.Module, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """silu(g) * u, into g (the gate's output, a temporary; a contiguous copy of it where it is
        not contiguous; `act` is SiLU: pointwise_problem)."""
        if g.shape != u.shape:
            raise ValueError(f"act_mul: g {tuple(g.shape)}, u {tuple(u.shape)}")
        g = g.contiguous()
        _library().pml_silu_mul(g.data_ptr(), u.contiguous().data_ptr(), g.numel())
        return g


_SILU = (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU))   # transformers' own class, where it has one


def is_silu(act: object) -> bool:
    return type(act) in _SILU


def pointwise_problem(decoder: PackedDecoder) -> str | None:
    """Why KernelOps cannot run this decoder here (None: it can): the choice, device, dtype,
    activation, sizes, the library, or its output at these sizes disagreeing with PyTorch's."""
    if CPU_POINTWISE != "kernel":
        return f"{ENV}={CPU_POINTWISE}"
    w = decoder.norm_w
    if w.device.type != "cpu":
        return f"device {w.device.type}"
    if w.dtype != torch.float32:
        return f"dtype {w.dtype} (the AVX2 pointwise kernels are fp32)"
    if not all(is_silu(layer.act) for layer in decoder.layers):
        return "an activation other than SiLU"
    d, head = w.shape[0], decoder.layers[0].head_dim
    if d % 8 or head % 16:
        return f"hidden size {d} (needs a multiple of 8) or head size {head} (a multiple of 16)"
    lib = _library()
    return lib if isinstance(lib, str) else _probe(d, head)


@functools.cache
def _probe(d: int, head: int) -> str | None:
    """KernelOps against TorchOps on random inputs of these sizes (7 rows), or None where they agree."""
    g = torch.Generator().manual_seed(0)
    h, a, w = torch.randn(1, 7, d, generator=g), torch.randn(1, 7, d, generator=g), torch.rand(d, generator=g) + 0.5
    x, cos, sin = (torch.randn(1, 7, n, head, generator=g) for n in (3, 1, 1))
    gate, up = torch.randn(1, 7, 4 * d + 3, generator=g), torch.randn(1, 7, 4 * d + 3, generator=g)
    act = nn.SiLU()
    pairs = [(KernelOps.add_norm(h.clone(), a, w, 1e-5), TorchOps.add_norm(h.clone(), a, w, 1e-5)),
             (KernelOps.rope(x, cos, sin), TorchOps.rope(x, cos, sin)),
             (KernelOps.act_mul(act, gate.clone(), up), TorchOps.act_mul(act, gate.clone(), up))]
    for name, (got, want) in zip(("RMSNorm", "rope", "silu * up"), pairs):
        if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
            return f"the AVX2 pointwise kernel's {name} differs from PyTorch by {(got - want).abs().max().item():.2g}"
    return None


__all__ = ["KernelOps", "pointwise_problem", "CPU_POINTWISE"]
