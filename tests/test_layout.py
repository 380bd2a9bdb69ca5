"""The package's layout is its architecture: imports point down (leaves <- engine <- backends <-
generator <- applications), so each layer can be read and changed without the ones above it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "personamix"

#: what each part may import from personamix (besides itself)
ALLOWED = {
    "errors": set(),
    "mbti": {"errors"},
    "loading": {"errors"},
    "testing": {"errors", "engine", "loading"},
    "attributes": {"errors"},
    "detokenize": set(),
    "adapters": {"errors", "loading", "mbti", "attributes"},
    "engine": {"errors", "mbti"},
    "backends": {"errors", "mbti", "loading", "engine"},
    "generator": {"errors", "mbti", "loading", "engine", "backends", "adapters", "detokenize"},
    "training": {"errors", "mbti", "loading", "adapters", "attributes"},
    "evaluation": {"errors", "mbti", "loading", "engine", "backends", "adapters", "generator", "training",
                   "attributes"},
    "serving": {"errors", "engine", "generator", "__init__", "adapters", "mbti", "attributes"},
    "cli": {"errors", "mbti", "loading", "engine", "adapters", "generator", "training", "evaluation", "serving",
            "attributes"},
}


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(path: Path, text: str | None = None) -> set[str]:
    """The top-level parts of personamix that the module at `path` (source `text`, default: the
    file's) imports, relative imports resolved."""
    package = list(path.relative_to(PACKAGE).parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                if not target:   # `from .. import x` at the top: x is a part, or a name of __init__
                    out |= {a.name if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file()
                            else "__init__" for a in node.names}
                    continue
            elif node.module and node.module.split(".")[0] == "personamix":
                target = node.module.split(".")[1:] or ["__init__"]
            else:
                continue
            out.add(target[0] if target else "__init__")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "personamix":
                    out.add((a.name.split(".")[1:] or ["__init__"])[0])
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_imports_point_down(path):
    part = part_of(path)
    assert part in ALLOWED, f"{part} is a new part of the package: give it a place in ALLOWED"
    bad = imported_parts(path) - ALLOWED[part] - {part}
    assert not bad, f"{path.relative_to(PACKAGE)} ({part}) imports {sorted(bad)}"


def test_the_checker_catches_a_wrong_import():
    """A module in engine/samplers/ that imports backends and the CLI is caught."""
    probe = PACKAGE / "engine" / "samplers" / "probe.py"
    text = "from ...backends import build_backend\nimport personamix.cli\nfrom ..targets import Target\n"
    assert imported_parts(probe, text) == {"backends", "cli", "engine"}
    assert imported_parts(PACKAGE / "generator.py", "from . import mbti\nfrom .engine import params\n") == \
        {"mbti", "engine"}


def test_the_library_does_not_import_tests_or_bench():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {n for n in names if n.split(".")[0] in ("tests", "bench", "conftest")}, path
