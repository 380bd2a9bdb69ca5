"""The one compiled part of personamix: the AVX2 linear-layer kernel (backends/csrc/avx2_linear.cpp,
loaded with ctypes by backends/avx2.py), for x86-64 Linux with GCC or Clang. Optional: where it
cannot be built, the install goes on without it and CPU linear layers use oneDNN. Everything else
is in pyproject.toml."""
import platform
import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64"):
    extensions.append(Extension(
        "personamix.backends._avx2_linear", ["src/personamix/backends/csrc/avx2_linear.cpp"], language="c++",
        extra_compile_args=["-std=c++17", "-O3", "-mavx2", "-mfma", "-fopenmp"], extra_link_args=["-fopenmp"],
        optional=True))

setup(ext_modules=extensions)
