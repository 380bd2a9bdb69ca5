"""Batched multi-adapter scoring, separate full models, and KV-cache rollback."""

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from personamix import Generator, PersonamixError
from personamix.engine.session import Session
from personamix.testing import save_lora, save_tiny

SEQ = [0, 3, 1, 4, 2, 2, 0]


@pytest.mark.parametrize("backend", ["batched", "fast", "lora"])
def test_batched_adapters_equal_separate_forwards(tiny_dir, backend):
    """One forward over N+1 rows (fast batched deltas, or PEFT adapter_names=) == each adapter on its own."""
    base, adapters = tiny_dir
    gen = Generator.from_pretrained(str(base), adapters=adapters, backend=backend, device="cpu")
    batched = Session(gen.backend).logits("all", SEQ, len(SEQ))                 # [4, T, V]
    ref = LlamaForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        rows = [ref(torch.tensor([SEQ])).logits[0]]
        for path in adapters.values():
            single = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), path).eval()
            rows.append(single(torch.tensor([SEQ])).logits[0])
    assert torch.allclose(batched, torch.stack(rows), atol=1e-5)


@pytest.mark.parametrize("backend", ["batched", "fast", "lora"])
def test_separate_models_backend_matches_lora_backend(tiny_dir, backend):
    base, adapters = tiny_dir
    lora = Generator.from_pretrained(str(base), adapters=adapters, backend=backend, device="cpu")
    separate = Generator.from_pretrained(str(base), adapters=adapters, backend="separate", device="cpu")
    a = Session(lora.backend).logits("all", SEQ, 3)
    s = Session(separate.backend)
    b = s.logits("all", SEQ, 3)
    assert torch.allclose(a, b, atol=1e-5)
    assert s.forward_passes == 4              # one forward per model in the paper's setting
    kw = dict(method="spec", weights={"E": 0.6, "T": 0.4}, max_new_tokens=12, seed=3, ignore_eos=True)
    assert lora.generate(SEQ, **kw).token_ids == separate.generate(SEQ, **kw).token_ids


def test_full_model_directories_as_preference_models(tiny_dir, tmp_path):
    base, adapters = tiny_dir
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapters["E"]).merge_and_unload()
    merged.save_pretrained(tmp_path / "E_full")
    gen = Generator.from_pretrained(str(base), adapters={"E": str(tmp_path / "E_full"), "N": adapters["N"]},
                                    device="cpu")
    assert type(gen.backend).__name__ == "SeparateModelsBackend"
    lora = Generator.from_pretrained(str(base), adapters={"E": adapters["E"], "N": adapters["N"]}, device="cpu")
    assert torch.allclose(Session(gen.backend).logits("all", SEQ), Session(lora.backend).logits("all", SEQ), atol=1e-5)


@pytest.mark.parametrize("group", ["ref", "prefs", "all"])
def test_rollback_gives_the_same_logits_as_recomputing(tiny_gen, group):
    session = Session(tiny_gen.backend)
    session.logits(group, SEQ[:4])
    session.logits(group, SEQ[:4] + [1, 1, 1], 3)                  # a draft that gets rejected
    rolled = session.logits(group, SEQ, 3)                          # rollback to 4, feed SEQ[4:]
    assert session.cached(group) == SEQ
    fresh = Session(tiny_gen.backend).logits(group, SEQ, 3)
    assert torch.allclose(rolled, fresh, atol=1e-5)
    before = session.forward_passes
    session.logits(group, SEQ + [3])                                # only one new token is fed
    assert session.forward_passes == before + 1 and session.cached(group) == SEQ + [3]


def test_truncate_validates(tiny_gen):
    session = Session(tiny_gen.backend)
    session.logits("ref", SEQ)
    with pytest.raises(ValueError):
        session.truncate("ref", len(SEQ) + 1)
    session.truncate("ref", 2)
    assert session.cached("ref") == SEQ[:2]


def test_full_model_with_another_vocabulary_is_refused(tiny_dir, tmp_path):
    base, _ = tiny_dir
    other = save_tiny(tmp_path / "other", vocab=7)
    with pytest.raises(PersonamixError, match="vocabulary"):
        Generator.from_pretrained(str(base), adapters={"E": str(other)}, device="cpu")


def test_adapter_trained_on_another_base_is_refused(tiny_dir, tmp_path):
    base, _ = tiny_dir
    other = save_tiny(tmp_path / "wide", vocab=5, hidden=32)
    foreign = save_lora(other, tmp_path / "foreign", seed=0)
    with pytest.raises(PersonamixError, match="does not fit the reference"):
        Generator.from_pretrained(str(base), adapters={"E": foreign}, device="cpu")


def test_missing_adapter_path_is_a_clear_error(tiny_dir, tmp_path):
    base, _ = tiny_dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(PersonamixError, match="neither a PEFT adapter"):
        Generator.from_pretrained(str(base), adapters={"E": str(tmp_path / "empty")}, device="cpu")
    with pytest.raises(PersonamixError):
        Generator.from_pretrained(str(base), adapters={"E": str(tmp_path / "does-not-exist")}, device="cpu")
    with pytest.raises(PersonamixError, match="adapter name"):
        Generator.from_pretrained(str(base), adapters={"bad name!": str(tmp_path)}, device="cpu")


def test_rolling_back_into_a_draft_reuses_its_logits(tiny_gen):
    """After a partially accepted draft, the logits after the accepted prefix were computed while
    drafting: asking for them again costs no forward and equals a fresh computation."""
    session = Session(tiny_gen.backend)
    for n in range(4, len(SEQ) + 1):               # draft SEQ[4:] token by token
        session.logits("ref", SEQ[:n])
    before = session.forward_passes
    again = session.logits("ref", SEQ[:6])          # accept 2 drafted tokens, roll back the rest
    assert session.forward_passes == before and session.cached("ref") == SEQ[:6]
    assert torch.allclose(again, Session(tiny_gen.backend).logits("ref", SEQ[:6]), atol=1e-5)
    session.logits("ref", SEQ[:6] + [4])            # a new token after the rollback is fed normally
    assert session.forward_passes == before + 1


def test_preallocated_layer_matches_dynamic_layer_through_growth_and_rollback():
    from transformers.cache_utils import DynamicLayer

    from personamix.backends.cache import PreallocatedLayer

    torch.manual_seed(0)
    fast, ref = PreallocatedLayer(capacity=4), DynamicLayer()
    for n, crop in [(3, 0), (2, -1), (6, 0), (1, -5), (9, -2), (1, 0)]:      # grows past 4, 8 and 16
        k, v = torch.randn(2, 3, n, 8), torch.randn(2, 3, n, 8)
        a, b = fast.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        fast.crop(crop)
        ref.crop(crop)
        assert fast.get_seq_length() == ref.get_seq_length()
    assert fast.capacity >= fast.get_seq_length() and fast.capacity <= 32


@pytest.fixture
def cudnn_attention_on():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cudnn_attention_is_turned_off_for_cuda_only(cudnn_attention_on, tiny_dir):
    """cuDNN attention builds a graph per input shape, which decoding never repeats (backends/cuda.py):
    a backend on a GPU turns it off for the process; one on the CPU leaves the process's settings alone."""
    from personamix.backends.cuda import no_cudnn_attention

    base, adapters = tiny_dir
    for backend in ("batched", "fast", "lora", "separate"):
        Generator.from_pretrained(str(base), adapters=adapters, backend=backend, device="cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled(), backend
    assert no_cudnn_attention(torch.device("cuda")) is True
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert no_cudnn_attention(torch.device("cuda")) is False     # already off: nothing to say
