"""The AVX2 kernels for a decoder layer's pointwise steps (backends/cpu_pointwise.py): the residual
add with RMSNorm and SiLU times up against their definitions in float64, rotary embeddings bit for
bit PyTorch's; every row the same alone, in company and on any number of threads; the packed
decoder with them computing the model's own forward; bad input refused; where they do not run."""
import os

import pytest
import torch
from test_decoder import packed_logits, varied_norms  # (this folder)
from torch import nn
from transformers import LlamaForCausalLM

from personamix.backends import cpu_pointwise
from personamix.backends.avx2 import env_choice
from personamix.backends.batching import SHORT, BatchingBackend
from personamix.backends.cpu_pointwise import KernelOps, pointwise_problem
from personamix.backends.decoder import TorchOps, packed_decoder
from personamix.errors import PersonamixError
from personamix.testing import save_lora, save_tiny, tiny_model

DECODER = packed_decoder(tiny_model(vocab=5, hidden=32, layers=1))
PROBLEM = pointwise_problem(DECODER)
# CI builds the kernels (setup.py) on an x86-64 machine with AVX2: there a missing kernel fails
needs_kernel = pytest.mark.skipif(PROBLEM is not None and not os.environ.get("PERSONAMIX_REQUIRE_AVX2_KERNEL"),
                                  reason=f"AVX2 pointwise kernels not usable here: {PROBLEM}")

ROWS = [1, 7, 60, 500]          # 500 x 576: past the size where a call uses the team


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def rms_reference(h, w, eps):
    h = h.double()
    return (w.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)).float()


@needs_kernel
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("add", [True, False], ids=["add", "no add"])
def test_add_norm_is_the_definition(rows, add):
    h, a, w = randn(1, rows, 576), randn(1, rows, 576, seed=1, scale=3.0), randn(576, seed=2).abs() + 0.1
    h_kernel = h.clone()
    got = KernelOps.add_norm(h_kernel, a if add else None, w, 1e-5)
    want_h = h + a if add else h
    assert torch.equal(h_kernel, want_h)           # the residual add: one float add, as PyTorch's
    torch.testing.assert_close(got, rms_reference(want_h, w, 1e-5), rtol=2e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("rows", ROWS)
def test_rope_is_pytorchs_bit_for_bit(rows):
    """On the query and key heads of a fused q/k/v output (a strided view), as decoder.py calls it."""
    qkv = randn(1, rows, 15, 64)                                         # 9 query, 3 key, 3 value heads
    cos, sin = randn(1, rows, 1, 64, seed=1), randn(1, rows, 1, 64, seed=2)
    got = KernelOps.rope(qkv[:, :, :12], cos, sin)
    assert got.is_contiguous() and torch.equal(got, TorchOps.rope(qkv[:, :, :12], cos, sin))
    q = randn(1, rows, 2, 16, seed=3)                                    # q/k apart, another head size
    c, s = randn(1, rows, 1, 16, seed=4), randn(1, rows, 1, 16, seed=5)
    assert torch.equal(KernelOps.rope(q, c, s), TorchOps.rope(q, c, s))


@needs_kernel
@pytest.mark.parametrize("n", [1, 13, 1536 * 5 + 3, 1536 * 60, 40000 + 5])   # tails of < 8; one thread and a team
def test_silu_mul_is_the_definition(n):
    g, u = randn(n, scale=8.0), randn(n, seed=1)
    g[:4] = torch.tensor([-120.0, 95.0, 0.0, -0.0])[: min(4, n)]         # past e^x's clamp, and zeros
    got = KernelOps.act_mul(nn.SiLU(), g.clone(), u)
    gd = g.double()
    want = (gd / (1 + torch.exp(-gd)) * u.double()).float()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30)


@needs_kernel
def test_rows_are_the_same_alone_in_company_and_on_any_number_of_threads():
    """A packed call's outputs must not depend on the calls beside it, nor on the team."""
    rows, d = 600, 576                                                   # big enough for a team
    h, a, w = randn(1, rows, d), randn(1, rows, d, seed=1), randn(d, seed=2)
    x, cos, sin = randn(1, rows, 15, 64, seed=3), randn(1, rows, 1, 64, seed=4), randn(1, rows, 1, 64, seed=5)
    g, u = randn(1, rows, 1536, seed=6), randn(1, rows, 1536, seed=7)

    def run():
        return (KernelOps.add_norm(h.clone(), a, w, 1e-5), KernelOps.rope(x[:, :, :12], cos, sin),
                KernelOps.act_mul(nn.SiLU(), g.clone(), u))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        team = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, q) for p, q in zip(one, team))
    r = 337
    alone = (KernelOps.add_norm(h[:, r:r + 1].clone(), a[:, r:r + 1], w, 1e-5),
             KernelOps.rope(x[:, r:r + 1, :12], cos[:, r:r + 1], sin[:, r:r + 1]),
             KernelOps.act_mul(nn.SiLU(), g[:, r:r + 1].clone(), u[:, r:r + 1]))
    assert all(torch.equal(p[:, r:r + 1], q) for p, q in zip(team, alone))


