"""pytest configuration shared by tests/ and the doctests of annlearn/."""

import importlib.util
import os

import pytest

from annlearn.datasets import FASHION_MNIST_PATH

# annlearn.dask needs the dask extra: without it, its doctests are not
# collected (tests/test_dask.py skips itself).
collect_ignore = [] if importlib.util.find_spec("distributed") else ["annlearn/dask"]


def pytest_collection_modifyitems(config, items):
    # The Fashion-MNIST doctest needs the Debian package (.ci/run installs
    # it); without the files it is skipped rather than failed.
    if os.path.isdir(FASHION_MNIST_PATH):
        return
    skip = pytest.mark.skip(reason=f"Fashion-MNIST is not in {FASHION_MNIST_PATH}")
    for item in items:
        if item.name.endswith("datasets.load_fashion_mnist"):
            item.add_marker(skip)
