"""``python -m annlearn`` (the README's demo) runs, wherever it is started from."""

import importlib.machinery
import os
import re
import shutil
import subprocess
import sys

import pytest

import annlearn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fewer queries than the defaults, with more queries searched than checked
# against scikit-learn (only the checked rows are scored).
SMALL = ["--n-samples", "3000", "--n-queries", "300", "--recall-queries", "50"]


def _demo(cwd, *args):
    return subprocess.run(
        [sys.executable, "-m", "annlearn", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _recall(stdout):
    match = re.search(r"recall@10 : ([0-9.]+) \(vs scikit-learn brute, 50 ", stdout)
    assert match, stdout
    return float(match.group(1))


def test_demo_from_another_directory(tmp_path):
    result = _demo(tmp_path, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FlatNeighbors (exact)" in result.stdout
    assert _recall(result.stdout) == pytest.approx(1.0)


def test_demo_from_the_repository_root():
    # From the root, Python imports the checkout's annlearn/ folder: this works
    # when the compiled modules were built into it (pip install -e .).
    if os.path.dirname(annlearn.__file__) != os.path.join(REPO, "annlearn"):
        pytest.skip("annlearn is not installed editable from this checkout")
    result = _demo(REPO, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _recall(result.stdout) == pytest.approx(1.0)


def test_source_folder_without_compiled_modules(tmp_path):
    # A checkout after a non-editable install: the installed package is not
    # the one Python finds first from the checkout's root.
    compiled = [f"*{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    shutil.copytree(
        os.path.dirname(annlearn.__file__),
        tmp_path / "annlearn",
        ignore=shutil.ignore_patterns("__pycache__", "*.c", *compiled),
    )
    result = _demo(tmp_path)
    assert result.returncode != 0
    assert "_flat_search.pyx" in result.stderr
    assert "Run from another directory" in result.stderr
    assert "pip install -e ." in result.stderr
