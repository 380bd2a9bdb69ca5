"""`PeftBackend` (backend="lora"): reference + N LoRA adapters through PEFT itself, every group as
ONE batched forward with PEFT's `adapter_names=` (the reference row is PEFT's "__base__").

Slower than the multi-LoRA backend, and kept as the correctness reference it is tested
against; also the fallback for adapters the fast path does not support (rank patterns, ...).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from ..engine.session import Group
from ..errors import PersonamixError, first_line
from ..loading import check_same_vocab
from . import omp
from .cache import PreallocatedCache
from .local import LocalBackend

BASE_ROW = "__base__"   # PEFT's name for "no adapter" in a mixed-adapter batch


class PeftBackend(LocalBackend):
    """`model` is a PeftModel holding the adapters `names` (or a plain model when there are none)."""

    kind = "lora"

    def __init__(self, model: PreTrainedModel, names: Sequence[str]):
        super().__init__(model, names)
        self.model = model.eval()
        # PEFT passes adapter_names= through hooks registered on the shared modules for the
        # duration of a call, so two concurrent calls would see each other's rows: serialise.
        self._lock = threading.Lock()
        self.threads = torch.get_num_threads()   # cores for a forward, whichever thread runs it (omp.py)
        omp.release_team()                       # the team that loaded the model: one team at a time

    @torch.inference_mode()
    def forward(self, group: Group, tokens: torch.Tensor, cache: PreallocatedCache, n_logits: int,
                names: Sequence[str]) -> tuple[torch.Tensor, int]:
        if group == "ref" and not self.names:      # a plain model: no adapter machinery at all
            rows = None
        else:
            rows = {"ref": [BASE_ROW], "prefs": list(names), "all": [BASE_ROW, *names]}[group]
            if not rows:
                raise PersonamixError("no preference models take part")
        kwargs = {self.cache_kw: cache} if rows is None else {self.cache_kw: cache, "adapter_names": rows}
        ids = tokens.view(1, -1).expand(1 if rows is None else len(rows), -1)
        omp.use_one_thread()             # generations in threads take turns: one OpenMP team at a time
        with self._lock, omp.team(self.threads):
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=n_logits, **kwargs)
        return out.logits, 1


def attach_peft(model: PreTrainedModel, name: str, path: str, tokenizer) -> PreTrainedModel:
    """`model` with the PEFT adapter at `path` added under `name` (a PeftModel from then on)."""
    from peft import PeftModel

    check_same_vocab(tokenizer, path, f"adapter {name!r}")
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, path, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as e:
        raise PersonamixError(
            f"adapter {name!r} at {path!r} does not fit the reference model (trained on another base?): "
            f"{first_line(e, 300)}") from None
    except OSError as e:
        raise PersonamixError(f"cannot load adapter {name!r} from {path!r}: {e}") from None
