"""The developers' guide's structural rules that no linter checks: no function over 80 lines
outside ``benchmarks/`` (layers and cycles: import-linter, ``make lint``)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 80
PACKAGES = ("expportrait", "models", "preprocessing", "pipelines", "training", "tests")


def long_functions(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES, max_lines: int = MAX_LINES) -> list[str]:
    """``path:line name (N lines)`` of every function (or method) longer than ``max_lines``."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > max_lines:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_over_80_lines_outside_benchmarks():
    assert long_functions() == []


def test_the_check_finds_a_long_function(tmp_path):
    """The walk sees functions nested in classes (a method of 81 lines is reported)."""
    body = "\n".join(f"        x{i} = {i}" for i in range(80))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.py").write_text(f"class A:\n    def f(self):\n{body}\n")
    assert long_functions(tmp_path, ("models",)) == ["models/m.py:2 f (81 lines)"]
    assert long_functions(tmp_path, ("models",), max_lines=81) == []
