"""Each benchmark's ``--help`` describes it in complete sentences."""

import glob
import os
import runpy
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
SCRIPTS = sorted(glob.glob(os.path.join(BENCHMARKS, "bench_*.py")))


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_help_shows_the_whole_description(path, monkeypatch, capsys):
    with open(path, encoding="utf-8") as f:
        doc = f.read().split('"""')[1]
    summary, *_ = doc.splitlines()
    assert summary.endswith("."), f"summary line cut: {summary!r}"

    monkeypatch.setattr(sys, "argv", [path, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts insert theirs
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(path, run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    # Every line of the docstring is shown, the last paragraph included.
    for line in doc.strip().splitlines():
        assert line.strip() in out
