"""`SeparateModelsBackend` (backend="separate"): the reference and N preference models as
separate full models, the paper's setting. A group's forward runs each of its models once.

Generations in threads run their forwards concurrently, each thread with its own OpenMP team;
only the team of the thread that loaded the models is handed back (omp.py). Taking turns with
one team (what the PEFT and fast backends do, whose forwards share state) was measured slower
here: 4 threads of SCR on the default model, 11.5-12.1 tok/s taking turns, 13.5-14.6
concurrently; one thread 13.5-15.8 either way, 9.3-9.8 while the loading thread kept its team."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..engine.session import Group
from ..errors import PersonamixError
from ..loading import check_same_vocab
from . import omp
from .cache import PreallocatedCache
from .local import LocalBackend
from .packing import linear_kernel, pack_linears


class SeparateModelsBackend(LocalBackend):
    """`prefs[i]` is the full model of preference `names[i]`; a cache is one KV cache per model."""

    kind = "separate"

    def __init__(self, ref: PreTrainedModel, prefs: Sequence[PreTrainedModel], names: Sequence[str],
                 onednn: bool = True):
        if len(prefs) != len(names):
            raise ValueError("one name per preference model")
        super().__init__(ref, names)
        self.ref = ref.eval()
        self.prefs = {name: m.eval() for name, m in zip(names, prefs)}
        self.packed_linears = sum(pack_linears(m) for m in (ref, *prefs)) if onednn else 0
        self.linear_kernel = linear_kernel(ref)
        omp.release_team()      # the loading thread's team: idle, it would throttle every other (omp.py)

    def _models(self, group: Group, names: Sequence[str]) -> list[PreTrainedModel]:
        prefs = [self.prefs[n] for n in names]
        return {"ref": [self.ref], "prefs": prefs, "all": [self.ref, *prefs]}[group]

    def new_cache(self, group: Group, names: Sequence[str]) -> list[PreallocatedCache]:
        return [PreallocatedCache() for _ in self._models(group, names)]

    @torch.inference_mode()
    def forward(self, group: Group, tokens: torch.Tensor, cache: list[PreallocatedCache], n_logits: int,
                names: Sequence[str]) -> tuple[torch.Tensor, int]:
        models = self._models(group, names)
        if not models:
            raise PersonamixError("no preference models take part")
        ids = tokens.view(1, -1)
        logits = [m(input_ids=ids, use_cache=True, logits_to_keep=n_logits, **{self.cache_kw: c}).logits
                  for m, c in zip(models, cache)]
        return torch.cat(logits, dim=0), len(models)

    def crop(self, cache: list[PreallocatedCache], n_remove: int) -> None:
        for c in cache:
            super().crop(c, n_remove)


def load_full_model(name: str, path: str, ref: PreTrainedModel, tokenizer, dtype: torch.dtype | None = None
                    ) -> PreTrainedModel:
    """The full preference model at `path`, on the reference's device; it must share the reference's vocabulary."""
    check_same_vocab(tokenizer, path, f"preference model {name!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or ref.dtype)
    except OSError as e:
        raise PersonamixError(f"cannot load preference model {name!r} from {path!r}: {e}") from None
    v_ref = ref.config.get_text_config().vocab_size
    v = model.config.get_text_config().vocab_size
    if v != v_ref:
        raise PersonamixError(f"preference model {name!r} has a vocabulary of {v} tokens, the reference "
                              f"{v_ref}: they must share one tokenizer")
    return model.to(next(ref.parameters()).device).eval()
