"""Linear layers with oneDNN-prepacked weights, for decoding on CPU.

On CPU an nn.Linear runs PyTorch's default GEMM on the plain [out, in] weight. For the
few-row matmuls of decoding that is far from what the hardware allows: on the 2-core x86
machine of docs/step_profile.md a whole SmolLM2-135M decoding step takes 55 ms for one row
and 84 ms for five; with the same weights reordered once into oneDNN's blocked layout, 36 ms
for either. That matters doubly here: MPG scores N+1 rows per step.

`PackedLinear` holds only the reordered weight (the plain weight is freed unless something else
holds it, e.g. the embedding tied to lm_head); `packing_problem` checks on one layer that the op
exists in this PyTorch build and agrees with F.linear; packing.py swaps a model's layers (onto
this kernel or, on AVX2-only CPUs, avx2.py's). Outputs equal nn.Linear's up to float rounding (a
different summation order). Inference only: the op has no backward.
"""
from __future__ import annotations

import os

# oneDNN caches one primitive per (layer shape, number of rows). Cross-request batching feeds
# sequences of ever-changing length, and the default capacity (1024) let that cache grow the
# server's RSS by ~250 MB over 96 batched generations; 128 covers the shapes of any single
# generation. Read once, when oneDNN first runs: set it before to choose another value.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import first_line

# oneDNN picks a blocked layout for an expected number of rows; 8-32 measured alike for 1-128
# rows (decode steps of 1-9 rows, packed multi-call batches of ~40, prompts).
_ROWS_HINT = 16


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (torch.ops.mkldnn, the op
    torch.compile's CPU backend uses for frozen linear layers)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packing_problem(linear: nn.Linear) -> str | None:
    """Why `linear` cannot be packed here (None: it can): device, dtype, or the op missing or
    disagreeing with F.linear in this PyTorch build."""
    w = linear.weight
    if w.device.type != "cpu":
        return f"weights on {w.device.type}"
    if w.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {w.dtype}"
    if not torch.backends.mkldnn.is_available():
        return "PyTorch built without oneDNN"
    try:
        with torch.inference_mode():
            x = torch.randn(3, linear.in_features, dtype=w.dtype, generator=torch.Generator().manual_seed(0))
            got, want = PackedLinear(linear)(x).float(), F.linear(x, w, linear.bias).float()
    except Exception as e:   # a missing or failing op means: do not pack
        return f"{type(e).__name__}: {first_line(e)}"
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    if not torch.allclose(got, want, atol=tol * want.abs().max().item(), rtol=tol):
        return f"oneDNN linear differs from F.linear by {(got - want).abs().max().item():.2g}"
    return None
