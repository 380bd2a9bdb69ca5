"""Backends: the implementations of the engine's `Backend` contract (engine/session.py).

    batched   multilora + cross-request batching: concurrent generations share one forward (batching.py)
    fast      reference + N LoRA adapters in one forward, batched low-rank deltas (multilora.py)
    lora      the same through PEFT's adapter_names= (peft.py; the correctness reference)
    separate  every preference model a full model, the paper's setting (separate.py)

`build_backend` picks and builds one; the shared pieces are the KV caches (cache.py), the
transformers-model base class (local.py), q/k/v projections as one matmul (qkv.py, fast and
batched), on CPU prepacked linear layers (packing.py: oneDNN's, onednn.py, or on AVX2-only CPUs
personamix's own kernel, avx2.py), on an NVIDIA GPU attention without cuDNN (cuda.py);
the batched backend's own are OpenMP teams across threads (omp.py), prompt prefixes kept
across generations (prefix_cache.py) and, on CUDA, decoding steps replayed from CUDA graphs
(cuda_graphs.py).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from ..engine.session import Backend
from ..errors import PersonamixError
from ..loading import check_local, check_names, check_same_vocab, is_lora_adapter
from .batching import BatchingBackend, BatchingUnsupported
from .multilora import MultiLoraBackend, UnsupportedAdapter
from .peft import PeftBackend, attach_peft
from .separate import SeparateModelsBackend, load_full_model

KINDS: tuple[str, ...] = ("auto", "batched", "fast", "lora", "separate")


def build_backend(ref: PreTrainedModel, tokenizer, adapters: Mapping[str, str] | None,
                  kind: str = "auto", dtype: torch.dtype | None = None, onednn: bool = True) -> Backend:
    """A backend over the reference `ref` and the preference models `adapters` ({name: PEFT LoRA
    directory / hub id, or a full model}).

    kind="auto": batched when every entry is a LoRA adapter the fast path supports and the
    model's forward can be batched across calls (checked on the model at load time), else fast;
    lora (PEFT batches) for adapters the fast path does not support, separate for adapters PEFT
    cannot batch (DoRA) and for full models. A LoRA adapter on the separate backend is merged
    into its own copy of the reference.
    onednn: on CPU, the batched, fast and separate backends run every linear layer with
    prepacked weights (packing.py: oneDNN, or the AVX2 kernel on AVX2-only CPUs; False keeps
    PyTorch's default kernels). The lora
    backend keeps PEFT's layers as they are: it is the reference the fast path is tested against.
    """
    adapters = dict(adapters or {})
    check_names(adapters)
    if kind not in KINDS:
        raise PersonamixError(f"backend must be one of {', '.join(repr(k) for k in KINDS)}, got {kind!r}")
    for name, path in adapters.items():
        if not isinstance(path, (str, os.PathLike)):
            raise PersonamixError(f"adapter {name!r}: expected a directory or hub id, got {type(path).__name__}")
        check_local(os.fspath(path), f"adapter {name!r}")
    adapters = {name: os.fspath(path) for name, path in adapters.items()}
    lora = {name: is_lora_adapter(path) for name, path in adapters.items()}
    requested = kind
    if kind == "auto":
        kind = "batched" if all(lora.values()) else "separate"
    if kind in ("batched", "fast", "lora"):
        full = [n for n, is_lora in lora.items() if not is_lora]
        if full:
            raise PersonamixError(f"backend={kind!r} needs PEFT adapters, but {', '.join(full)} are full models; "
                                  "use backend='separate'")
    if kind in ("batched", "fast"):
        for name, path in adapters.items():
            check_same_vocab(tokenizer, path, f"adapter {name!r}")
        try:
            if kind == "batched":
                try:
                    # checks the model first: a refusal leaves it as it was
                    return BatchingBackend(ref, adapters, onednn)
                except BatchingUnsupported as e:
                    if requested == "batched":
                        raise
                    warnings.warn(f"{e}; concurrent generations take turns on the model instead "
                                  "(backend='fast')", stacklevel=2)
            return MultiLoraBackend(ref, adapters, onednn)
        except UnsupportedAdapter as e:
            if requested in ("batched", "fast"):
                raise
            kind = "lora" if e.peft_batchable else "separate"
            warnings.warn(f"{e}; falling back to PEFT (backend={kind!r}, slower)", stacklevel=2)
    if kind == "lora":
        model = ref
        for name, path in adapters.items():
            model = attach_peft(model, name, path, tokenizer)
        return PeftBackend(model.eval(), list(adapters))
    prefs = []
    for name, path in adapters.items():
        if lora[name]:
            prefs.append(attach_peft(copy.deepcopy(ref), name, path, tokenizer).merge_and_unload().eval())
        else:
            prefs.append(load_full_model(name, path, ref, tokenizer, dtype))
    return SeparateModelsBackend(ref, prefs, list(adapters), onednn)


__all__ = ["build_backend", "KINDS", "Backend", "BatchingBackend", "MultiLoraBackend", "PeftBackend",
           "SeparateModelsBackend", "BatchingUnsupported", "UnsupportedAdapter"]
