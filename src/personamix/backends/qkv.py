"""An attention layer's query, key and value projections as ONE matmul (gpt-fast's `wqkv`, vLLM's
`QKVParallelLinear`), LoRA deltas included.

A decoder's self-attention calls q_proj, k_proj and v_proj on the same hidden states. `fuse_qkv`
swaps the three for parts of one `SharedQKV`: their weights concatenated ([q; k; v] rows), and
for the multi-LoRA backend their stacked adapters joined, so for row b with adapter a

    [q k v]_b = [W_q; W_k; W_v] x_b + s_a ([A_q A_k A_v]_a x_b) blockdiag(B_q, B_k, B_v)_a

(multilora.py's formula with A [N, in, 3r] and a block-diagonal B [N, 3r, out_q + out_k + out_v]).
The first of the three calls computes all of them; the other two take their columns. On the
2-core CPU of docs/batching.md ("q/k/v as one matmul") the three projections of one layer with
their deltas: 64 -> 31 us for one row, 453 -> 281 us for 80 rows of a busy server's forward (one
weight read, one gather and two small batched matmuls instead of three of each); whole forwards
1.02-1.06x (bench/qkv_fusion.py).

Outputs equal the three layers' up to float rounding (another blocking of the same sums). A
part called with another input than the last one (a model whose projections do not share their
input) recomputes all three: correct, only slower. Inference only.
"""
from __future__ import annotations

import torch
from torch import nn

from .multilora import AdapterRows, MultiLoraLinear

NAMES = ("q_proj", "k_proj", "v_proj")


class SharedQKV(nn.Module):
    """The fused projection (`inner`: an nn.Linear, or a MultiLoraLinear over one) and the
    output of its last input, handed out part by part."""

    def __init__(self, inner: nn.Module, sizes: tuple[int, int, int]):
        super().__init__()
        self.inner = inner
        self.sizes = sizes
        self._x: torch.Tensor | None = None
        self._parts: list[torch.Tensor | None] = [None, None, None]

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if x is not self._x or self._parts[i] is None:   # (inference tensors have no version counter)
            self._x = x
            self._parts = list(self.inner(x).split(self.sizes, dim=-1))   # [..., out_i] column views
        out, self._parts[i] = self._parts[i], None
        if all(p is None for p in self._parts):   # all three handed out: hold no activations
            self._x = None
        return out


class QKVPart(nn.Module):
    """q_proj, k_proj or v_proj of a fused layer (`index` 0, 1, 2)."""

    def __init__(self, shared: SharedQKV, index: int):
        super().__init__()
        object.__setattr__(self, "shared", shared)   # not a submodule: the layer owns it (as qkv_proj)
        self.index = index
        self.out_features = shared.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index)


def _fused_lora(parts: list[nn.Module], linear: nn.Linear, sizes: tuple[int, int, int],
                rows: AdapterRows) -> MultiLoraLinear:
    """One MultiLoraLinear over the fused `linear` from the parts' deltas (zero where a part has none)."""
    like = next(p for p in parts if isinstance(p, MultiLoraLinear)).lora_a      # [N, in, r]
    n, rank = like.shape[0], like.shape[2]
    a = like.new_zeros(n, linear.in_features, 3 * rank)                     # [N, in, 3r]
    b = like.new_zeros(n, 3 * rank, linear.out_features)                    # [N, 3r, out], block-diagonal
    col = 0
    for j, (p, out) in enumerate(zip(parts, sizes)):
        if isinstance(p, MultiLoraLinear):
            a[:, :, j * rank:(j + 1) * rank] = p.lora_a
            b[:, j * rank:(j + 1) * rank, col:col + out] = p.lora_b
        col += out
    return MultiLoraLinear(linear, rows, a, b)


def fuse_qkv(model: nn.Module, rows: AdapterRows | None = None) -> int:
    """Replace q_proj / k_proj / v_proj of every attention module by parts of one SharedQKV (in
    place; the module gets it as `qkv_proj`); the number of layers fused. Layers whose three
    projections are not plain nn.Linear layers (or MultiLoraLinear over them, `rows` their row
    state) of one input size, dtype and device are left as they are."""
    fused = 0
    for module in list(model.modules()):
        parts = [getattr(module, name, None) for name in NAMES]
        if any(p is None for p in parts):
            continue
        bases = [p.base if isinstance(p, MultiLoraLinear) else p for p in parts]
        if not all(type(b) is nn.Linear for b in bases):
            continue
        w = [b.weight for b in bases]
        if len({(x.shape[1], x.dtype, x.device) for x in w}) != 1:
            continue
        adapted = [p for p in parts if isinstance(p, MultiLoraLinear)]
        if adapted and (rows is None or len({(p.lora_a.shape[0], p.lora_a.shape[2]) for p in adapted}) != 1):
            continue
        sizes = tuple(x.shape[0] for x in w)
        linear = nn.Linear(w[0].shape[1], sum(sizes), bias=any(b.bias is not None for b in bases),
                           device=w[0].device, dtype=w[0].dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.cat(w))
            if linear.bias is not None:
                linear.bias.copy_(torch.cat([b.bias if b.bias is not None else x.new_zeros(x.shape[0])
                                             for b, x in zip(bases, w)]))
        inner = _fused_lora(parts, linear, sizes, rows) if adapted else linear
        shared = SharedQKV(inner, sizes)
        module.qkv_proj = shared
        for i, name in enumerate(NAMES):
            setattr(module, name, QKVPart(shared, i))
        fused += 1
    return fused


__all__ = ["SharedQKV", "QKVPart", "fuse_qkv"]
