import numpy as np
import pytest

from annlearn._testing import assert_knn_quasi_equal


def test_quasi_equal_accepts_tie_swaps():
    d = np.array([[0.0, 1.0, 1.0, 2.0]])
    assert_knn_quasi_equal(d, [[5, 7, 3, 9]], d, [[5, 3, 7, 9]])
    # A near-tie at the k-th rank may be cut differently.
    assert_knn_quasi_equal(d, [[5, 7, 3, 9]], d + [[0, 0, 0, 1e-7]], [[5, 7, 3, 4]])


def test_quasi_equal_rejects_real_differences():
    d = np.array([[0.0, 1.0, 2.0, 3.0]])
    with pytest.raises(AssertionError, match="not tied"):
        assert_knn_quasi_equal(d, [[5, 7, 3, 9]], d, [[5, 3, 7, 9]])
    with pytest.raises(AssertionError):
        assert_knn_quasi_equal(d + 0.5, [[5, 7, 3, 9]], d, [[5, 7, 3, 9]])
