"""SamplingParams is the one source of sampling settings: the CLI's flags and the server's request
fields are derived from it, with the same defaults and the same checks."""

import sys

import pytest

from personamix import PersonamixError, SamplingParams
from personamix.cli import build_parser
from personamix.cli.common import params_from
from personamix.engine.params import FIELDS, describe
from personamix.errors import SettingError, first_line, require
from personamix.serving.protocol import API_SETTINGS, ChatRequest


def test_every_setting_documents_itself():
    for name in FIELDS:
        d = describe(name)
        assert d["help"] and len(d["help"]) > 15, name
        assert d["type"] in ("int", "float", "str", "bool", "weights"), name


def test_cli_flags_are_the_fields_with_the_same_defaults():
    parser = build_parser()
    args = parser.parse_args(["generate", "hi"])
    params = params_from(args)
    assert params == SamplingParams(max_new_tokens=128)        # the CLI's one documented difference
    args = parser.parse_args(["generate", "hi", "--top-k", "5", "--weights", "E=0.5,N=-0.25", "--ignore-eos",
                              "--bound", "exact", "--warmup", "0", "--temperature", "0", "--method", "spec"])
    p = params_from(args)
    assert (p.top_k, p.weights, p.ignore_eos, p.bound, p.warmup, p.greedy) == (
        5, {"E": 0.5, "N": -0.25}, True, "exact", 0, True)
    help_text = parser._subparsers._group_actions[0].choices["generate"].format_help()
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in help_text, name


def test_server_fields_are_the_fields_with_the_same_defaults():
    req = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    assert set(API_SETTINGS) == set(FIELDS) - {"max_new_tokens"}
    assert req.params(default_max_tokens=128) == SamplingParams(max_new_tokens=128)
    schema = ChatRequest.model_json_schema()["properties"]
    for name in API_SETTINGS:
        assert schema[name].get("description") == describe(name)["help"], name
    with pytest.raises(SettingError) as e:
        ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "warmup": -1}).params(128)
    assert e.value.param == "warmup"


@pytest.mark.parametrize("kw,param", [({"k": 65}, "k"), ({"window": 0}, "window"), ({"gamma": float("inf")}, "gamma"),
                                      ({"top_p": 0.0}, "top_p"), ({"seed": 2**63}, "seed"), ({"max_retries": 0},
                                      "max_retries"), ({"persona": "ENTX"}, "persona"), ({"weights": {}}, "weights"),
                                      ({"weights": {"E": -1.0}}, "weights"), ({"ignore_eos": 1}, "ignore_eos"),
                                      ({"method": "scr", "temperature": 0}, "temperature")])
def test_bad_settings_name_the_setting(kw, param):
    with pytest.raises(SettingError) as e:
        SamplingParams(**kw)
    assert e.value.param == param and str(e.value)


def test_defaults_and_greedy_resolution():
    assert SamplingParams().method == "scr" and SamplingParams(temperature=0).method == "token"
    assert SamplingParams(temperature=0, method="spec").greedy
    assert SamplingParams(weights={"E": 1}).weights == {"E": 1.0}
    with pytest.raises(SettingError, match="unknown setting"):
        SamplingParams.from_kwargs(chunk=3)


def test_first_line_of_an_exception_without_a_message():
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(ValueError("\n")) == "ValueError"
    assert first_line(ValueError("bad thing\nmore detail")) == "bad thing"


def test_a_missing_optional_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # as if it were not installed
    with pytest.raises(PersonamixError, match=r"pip install 'personamix\[report\]'"):
        require("matplotlib", "report", "plots")
    from personamix.cli import main
    from personamix.evaluation.bench import BenchConfig

    with pytest.raises(PersonamixError, match="matplotlib"):
        BenchConfig().check()
    assert main(["bench", "--quick"]) == 2                      # a one-line error before any run, no traceback
