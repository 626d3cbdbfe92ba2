"""The package reads top to bottom: no function over 80 lines, and evaluation needs nothing
private from training (both share runs.py)."""
import ast
from pathlib import Path

import pytest

import feedback_alignment

PACKAGE = Path(feedback_alignment.__file__).parent


def test_no_function_in_the_package_is_over_80_lines():
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long


def test_evaluation_imports_nothing_from_training():
    imported = {node.module for node in ast.walk(ast.parse((PACKAGE / "evaluate.py").read_text()))
                if isinstance(node, ast.ImportFrom)}
    assert "train" not in imported and "feedback_alignment.train" not in imported


@pytest.mark.slow
def test_a_hanging_test_fails_instead_of_holding_the_suite(tmp_path):
    """pyproject's pytest settings give every test a time limit (pytest-timeout)."""
    import subprocess
    import sys

    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hang():\n    time.sleep(60)\n")
    repository = PACKAGE.parents[1]
    process = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                              "-c", str(repository / "pyproject.toml"), "--rootdir", str(tmp_path),
                              "-o", "timeout=2", str(tmp_path / "test_hang.py")],
                             capture_output=True, text=True, timeout=50)
    assert process.returncode == 1 and "Timeout" in process.stdout, process.stdout[-2000:]
    import tomllib
    settings = tomllib.loads((repository / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert settings["timeout"] > 0
