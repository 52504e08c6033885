"""The documentation builds with warnings as errors, so that it cannot rot."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

DOC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "doc")


@pytest.mark.slow
def test_sphinx_build(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    pytest.importorskip("sphinx_gallery")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            # Render the example gallery without running the examples (each
            # takes up to a minute; tests/test_examples.py runs them small).
            "-D",
            "plot_gallery=0",
            "-d",
            str(tmp_path / "doctrees"),
            DOC,
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = tmp_path / "html"
    assert (html / "from_faiss.html").exists()
    assert (html / "auto_examples" / "index.html").exists()
    # The user guide's figures are drawn at build time.
    guide = (html / "user_guide.html").read_text()
    for figure in ("ivf_cells", "pq_adc"):
        assert (html / "_images" / f"{figure}.png").stat().st_size > 10_000
        assert f"{figure}.png" in guide
    # The benchmark page shows the published run, with its machine.
    page = (html / "benchmarks.html").read_text()
    published = os.path.join(DOC, "_static", "benchmarks", "ivfpq-latest.json")
    if os.path.exists(published):
        with open(published) as f:
            env = json.load(f)["environment"]
        assert env["cpu"] in page and env["versions"]["faiss-cpu"] in page
        assert "ivfpq-latest.png" in page
    else:
        assert "No published run yet" in page


def test_benchmark_directive_renders_runs():
    sys.path.insert(0, os.path.join(DOC, "_ext"))
    try:
        from annlearn_benchmarks import render
    finally:
        sys.path.pop(0)
    env = {
        "date": "2026-01-01",
        "cpu": "Test CPU",
        "n_cpus": 2,
        "annlearn_isa": "avx2",
        "OPENBLAS_CORETYPE": "unset",
        "versions": {"annlearn": "0.1", "faiss-cpu": None},
    }
    rows = [
        {"system": "annlearn IVFPQ", "nprobe": 8, "qps": 20000.4, "recall": 0.62},
        {
            "system": "annlearn FlatNeighbors",
            "nprobe": None,
            "qps": 1300.0,
            "recall": 1.0,
        },
    ]
    ratios = [
        {
            "annlearn": "annlearn IVFPQ",
            "faiss": "faiss IVFPQ",
            "nprobe": 8,
            "qps_ratio": 2.17,
            "recall_annlearn": 0.62,
            "recall_faiss": 0.6207,
        },
    ]
    text = "\n".join(
        render(
            {"environment": env, "rows": rows, "ratios": ratios},
            ["system", "nprobe", "qps", "recall"],
        )
    )
    assert "**Test CPU** (2 CPUs; annlearn kernels: avx2" in text
    assert "faiss-cpu" not in text  # versions that are None are left out
    assert "     - 20000" in text and "     - exact" in text
    assert "**x2.17**" in text and "0.6200, 0.6207" in text
    flat = "\n".join(
        render(
            {"environment": env, "rows": rows, "ratios": {"QPS / faiss": 1.08}},
            ["system", "qps"],
        )
    )
    assert "- QPS / faiss: **1.08**" in flat


def test_user_guide_code_blocks_run():
    """Every ``.. code-block:: python`` of the user guide runs as written."""
    with open(os.path.join(DOC, "user_guide.rst")) as f:
        text = f.read()
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text)
    assert blocks
    for block in blocks:
        exec(compile(textwrap.dedent(block), "user_guide.rst", "exec"), {})
