"""The command line, in-process, on the tiny model."""

import pytest

from personamix.cli import main
from personamix.cli.common import parse_weights


def test_generate_streams_text_and_stats(tiny_dir, capsys):
    base, adapters = tiny_dir
    argv = ["generate", "a b", "--model", str(base), "--persona", "EN", "--method", "scr", "--max-new-tokens", "6",
            "--seed", "0", "--stats", "--device", "cpu"]
    for name in ("E", "N"):
        argv += ["--adapter", f"{name}={adapters[name]}"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "tok/s" in out.err and "forward passes/token" in out.err and "acceptance" in out.err


@pytest.mark.parametrize("extra,msg", [
    (["--persona", "entj"], "uppercase"),
    (["--weights", "E=lots"], "--weights expects"),
    (["--adapter", "E"], "--adapter expects"),
    (["--method", "nope"], "unknown method"),
])
def test_errors_are_one_clear_line(tiny_dir, capsys, extra, msg):
    base, adapters = tiny_dir
    argv = ["generate", "a", "--model", str(base), "--adapter", f"E={adapters['E']}", "--device", "cpu", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


@pytest.mark.parametrize("flag,value", [("--max-pending", "0"), ("--prefix-cache-mb", "-1"),
                                        ("--prefix-cache-mb", "nan"), ("--gather-wait", "-1"),
                                        ("--gather-wait", "inf"), ("--kv-keep-idle", "-1"),
                                        ("--kv-keep-idle", "nan")])
def test_serve_refuses_impossible_settings_before_loading_anything(capsys, flag, value):
    assert main(["serve", "--model", "/nonexistent/model", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and "nonexistent" not in err


def test_weights_parser():
    assert parse_weights("E=0.7, N=-0.3") == {"E": 0.7, "N": -0.3}
    assert parse_weights(None) is None


def test_json_output_is_reproducible(tiny_dir, capsys):
    import json

    base, adapters = tiny_dir
    argv = ["generate", "a b", "--model", str(base), "--adapter", f"E={adapters['E']}", "--persona", "E",
            "--method", "spec", "--max-new-tokens", "5", "--seed", "4", "--json", "--device", "cpu"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["token_ids"] == second["token_ids"] and len(first["token_ids"]) <= 5
    assert first["stats"]["method"] == "spec" and first["seed"] == 4
    assert main(argv + ["--no-onednn"]) == 0    # PyTorch's kernels: the same tokens up to float rounding
    assert json.loads(capsys.readouterr().out)["token_ids"] == first["token_ids"]


def test_missing_local_paths_are_named(tmp_path, capsys):
    assert main(["generate", "a", "--model", str(tmp_path / "nope"), "--method", "base"]) == 2
    assert "no such directory" in capsys.readouterr().err
