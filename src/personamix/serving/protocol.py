"""The HTTP protocol of `personamix serve`: OpenAI's request and response shapes, with the
personamix settings as extension fields.

The extension fields are SamplingParams' fields (engine/params.py), generated from it: their
defaults, help texts and checks are the library's. OpenAI's `max_tokens` /
`max_completion_tokens` stand for `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..engine.params import FIELDS, SamplingParams, describe

#: SamplingParams fields a request may set (max_new_tokens comes from max_tokens)
API_SETTINGS = tuple(name for name in FIELDS if name != "max_new_tokens")
_PY_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "weights": dict[str, float]}


def _extension_fields() -> dict[str, Any]:
    """Pydantic fields for the sampling settings: types and help from SamplingParams; the range
    checks stay in SamplingParams, so the library and the server cannot disagree."""
    out = {}
    for name in API_SETTINGS:
        d = describe(name)
        kind = _PY_TYPES[d["type"]]
        if d.get("optional"):
            kind = kind | None
        out[name] = (kind, Field(default=d["default"], description=d["help"]))
    return out


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class _OpenAIFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


Common = create_model("Common", __base__=_OpenAIFields, **_extension_fields())


class Request(Common):
    def params(self, default_max_tokens: int) -> SamplingParams:
        """The request's SamplingParams (SettingError names a bad setting)."""
        settings = {name: getattr(self, name) for name in API_SETTINGS}
        return SamplingParams(max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
                              **settings)


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Request):
    prompt: str


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ChatShape:
    """Response objects of /v1/chat/completions."""

    prefix = "chatcmpl"

    @staticmethod
    def full(rid, created, model, text, finish, n_prompt, n_new, extra) -> dict:
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": usage(n_prompt, n_new), "personamix": extra}

    @staticmethod
    def chunk(rid, created, model, text, finish, role: bool = False) -> dict:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


class CompletionShape:
    """Response objects of /v1/completions."""

    prefix = "cmpl"

    @staticmethod
    def full(rid, created, model, text, finish, n_prompt, n_new, extra) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "usage": usage(n_prompt, n_new), "personamix": extra}

    @staticmethod
    def chunk(rid, created, model, text, finish, role: bool = False) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def usage(n_prompt: int, n_new: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


def adapter_groups(names: Sequence[str]) -> list[dict]:
    """The served adapters grouped by the set they come from (shipped sets first, the rest as
    "your adapters"), each group with presets whose adapters are all served: {name, adapters,
    presets: {preset: {adapter: weight}}}."""
    from .. import attributes
    from ..adapters import SHIPPED_SETS
    from ..mbti import ALL_TYPES

    served, groups, seen = list(names), [], set()
    examples = {"mbti": {t: {p: 0.25 for p in t} for t in ALL_TYPES},
                "roleplay": {"personality+profile": {"personality": 0.5, "profile": 0.5}},
                "attributes": {p: {x: round(1 / len(p.split("+")), 4) for x in p.split("+")}
                               for p in attributes.PERSONAS}}
    titles = {"mbti": "MBTI poles", "roleplay": "role-play", "attributes": "attributes"}
    for key, members in SHIPPED_SETS.items():
        here = [n for n in members if n in served]
        if here:
            presets = {k: w for k, w in examples[key].items() if set(w) <= set(served)}
            groups.append({"name": titles[key], "adapters": here, "presets": presets})
            seen |= set(here)
    rest = [n for n in served if n not in seen]
    if rest:
        groups.append({"name": "your adapters", "adapters": rest, "presets": {}})
    return groups


def settings_schema(default_max_tokens: int) -> list[dict]:
    """Every setting a request may give, with its default, help and bounds (GET /v1/settings)."""
    out = [{**describe("max_new_tokens"), "name": "max_tokens", "default": default_max_tokens}]
    return out + [describe(name) for name in API_SETTINGS]


__all__ = ["Message", "ChatRequest", "CompletionRequest", "Request", "error_body", "ChatShape", "CompletionShape",
           "settings_schema", "adapter_groups", "API_SETTINGS"]
