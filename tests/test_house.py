"""The house rules that keep the code base navigable, as tests: small functions, one name per module,
a self-contained repository, and packages by role (issue 23)."""

from __future__ import annotations

import ast
import re
import subprocess
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted([*ROOT.glob("harness/**/*.py"), *ROOT.glob("methods/**/*.py")])
TESTS = sorted(ROOT.glob("tests/**/*.py"))
MAX_FUNCTION_LINES = 50  # from `def` (decorators excluded) to the last line, docstring included


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES, root: Path = ROOT) -> list[str]:
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_over_50_lines():
    """In the library and in the tests: a test helper is read as often as the code it checks."""
    assert long_functions(LIBRARY + TESTS) == []


def test_the_length_rule_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n")
    (tmp_path / "short.py").write_text("def g():\n    return 1\n")
    found = long_functions([tmp_path / "long.py", tmp_path / "short.py"], root=tmp_path)
    assert len(found) == 1 and " f (51 lines)" in found[0]


def test_no_two_modules_share_a_file_name():
    names = Counter(p.name for p in LIBRARY if p.name not in ("__init__.py", "__main__.py"))
    assert [name for name, n in names.items() if n > 1] == []


def test_the_repository_refers_to_no_file_outside_it():
    """docs/paper.md and docs/recipes.md hold what the docs cite; a user's clone has nothing beside it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"\.\./shared|/work/shared|\bshared/(seed|reference)|\bMETHODS\.md|\bPAPER\.md")
    found = [
        f"{name}:{i}"
        for name in tracked
        if name.endswith((".py", ".md", ".html", ".toml", ".sh")) and name != "tests/test_house.py"
        for i, line in enumerate((ROOT / name).read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert found == []


def test_harness_is_grouped_by_role():
    """harness/ holds packages by role plus the package's entry points; no loose module piles up again."""
    top = sorted(p.name for p in (ROOT / "harness").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "api.py", "cli.py"]
    packages = sorted(p.name for p in (ROOT / "harness").iterdir() if (p / "__init__.py").exists())
    assert packages == ["benchmarks", "commands", "core", "evaluation", "reporting", "scale", "storage", "training"]


# --------------------------------------------------------------------------- tests use public seams

OURS = ("harness", "methods")


def _bound_to_ours(tree: ast.Module) -> set[str]:
    """The names a file binds to harness or methods objects (`from harness.x import Run`, `import harness.x`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OURS:
            names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in OURS}
    return names


def _private_attribute(node: ast.AST, ours: set[str]) -> bool:
    """`<patch>.setattr(<ours>, "_name", ...)`: a private attribute of a harness or methods class or module
    (reached from a name bound to one of our modules) replaced by a test."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"):
        return False
    if len(node.args) < 2 or not isinstance(node.args[1], ast.Constant) or not isinstance(node.args[1].value, str):
        return False
    return _root_name(node.args[0]) in ours and _private(node.args[1].value)


def private_patches(paths: list[Path], root: Path = ROOT) -> list[str]:
    return _scan(paths, root, _private_attribute)


def _scan(paths: list[Path], root: Path, offends) -> list[str]:
    """`path:line code` of every node for which `offends(node, names bound to our modules)` holds."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text())
        ours = _bound_to_ours(tree)
        found += [f"{path.relative_to(root)}:{n.lineno} {ast.unparse(n)}" for n in ast.walk(tree) if offends(n, ours)]
    return found


def test_tests_patch_no_private_attribute_of_harness():
    """A test that replaces `Run._train_pass` breaks when the method is renamed or split, and tests a
    copy of the runner rather than the runner; tests use public seams (RunOptions.around_pass) instead.
    The same holds for a module's private function."""
    assert private_patches(TESTS) == []


def test_the_seam_rule_sees_a_private_patch(tmp_path):
    (tmp_path / "test_a.py").write_text(
        "from harness.training.runner import Run\n"
        "import harness.training.runner as runner\n"
        "from harness.reporting import figures\n"
        "from methods.mma import MMA\n"
        "import torch\n"
        "def test_a(monkeypatch):\n"
        "    monkeypatch.setattr(Run, '_train_pass', None)\n"
        "    with monkeypatch.context() as patch:\n"
        "        patch.setattr(runner.Run, '_decide', None)\n"
        "    monkeypatch.setattr(MMA, 'start_epoch', None)\n"  # public: allowed
        "    monkeypatch.setattr(Run, '__repr__', None)\n"  # a protocol method: allowed
        "    monkeypatch.setattr(figures, '_spread', None)\n"  # a module's private function
        "    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', None)\n"  # not ours
        "    monkeypatch.setattr(torch.Tensor, '_make_subclass', None)\n"  # not our class
    )
    found = private_patches([tmp_path / "test_a.py"], root=tmp_path)
    assert sorted(line.split(" ", 1)[0] for line in found) == ["test_a.py:12", "test_a.py:7", "test_a.py:9"]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(paths: list[Path], root: Path = ROOT) -> list[str]:
    """Private harness names a test imports (`from harness.x import _f`) or reads (`module._f`, `Run._g`)."""
    return _scan(paths, root, _private_use)


def _private_use(node: ast.AST, ours: set[str]) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] in OURS and any(_private(a.name) for a in node.names)
    return isinstance(node, ast.Attribute) and _private(node.attr) and _root_name(node) in ours


def _root_name(node: ast.AST) -> str | None:
    """The name an attribute chain starts from (`runner.Run._decide` -> "runner")."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_tests_reach_no_private_harness_name():
    """Tests call what users call; a private helper that deserves a test deserves a public name."""
    assert private_uses(TESTS) == []


def test_the_private_use_rule_sees_imports_and_reads(tmp_path):
    (tmp_path / "test_b.py").write_text(
        "from harness.evaluation.masking import Standing, _verdict\n"
        "import harness.training.runner as runner\n"
        "import torch\n"
        "def test_b(record):\n"
        "    runner.Run._decide(None)\n"
        "    runner.make_spec('pgd-at', 'synthetic')\n"  # public: allowed
        "    torch._C\n"  # not ours
        "    record._fields\n"  # not bound to our modules
    )
    found = private_uses([tmp_path / "test_b.py"], root=tmp_path)
    assert sorted(line.split(" ", 1)[0] for line in found) == ["test_b.py:1", "test_b.py:5"]