@needs_kernel
def test_bad_input_is_refused_by_name():
    h, w = randn(1, 4, 64), randn(64)
    with pytest.raises(ValueError, match="add_norm"):
        KernelOps.add_norm(h.transpose(1, 2).contiguous().transpose(1, 2), None, w, 1e-5)   # not contiguous
    with pytest.raises(ValueError, match="add_norm"):
        KernelOps.add_norm(h, randn(1, 3, 64), w, 1e-5)
    with pytest.raises(ValueError, match="rope"):
        KernelOps.rope(randn(1, 4, 3, 64), randn(1, 5, 1, 64), randn(1, 5, 1, 64))
    with pytest.raises(ValueError, match="act_mul"):
        KernelOps.act_mul(nn.SiLU(), randn(4, 8), randn(8, 4))


@needs_kernel
def test_other_layouts_are_read_from_a_copy():
    """A head layout the kernel does not read in place, a gate output that is not contiguous:
    the same results from a contiguous copy."""
    x, cos, sin = randn(1, 4, 64, 3).transpose(2, 3), randn(1, 4, 1, 64, seed=1), randn(1, 4, 1, 64, seed=2)
    assert torch.equal(KernelOps.rope(x, cos, sin), TorchOps.rope(x, cos, sin))
    g, u = randn(8, 40, seed=3).t(), randn(40, 8, seed=4)
    torch.testing.assert_close(KernelOps.act_mul(nn.SiLU(), g, u), TorchOps.act_mul(nn.SiLU(), g.clone(), u),
                               rtol=2e-6, atol=1e-30)


def test_where_the_kernels_do_not_run(monkeypatch):
    """fp32 CPU layers with SiLU, hidden sizes of 8 and head sizes of 16 only; the choice by name."""
    torch.manual_seed(0)
    bf16 = packed_decoder(tiny_model(vocab=5, hidden=32).to(torch.bfloat16))
    assert "dtype" in pointwise_problem(bf16)
    meta = packed_decoder(tiny_model(vocab=5, hidden=32).to("meta"))
    assert "device meta" in pointwise_problem(meta)
    small_heads = packed_decoder(tiny_model(vocab=5, hidden=16))                    # 2 heads of 8
    assert "head size 8" in pointwise_problem(small_heads)
    gelu = packed_decoder(tiny_model(vocab=5, hidden=32))
    gelu.layers[0].act = nn.GELU()
    assert "SiLU" in pointwise_problem(gelu)
    monkeypatch.setattr(cpu_pointwise, "CPU_POINTWISE", "torch")
    assert pointwise_problem(DECODER) == "PERSONAMIX_CPU_POINTWISE=torch"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("pointwise")
    base = save_tiny(root / "base", vocab=5, layers=2, hidden=32)        # 2 heads of 16
    return str(base), {name: save_lora(base, root / name, seed=i) for i, name in enumerate("ENT")}


@needs_kernel
def test_the_batched_backend_runs_its_decoder_on_the_kernels(adapters):
    """The backend picks the kernels where they run, and its packed forwards (reference and
    adapter calls, one-token, chunk and prompt-long, over cached prefixes) then give the model's own
    logits to float rounding; PyTorch's ops give them bit for bit (test_decoder)."""
    base, paths = adapters
    backend = BatchingBackend(varied_norms(LlamaForCausalLM.from_pretrained(base).eval()), paths)
    assert backend.decoder is not None and backend.decoder.ops is KernelOps
    plans = [([-1], 3, 1), ([-1, 0, 1, 2], 5, 4), ([2, 0], 2, SHORT + 3), ([1], 7, 2)]
    with torch.inference_mode():
        got, want = packed_logits(backend, backend.decoder, plans), packed_logits(backend, None, plans)
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-5) for g, w in zip(got, want))
    assert not all(torch.equal(g, w) for g, w in zip(got, want))       # (it is the kernels that ran)


def test_a_kernel_the_probe_rejects_leaves_pytorchs_ops(adapters, monkeypatch):
    """A pointwise step computing something else: the backend's load-time probe refuses it and the
    decoder runs PyTorch's ops (right logits, only slower)."""
    base, paths = adapters

    class Wrong(KernelOps):
        @staticmethod
        def act_mul(act, g, u):
            return torch.relu(g).mul_(u)

    from personamix.backends import batching
    monkeypatch.setattr(batching, "KernelOps", Wrong)
    monkeypatch.setattr(batching, "pointwise_problem", lambda decoder: None)
    backend = BatchingBackend(LlamaForCausalLM.from_pretrained(base).eval(), paths)
    assert backend.decoder is not None and backend.decoder.ops is TorchOps


def test_the_environment_choice_is_checked_by_name(monkeypatch):
    """PERSONAMIX_CPU_POINTWISE / PERSONAMIX_CPU_LORA: kernel (unset or empty) or torch, nothing else."""
    monkeypatch.setenv("PERSONAMIX_CPU_POINTWISE", " Torch ")
    assert env_choice("PERSONAMIX_CPU_POINTWISE", ("kernel", "torch")) == "torch"
    monkeypatch.setenv("PERSONAMIX_CPU_POINTWISE", "")
    assert env_choice("PERSONAMIX_CPU_POINTWISE", ("kernel", "torch")) == "kernel"
    monkeypatch.setenv("PERSONAMIX_CPU_POINTWISE", "fast")
    with pytest.raises(PersonamixError, match="PERSONAMIX_CPU_POINTWISE='fast': expected kernel or torch"):
        env_choice("PERSONAMIX_CPU_POINTWISE", ("kernel", "torch"))
