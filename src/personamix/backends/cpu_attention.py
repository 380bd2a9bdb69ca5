"""Attention of many short calls over the KV pool in one kernel call, on x86 CPUs with AVX2.

The packed forward's short calls (decoding steps, drafts, SCR chunks: batching.py's _Batch)
attend over the pool's slots. PyTorch has no varlen attention on CPU, so its paths pad every row
to the longest one and copy or mask the slots between (two batched matmuls over a padded query
and an additive mask, `_Batch._grouped_attention`). csrc/avx2_attention.cpp reads each row's own
slot and own length in place: one call per layer, no padding, no gather, no mask (see there for
the math). Outputs equal PyTorch's fp32 attention up to float rounding.

`rows_of` builds a forward's index maps once; `attend` runs a layer. Used where
`attention_problem` says nothing (fp32 on CPU, head_dim a multiple of 8, the library built).
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .avx2 import bind

_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The attention kernel's library, or why it cannot be used."""
    return bind("_avx2_attention",
                pml_attention=[_P, _I, _I, _I, _I, _P, _P, _I, _I, _P, _P, _P, _I, ctypes.c_float, _P])


def attention_problem(dtype: torch.dtype, device: torch.device, head_dim: int) -> str | None:
    """Why the kernel cannot run attention of this kind here (None: it can)."""
    if device.type != "cpu":
        return f"device {device.type}"
    if dtype != torch.float32:
        return f"dtype {dtype} (the AVX2 attention kernel is fp32)"
    if head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8"
    lib = _library()
    return lib if isinstance(lib, str) else None


@dataclass
class AttentionRows:
    """Index maps of one forward's query rows (built once, used by every layer).

    slot [R]: the pool slot each row reads; limit [R]: how many of its keys it sees (its
    position + 1); seg [n_seg + 1]: segment s is rows seg[s] .. seg[s+1]-1, of one slot.
    top_slot, top_limit: their largest values (checked against the pool at each layer)."""

    slot: torch.Tensor
    limit: torch.Tensor
    seg: torch.Tensor
    top_slot: int
    top_limit: int

    @property
    def rows(self) -> int:
        return self.slot.shape[0]


def rows_of(segments: Iterable[tuple[int, int, int]]) -> AttentionRows:
    """AttentionRows for segments (slot, past, t) in row order: t rows of slot `slot`, at
    positions past .. past + t - 1 (each sees keys 0 .. its position)."""
    slot, limit, seg = [], [], [0]
    for s, past, t in segments:
        slot += [s] * t
        limit += range(past + 1, past + t + 1)
        seg.append(seg[-1] + t)
    as_tensor = functools.partial(torch.tensor, dtype=torch.int64)
    return AttentionRows(as_tensor(slot), as_tensor(limit), as_tensor(seg), max(slot, default=-1),
                         max(limit, default=0))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: AttentionRows, scale: float) -> torch.Tensor:
    """softmax(scale q K^T) V per row and head: q [H, R, D] (any strides with D contiguous), k / v
    the pool's [slots, KV, capacity, D] (contiguous) -> [R, H, D]."""
    h, r, d = q.shape
    if q.stride(2) != 1 or not (k.is_contiguous() and v.is_contiguous()) or r != rows.rows or h % k.shape[1]:
        raise ValueError(f"attend: q [H, R, D] {tuple(q.shape)} strides {q.stride()} ({r} rows), index maps of "
                         f"{rows.rows} rows, pool {tuple(k.shape)} (contiguous: {k.is_contiguous()}, "
                         f"{v.is_contiguous()}): D must be contiguous, the pool too, R match, H divide by KV")
    if rows.top_slot >= k.shape[0] or rows.top_limit > k.shape[2]:
        raise ValueError(f"attend: rows read slot {rows.top_slot} and {rows.top_limit} keys, the pool holds "
                         f"{k.shape[0]} slots of {k.shape[2]}")
    out = torch.empty(r, h, d)
    if r:
        _library().pml_attention(q.data_ptr(), q.stride(1), q.stride(0), h, d, k.data_ptr(), v.data_ptr(),
                                 k.shape[1], k.shape[2], rows.slot.data_ptr(), rows.limit.data_ptr(),
                                 rows.seg.data_ptr(), rows.seg.shape[0] - 1, scale, out.data_ptr())
    return out
