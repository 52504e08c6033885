"""The documentation builds with warnings as errors, so that it cannot rot."""

import os
import subprocess
import sys

import pytest

DOC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "doc")


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
    assert (tmp_path / "html" / "from_faiss.html").exists()
    assert (tmp_path / "html" / "auto_examples" / "index.html").exists()
