"""personamix's linear kernels, AVX2 (backends/avx2.py) and AVX-512 (avx512.py): nn.Linear's
outputs for every shape a model gives them, the same bits on any number of threads, and the
kernel choice (packing.py)."""
import os
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from personamix import Generator, PersonamixError
from personamix.backends import packing
from personamix.backends.avx2 import Avx2Linear, PanelLinear, avx2_problem
from personamix.backends.avx512 import Avx512Linear
from personamix.backends.onednn import PackedLinear
from personamix.backends.packing import chosen_kernel, linear_kernel, pack_linears
from personamix.engine.session import Session
from personamix.testing import save_lora, save_tiny, tiny_model


def usable(cls):
    """`cls` as a test parameter, skipped where its kernel cannot run. CI builds the kernels
    (setup.py) on an x86-64 machine with AVX2 (PERSONAMIX_REQUIRE_AVX2_KERNEL=1): there a kernel
    the CPU's instruction set allows but that does not run fails instead."""
    problem = cls.problem(nn.Linear(8, 8))
    allowed = cls.ISA == "AVX2" or torch.backends.cpu.get_cpu_capability().startswith(cls.ISA)
    required = os.environ.get("PERSONAMIX_REQUIRE_AVX2_KERNEL") and allowed
    skip = pytest.mark.skipif(problem is not None and not required,
                              reason=f"{cls.ISA} kernel not usable here: {problem}")
    return pytest.param(cls, id=cls.ISA.lower(), marks=skip)


KERNEL_CLASSES = [usable(Avx2Linear), usable(Avx512Linear)]
SEQ = [1, 3, 0, 4, 2, 2, 1, 0]


@pytest.mark.parametrize("kernel", KERNEL_CLASSES)
@pytest.mark.parametrize("rows", [*range(1, 14), 25, 64])
@pytest.mark.parametrize("features", [(17, 1), (24, 56), (64, 16), (100, 33), (40, 70)])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_linear(kernel, rows, features, bias):
    """Every tile height (1-6 rows for AVX2, 1-12 for AVX-512, and whole blocks plus a rest),
    panels cut short (out not a multiple of the panel: 1 to 31 columns left, or a panel's first
    half only), odd in_features, with and without bias."""
    torch.manual_seed(rows)
    lin = nn.Linear(*features, bias=bias)
    x = torch.randn(rows, features[0])
    with torch.inference_mode():
        got, want = kernel(lin)(x), lin(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("kernel", KERNEL_CLASSES)
def test_any_input_layout_and_no_rows(kernel):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    layer = kernel(lin)
    with torch.inference_mode():
        for x in (torch.randn(2, 3, 24), torch.randn(24, 9).t(), torch.randn(5, 48)[:, ::2], torch.randn(0, 24)):
            got, want = layer(x), lin(x)
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match=f"{kernel.__name__}: input of 25 features, torch.float32, on cpu; "
                                                "expected 24 features"):
            layer(torch.randn(2, 25))
        with pytest.raises(RuntimeError, match="torch.float64"):   # never a float64 buffer read as float32
            layer(torch.randn(2, 24, dtype=torch.float64))
    assert torch.equal(layer.unpacked_weight(), lin.weight.detach())   # the panels hold the weight, nothing lost


@pytest.mark.parametrize("kernel", KERNEL_CLASSES)
@pytest.mark.parametrize("rows", [5, 60], ids=["halves", "handed-out"])
def test_the_same_bits_on_one_thread_or_many(one_core_and_team, kernel, rows):
    """Each output column is summed by one thread in one order, whatever the team: a generation
    thread on one core (omp.use_one_thread) and inside a forward's team (omp.team) agree, with
    the panels split in equal halves (a decoding step's few rows) or handed out one at a time."""
    torch.manual_seed(0)
    layer = kernel(nn.Linear(576, 1536))           # large enough to be split among a team
    x = torch.randn(rows, 576)
    one, team = one_core_and_team(lambda: layer(x))
    assert torch.equal(one, team) and torch.allclose(team, F.linear(x, layer.unpacked_weight(), layer.bias), atol=1e-4)


@pytest.mark.parametrize("kernel", KERNEL_CLASSES)
def test_a_packed_model_keeps_its_logits(kernel):
    model, plain = tiny_model(vocab=5, hidden=32, layers=2), tiny_model(vocab=5, hidden=32, layers=2)
    name = kernel.ISA.lower()
    assert pack_linears(model, name) == 2 * 7 + 1
    assert linear_kernel(model) == name and linear_kernel(plain) is None
    assert all(type(m) is kernel for m in model.modules() if isinstance(m, PanelLinear))
    ids = torch.tensor([SEQ])
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNEL_CLASSES)
def test_backends_on_the_kernel_give_the_peft_logits(tmp_path, monkeypatch, kernel):
    base = save_tiny(tmp_path / "base", hidden=32)
    adapters = {n: save_lora(base, tmp_path / n, seed=i) for i, n in enumerate("AB")}
    peft = Session(Generator.from_pretrained(base, adapters=adapters, backend="lora", device="cpu").backend)
    want = peft.logits("all", SEQ, 3)
    monkeypatch.setenv(packing.ENV, kernel.ISA.lower())
    for kind in ("fast", "batched"):
        gen = Generator.from_pretrained(base, adapters=adapters, backend=kind, device="cpu")
        assert linear_kernel(gen.backend.model) == kernel.ISA.lower()
        assert torch.allclose(Session(gen.backend).logits("all", SEQ, 3), want, atol=1e-4), kind


def test_the_kernel_is_chosen_by_cpu_or_by_the_environment(monkeypatch):
    monkeypatch.delenv(packing.ENV, raising=False)
    capability = torch.backends.cpu.get_cpu_capability()
    assert chosen_kernel() == {"AVX2": "avx2", "AVX512": "avx512"}.get(capability, "onednn"), capability
    for cpu, kernel in (("AVX512", "avx512"), ("AVX512_VNNI", "avx512"), ("AVX2", "avx2"), ("DEFAULT", "onednn"),
                        ("NO AVX", "onednn"), ("ZVECTOR", "onednn")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda cpu=cpu: cpu)
        assert chosen_kernel() == kernel, cpu
    monkeypatch.setenv(packing.ENV, "oneDNN")
    assert chosen_kernel() == "onednn"
    monkeypatch.setenv(packing.ENV, "mkl")
    with pytest.raises(PersonamixError, match="PERSONAMIX_CPU_KERNEL must be auto, onednn, avx2, avx512, got 'mkl'"):
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
