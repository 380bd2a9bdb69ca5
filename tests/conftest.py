"""Fixtures over tiny random models (personamix.testing builds them: a real LlamaForCausalLM,
a real word-level tokenizer, real PEFT LoRA adapters)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from personamix.backends import omp
from personamix.testing import save_lora, save_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny reference (vocabulary of 5) with three LoRA adapters E, N, T."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny(root / "base", vocab=5)
    adapters = {name: save_lora(base, root / name, seed=i) for i, name in enumerate("ENT")}
    return base, adapters


@pytest.fixture(scope="session")
def tiny_gen(tiny_dir):
    from personamix import Generator

    base, adapters = tiny_dir
    return Generator.from_pretrained(str(base), adapters=adapters, device="cpu")


@pytest.fixture(scope="session")
def tiny3_gen(tmp_path_factory):
    """A vocabulary of 3 (27 sequences of length 3) with adapters E, N, T."""
    from personamix import Generator

    root = tmp_path_factory.mktemp("tiny3")
    base = save_tiny(root / "base", vocab=3, seed=3)
    adapters = {name: save_lora(base, root / name, seed=10 + i, scale=0.7) for i, name in enumerate("ENT")}
    return Generator.from_pretrained(str(base), adapters=adapters, device="cpu")


def _on_one_core_and_in_a_team(f: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """f() in a fresh thread put on one core (omp.use_one_thread, as a generation thread is), then
    in that thread inside a team of 2 (omp.team, as a forward runs): a kernel that splits its
    work among threads should give the same bits both ways."""
    out = {}

    def worker():
        omp.use_one_thread()
        with torch.inference_mode():
            out["one"] = f()
            with omp.team(2):
                out["team"] = f()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    return out["one"], out["team"]


@pytest.fixture
def one_core_and_team():
    """_on_one_core_and_in_a_team, for the kernels' tests (test_cpu_linear, test_cpu_attention)."""
    return _on_one_core_and_in_a_team
