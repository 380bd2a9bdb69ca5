"""The compiled parts of personamix: the AVX2 and AVX-512 kernels for linear layers
(backends/csrc/avx2_linear.cpp and avx512_linear.cpp, loaded with ctypes by backends/avx2.py and
avx512.py), the AVX2 kernels for the batched backend's attention (avx2_attention.cpp,
backends/cpu_attention.py), for multi-LoRA deltas (avx2_lora.cpp, backends/cpu_lora.py) and for a
decoder layer's pointwise steps (avx2_pointwise.cpp, backends/cpu_pointwise.py), for x86-64 Linux
with GCC or Clang. Optional: where they cannot be built, the install goes on without them (CPU
linear layers then use oneDNN, attention and LoRA deltas PyTorch's matmuls, the pointwise steps
PyTorch's ops). Everything else is in pyproject.toml."""
import platform
import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64"):
    # -ffp-contract=off for the pointwise steps: a * b + c as written, no FMA the source does not ask
    # for, so rope rounds like PyTorch's ops (avx2_pointwise.cpp)
    contract = {"pointwise": ["-ffp-contract=off"]}
    extensions += [Extension(
        f"personamix.backends._avx2_{name}", [f"src/personamix/backends/csrc/avx2_{name}.cpp"], language="c++",
        depends=["src/personamix/backends/csrc/avx2_math.h", "src/personamix/backends/csrc/panel_linear.h"],
        extra_compile_args=["-std=c++17", "-O3", "-mavx2", "-mfma", "-fopenmp", *contract.get(name, [])],
        extra_link_args=["-fopenmp"], optional=True) for name in ("linear", "attention", "lora", "pointwise")]
    # the linear kernel for AVX-512 CPUs (backends/avx512.py loads it only where the CPU has AVX-512)
    extensions.append(Extension(
        "personamix.backends._avx512_linear", ["src/personamix/backends/csrc/avx512_linear.cpp"], language="c++",
        depends=["src/personamix/backends/csrc/panel_linear.h"],
        extra_compile_args=["-std=c++17", "-O3", "-mavx512f", "-mfma", "-fopenmp"], extra_link_args=["-fopenmp"],
        optional=True))

setup(ext_modules=extensions)
