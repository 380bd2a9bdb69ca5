"""A real DPO run (TRL DPOTrainer + PEFT LoRA) on a tiny random model: the loss goes down, the
adapter saves with its training log and loads back into Generator; shipped sets by name."""
import json
import random

import pytest

from personamix import Generator, PersonamixError
from personamix.adapters import SHIPPED_SETS, shipped_adapters
from personamix.testing import save_chat_tiny
from personamix.training.train import LOG_FILE, TrainConfig, read_meta, train_adapter


def write_mbti_file(path, n: int = 48):
    """Records in the paper's format: E answers are loud, I answers are quiet."""
    rng = random.Random(0)
    e_ans, i_ans = ["loud party friends", "party friends loud"], ["quiet alone book", "alone book quiet"]
    records = []
    for j in range(n):
        pole = "EI"[j % 2]
        instr = " ".join(rng.choice(["what", "do", "you", "like", "today", "now"]) for _ in range(4)) + f" {j}"
        prompt = f"MBTI ... Now you are the '{pole}' (x) person ... Please answer the questions:{instr}"
        own, other = (rng.choice(e_ans), rng.choice(i_ans)) if pole == "E" else (rng.choice(i_ans), rng.choice(e_ans))
        records.append({"prompt": prompt,
                        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": own}],
                        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": other}]})
    path.write_text(json.dumps(records))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = save_chat_tiny(root / "base")
    data = write_mbti_file(root / "pairs.json")
    cfg = TrainConfig(attribute="E", output_dir=str(root / "E"), model=base, data=data, max_steps=20,
                      batch_size=4, grad_accum=1, learning_rate=5e-2, beta=0.5, rank=4, alpha=8,
                      target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], max_length=32, progress=False)
    return base, cfg, train_adapter(cfg)


def test_dpo_loss_goes_down_and_log_is_saved(trained):
    base, cfg, meta = trained
    log = json.loads(cfg.output_dir and open(f"{cfg.output_dir}/{LOG_FILE}").read())
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) >= 4
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert meta["held_out"]["reward_accuracy"] >= 0.9 and meta["held_out"]["reward_margin"] > 0
    assert meta["pairs_train"] + meta["pairs_held_out"] == meta["pairs_total"] == 48
    assert read_meta(cfg.output_dir)["attribute"] == "E"
    assert not (tmp := __import__("pathlib").Path(cfg.output_dir) / "checkpoints").exists(), tmp


def test_trained_adapter_loads_into_generator_and_shifts_towards_its_pole(trained):
    base, cfg, _ = trained
    gen = Generator.from_pretrained(base, adapters={"E": cfg.output_dir}, device="cpu")
    tok = gen.tokenizer
    prompt = gen.encode("what do you like today")
    loud, quiet = tok.convert_tokens_to_ids("loud"), tok.convert_tokens_to_ids("quiet")
    from personamix.engine.session import Session

    s = Session(gen.backend, ["E"])
    logits = s.logits("all", prompt, 1)[:, -1].log_softmax(-1)   # rows: ref, E
    assert (logits[1, loud] - logits[1, quiet]) > (logits[0, loud] - logits[0, quiet]) + 0.1
    out = gen.generate("what do you like", weights={"E": 1.0}, method="token", max_new_tokens=3, seed=0)
    assert out.stats.new_tokens >= 1


def test_resume_is_a_no_op_when_finished_and_settings_are_validated(trained, tmp_path):
    with pytest.raises(PersonamixError, match="rank"):
        train_adapter(TrainConfig(attribute="E", output_dir=str(tmp_path), rank=0))
    with pytest.raises(PersonamixError, match="max_pairs"):
        train_adapter(TrainConfig(attribute="E", output_dir=str(tmp_path), max_pairs=0))


def test_adapter_from_another_base_is_a_clear_error(trained, tmp_path):
    _, cfg, _ = trained
    other = save_chat_tiny(tmp_path / "other", hidden=32, seed=1)
    with pytest.raises(PersonamixError, match="does not fit the reference model"):
        Generator.from_pretrained(other, adapters={"E": cfg.output_dir}, device="cpu")


def test_missing_data_file_is_a_clear_error(tmp_path):
    base = save_chat_tiny(tmp_path / "base")
    with pytest.raises(PersonamixError, match="does not exist"):
        train_adapter(TrainConfig(attribute="E", output_dir=str(tmp_path / "o"), model=base,
                                  data=str(tmp_path / "missing.json")))


def test_shipped_sets_by_name():
    mbti = shipped_adapters("mbti")
    assert list(mbti) == list(SHIPPED_SETS["mbti"])
    both = shipped_adapters("mbti,roleplay")
    assert set(both) == set(SHIPPED_SETS["mbti"]) | set(SHIPPED_SETS["roleplay"])
    for path in both.values():
        meta = read_meta(path)
        assert meta is not None and meta["base_model"] == "smollm2-135m-instruct"
    with pytest.raises(PersonamixError, match="unknown adapter set"):
        shipped_adapters("big5")
    with pytest.raises(PersonamixError, match="trained for smollm2-135m-instruct"):
        shipped_adapters("mbti", "some/other-model")
