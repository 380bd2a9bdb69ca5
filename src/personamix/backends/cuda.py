"""What the local backends change on an NVIDIA GPU: attention without cuDNN.

PyTorch's scaled_dot_product_attention may pick its cuDNN kernel on CUDA. cuDNN builds an
execution graph for every new input shape and keeps it. Decoding changes the key length at
every step, and a server's packed forwards (batching.py) almost never repeat a shape, so each
forward pays a graph build and the process's memory grows with every one. Measured on one
NVIDIA H200 (torch 2.11+cu130, bf16, the default model's architecture, 200 server-like packed
forwards; `python bench/gpu_probe.py --config CONFIG rss [--cudnn]`, docs/bench/gpu.md):
with cuDNN, host memory grew 1808 -> 2091 MB (about 1.9 MB per forward) at 77.5 ms per
forward; without it, 1653 -> 1656 MB at 44.1 ms. SDPA then uses its flash or memory-efficient
kernels (the same math; outputs differ by float rounding only).

The switch is PyTorch's own, for the whole process: `torch.backends.cuda.enable_cudnn_sdp(True)`
after loading turns cuDNN attention back on.
"""
from __future__ import annotations

import torch


def no_cudnn_attention(device: torch.device) -> bool:
    """On a CUDA device, turn off cuDNN's scaled-dot-product attention for the process (see the
    module docstring). Returns whether it was on before."""
    if device.type != "cuda" or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


__all__ = ["no_cudnn_attention"]
