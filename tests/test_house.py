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
    assert long_functions(LIBRARY) == []


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
