"""The AVX2 linear kernel (backends/avx2.py): nn.Linear's outputs for every shape a model gives it,
the same bits on any number of threads, and the kernel choice (packing.py)."""
import os
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from personamix import Generator, PersonamixError
from personamix.backends import packing
from personamix.backends.avx2 import Avx2Linear, avx2_problem
from personamix.backends.onednn import PackedLinear
from personamix.backends.packing import chosen_kernel, linear_kernel, pack_linears
from personamix.engine.session import Session
from personamix.testing import save_lora, save_tiny, tiny_model

PROBLEM = avx2_problem(nn.Linear(8, 8))
# CI builds the kernel (setup.py) on an x86-64 machine with AVX2: there a missing kernel fails
needs_kernel = pytest.mark.skipif(PROBLEM is not None and not os.environ.get("PERSONAMIX_REQUIRE_AVX2_KERNEL"),
                                  reason=f"AVX2 kernel not usable here: {PROBLEM}")
SEQ = [1, 3, 0, 4, 2, 2, 1, 0]


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 64])
@pytest.mark.parametrize("features", [(17, 1), (24, 56), (64, 16), (100, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_linear(rows, features, bias):
    """Every tile height (1-6 rows, and blocks of 6 plus a rest), panels cut short (out not a
    multiple of 16), odd in_features, with and without bias."""
    torch.manual_seed(rows)
    lin = nn.Linear(*features, bias=bias)
    x = torch.randn(rows, features[0])
    with torch.inference_mode():
        got, want = Avx2Linear(lin)(x), lin(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


@needs_kernel
def test_any_input_layout_and_no_rows():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    layer = Avx2Linear(lin)
    with torch.inference_mode():
        for x in (torch.randn(2, 3, 24), torch.randn(24, 9).t(), torch.randn(5, 48)[:, ::2], torch.randn(0, 24)):
            got, want = layer(x), lin(x)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="input of 25 features, torch.float32, on cpu; expected 24 features"):
            layer(torch.randn(2, 25))
        with pytest.raises(RuntimeError, match="torch.float64"):   # never a float64 buffer read as float32
            layer(torch.randn(2, 24, dtype=torch.float64))
    assert torch.equal(layer.unpacked_weight(), lin.weight.detach())   # the panels hold the weight, nothing lost


@needs_kernel
@pytest.mark.parametrize("rows", [5, 60], ids=["halves", "handed-out"])
def test_the_same_bits_on_one_thread_or_many(one_core_and_team, rows):
    """Each output column is summed by one thread in one order, whatever the team: a generation
    thread on one core (omp.use_one_thread) and inside a forward's team (omp.team) agree, with
    the panels split in equal halves (a decoding step's few rows) or handed out one at a time."""
    torch.manual_seed(0)
    layer = Avx2Linear(nn.Linear(576, 1536))       # large enough to be split among a team
    x = torch.randn(rows, 576)
    one, team = one_core_and_team(lambda: layer(x))
    assert torch.equal(one, team) and torch.allclose(team, F.linear(x, layer.unpacked_weight(), layer.bias), atol=1e-4)


@needs_kernel
def test_a_packed_model_keeps_its_logits():
    model, plain = tiny_model(vocab=5, hidden=32, layers=2), tiny_model(vocab=5, hidden=32, layers=2)
    assert pack_linears(model, "avx2") == 2 * 7 + 1
    assert linear_kernel(model) == "avx2" and linear_kernel(plain) is None
    ids = torch.tensor([SEQ])
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_backends_on_the_avx2_kernel_give_the_peft_logits(tmp_path, monkeypatch):
    base = save_tiny(tmp_path / "base", hidden=32)
    adapters = {n: save_lora(base, tmp_path / n, seed=i) for i, n in enumerate("AB")}
    peft = Session(Generator.from_pretrained(base, adapters=adapters, backend="lora", device="cpu").backend)
    want = peft.logits("all", SEQ, 3)
    monkeypatch.setenv(packing.ENV, "avx2")
    for kind in ("fast", "batched"):
        gen = Generator.from_pretrained(base, adapters=adapters, backend=kind, device="cpu")
        assert linear_kernel(gen.backend.model) == "avx2"
        assert torch.allclose(Session(gen.backend).logits("all", SEQ, 3), want, atol=1e-4), kind


def test_the_kernel_is_chosen_by_cpu_or_by_the_environment(monkeypatch):
    monkeypatch.delenv(packing.ENV, raising=False)
    assert chosen_kernel() == ("avx2" if torch.backends.cpu.get_cpu_capability() == "AVX2" else "onednn")
    monkeypatch.setenv(packing.ENV, "oneDNN")
    assert chosen_kernel() == "onednn"
    monkeypatch.setenv(packing.ENV, "mkl")
    with pytest.raises(PersonamixError, match="PERSONAMIX_CPU_KERNEL must be auto, onednn or avx2, got 'mkl'"):
        chosen_kernel()


def test_an_unusable_kernel_falls_back_to_the_other_and_says_why(monkeypatch):
    monkeypatch.setenv(packing.ENV, "avx2")
    monkeypatch.setitem(packing.KERNELS, "avx2", (Avx2Linear, lambda linear: "stands in for a missing library"))
    model = tiny_model(hidden=32)
    with pytest.warns(UserWarning, match="avx2 linear kernel is unavailable \\(stands in for a missing library\\)"):
        n = pack_linears(model)
    if packing.KERNELS["onednn"][1](nn.Linear(8, 8)) is None:
        assert n == 8 and isinstance(model.lm_head, PackedLinear)
    else:
        assert n == 0 and type(model.lm_head) is nn.Linear


def test_an_explicit_kernel_does_not_fall_back(monkeypatch):
    monkeypatch.setitem(packing.KERNELS, "avx2", (Avx2Linear, lambda linear: "stands in for a missing library"))
    model = tiny_model(hidden=32)
    with pytest.warns(UserWarning, match="avx2: stands in for a missing library"):
        assert pack_linears(model, "avx2") == 0
    assert type(model.lm_head) is nn.Linear


def test_bf16_is_not_for_the_avx2_kernel():
    assert "bfloat16" in avx2_problem(nn.Linear(8, 8).to(torch.bfloat16))
    model = tiny_model(hidden=32).to(torch.bfloat16)
    onednn_bf16 = packing.KERNELS["onednn"][1](model.lm_head) is None   # needs avx512bw or avx_ne_convert
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pack_linears(model)
    assert linear_kernel(model) == ("onednn" if onednn_bf16 else None)
    messages = [str(w.message) for w in caught]
    if onednn_bf16:     # no complaint about the AVX2 kernel when oneDNN takes the model
        assert messages == []
    else:               # both reasons named when neither can
        assert len(messages) == 1 and "avx2: dtype torch.bfloat16" in messages[0] and "onednn: " in messages[0]
