"""Fixtures shared by several test modules (a module may define its own)."""

import numpy as np
import pytest

from annlearn import IVFPQNeighbors


@pytest.fixture(scope="module")
def data():
    """Clustered float32 data, 2,400 x 16 (modules may define their own)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 16)) * 4
    X = centers[rng.integers(0, 20, 2400)] + rng.standard_normal((2400, 16))
    return X.astype(np.float32)


@pytest.fixture
def small_ivfpq():
    """IVFPQNeighbors with parameters fit for ``data``; keywords override."""

    def make(**params):
        defaults = dict(
            n_neighbors=5,
            nlist=8,
            nprobe=2,
            n_subquantizers=8,
            nbits=6,
            refine_factor=None,
            random_state=0,
        )
        return IVFPQNeighbors(**{**defaults, **params})

    return make


@pytest.fixture
def eight_blobs():
    """3,000 float32 rows of 16 features around 8 centres."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 16)).astype(np.float32) * 4
    labels = rng.integers(0, 8, 3000)
    return (centres[labels] + rng.standard_normal((3000, 16))).astype(np.float32)
