"""The examples run (small data) so that they cannot rot."""

import importlib.util
import os
import sys
import tempfile

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")

pytestmark = pytest.mark.slow


def _run(name, argv):
    sys.path.insert(0, EXAMPLES)
    try:
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(EXAMPLES, f"{name}.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main(argv)
    finally:
        sys.path.remove(EXAMPLES)


# Small data and small codebooks (16 sub-vectors of 4 bits) keep them quick.
SMALL = ["--n-train", "3000"]
PQ = ["--n-subquantizers", "16", "--nbits", "4"]


def test_quick_start(capsys):
    _run("plot_quick_start", [*SMALL, *PQ, "--n-test", "100", "--nlist", "16"])
    out = capsys.readouterr().out
    assert out.count("recall@10") == 4
    assert "recall@10 1.0000" in out  # FlatNeighbors is exact


def test_grid_search_example(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    # By default the plot goes to the temporary directory, never into the
    # current one (the repository root, when run from there).
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(cwd)
    _run(
        "plot_grid_search_nprobe",
        [*SMALL, *PQ, "--test-size", "300", "--target-recall", "0.3"],
    )
    assert (tmp / "annlearn_grid_search_nprobe.png").stat().st_size > 1000
    assert not list(cwd.iterdir())
    assert "fastest with recall >= 0.3" in capsys.readouterr().out


def test_ivfpq_classifier_example():
    results = _run(
        "plot_ivfpq_knn_classifier",
        [*SMALL, *PQ, "--n-test", "300", "--nlist", "16", "--nprobe", "4"],
    )
    (acc_approx, _), (acc_exact, _) = results.values()
    assert acc_approx > acc_exact - 0.05


def test_flat_classifier_example(capsys):
    _run("plot_flat_knn_classifier", [*SMALL, "--n-test", "200"])
    assert "identical predictions: 1.0000" in capsys.readouterr().out


def test_save_mmap_example(capsys):
    _run("plot_save_mmap_add_remove", [*SMALL, *PQ, "--n-test", "50", "--nlist", "16"])
    assert "file unchanged: True" in capsys.readouterr().out
