"""The README's promise: exactly two set-up commands, and CI runs the test one."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_make_targets_resolve(tmp_path):
    """On a clean checkout (a venv that does not exist yet) both commands first install torch 2.13.0,
    before anything that depends on it, then the package; dry runs, nothing is installed."""
    for command in readme_commands():
        done = subprocess.run(command.split() + ["-n", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "torch==2.13.0" in out and out.index("torch==2.13.0") < out.index("-e ")
