"""One OpenMP team at a time when many Python threads drive one model on CPU.

PyTorch's Linux wheels run their intra-op parallelism on GNU OpenMP (libgomp). libgomp gives
every thread that starts a parallel region a team of its own (worker threads kept for the next
region), and as soon as the process holds more such threads than it has cores, it cuts the
spin-wait at each region's start and end to almost nothing (its "throttled" spin count), so
every parallel op pays futex wake-ups. A second idle team is enough. Measured on the 2-core
AMD EPYC of docs/batching.md: a [21, 49152] log_softmax 231 -> 280 us and a one-row linear
layer 37 -> 84 us once another thread holds a team; a server request (which runs in a thread of
its own while the main thread, which loaded the model, keeps its team) generated at about half
the speed of the same request in the main thread (docs/loadtest.md).

The batched, fast and PEFT backends therefore keep at most one team alive (their `forward`s,
where generation threads take turns or share a forward): a generation thread other than the
main thread does its own tensor work (sampling, target math) on one core (`use_one_thread`);
the thread that runs a forward uses all the cores for it and hands its team back afterwards
(`team`); the thread that built the backend hands back the team it used to load the model
(`release_team`). The separate-models backend, whose threads run their forwards concurrently
(measured faster there, separate.py), only does the last. Elsewhere (no libgomp: macOS,
Windows, another OpenMP runtime) all three do nothing.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_OMP_PAUSE_SOFT = 1     # omp_pause_resource_t: release the calling thread's team (OpenMP 5.0)
_local = threading.local()


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (PyTorch's own copy), or None."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return None
    torch.get_num_threads()   # loads the OpenMP runtime if it is not yet
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line.rsplit("/", 1)[-1]}
    if len(paths) != 1:       # none, or two copies (which of them runs torch's regions is unknown)
        return None
    try:
        lib = ctypes.CDLL(paths.pop())
        lib.omp_set_num_threads.argtypes = [ctypes.c_int]
        lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
    except (OSError, AttributeError):   # unreadable, or a libgomp older than OpenMP 5.0's pause
        return None
    return lib


@functools.cache
def _mkl_local() -> Callable[[int], int] | None:
    """MKL's per-thread thread count setter (mkl_set_num_threads_local), where PyTorch links MKL, or
    None. MKL's own parallel ops (exp over a large tensor runs MKL's VML) follow MKL's count, not
    the thread's OpenMP count, and torch.set_num_threads sets MKL's count for every thread: once a
    user has called it, a thread put on one core here would still start a team at each such op."""
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not torch.backends.mkl.is_available() or not path.is_file():
        return None
    try:
        setter = ctypes.CDLL(str(path)).MKL_Set_Num_Threads_Local   # the C entry (int by value)
    except (OSError, AttributeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    return setter


def _threads(lib: ctypes.CDLL, n: int) -> None:
    """The calling thread's parallel ops (OpenMP's and MKL's) on n cores."""
    lib.omp_set_num_threads(n)
    mkl = _mkl_local()
    if mkl is not None:
        mkl(n)


def release_team() -> None:
    """Hand back the calling thread's team, if it has one (its next parallel op starts a new one)."""
    lib = _libgomp()
    if lib is not None:
        lib.omp_pause_resource_all(_OMP_PAUSE_SOFT)


def use_one_thread() -> None:
    """From now on the calling thread's parallel ops run on one core, and it holds no team.
    Done once per thread; never to the main thread, whose settings belong to the user."""
    if getattr(_local, "one_thread", False) or threading.current_thread() is threading.main_thread():
        return
    lib = _libgomp()
    if lib is not None:
        torch.get_num_threads()      # PyTorch sets a thread's OpenMP thread count on its first use: before us
        _threads(lib, 1)
        lib.omp_pause_resource_all(_OMP_PAUSE_SOFT)
    _local.one_thread = True


@contextmanager
def team(threads: int) -> Iterator[None]:
    """Inside the block the calling thread's parallel ops use `threads` cores; afterwards a thread
    put on one core by `use_one_thread` returns to it and hands the team back."""
    lib = _libgomp()
    if lib is None or not getattr(_local, "one_thread", False):
        yield
        return
    _threads(lib, threads)
    try:
        yield
    finally:
        _threads(lib, 1)
        lib.omp_pause_resource_all(_OMP_PAUSE_SOFT)
