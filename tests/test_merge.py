"""best_columns: the top-k per row that merges shards' candidates."""

import numpy as np
import pytest

from annlearn._merge import best_columns


def _reference(dist, ids, cells, width):
    """numpy's full sort by (distance, cell, id, column), empty slots (id -1)
    at +inf with the largest id."""
    empty = ids < 0
    keys = [
        np.broadcast_to(np.arange(ids.shape[1]), ids.shape),
        np.where(empty, np.iinfo(np.int64).max, ids),
    ]
    if cells is not None:
        keys.append(cells)
    keys.append(np.where(empty, np.inf, dist))
    return np.lexsort(keys, axis=1)[:, :width]


@pytest.mark.parametrize("with_cells", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_best_columns_rank_by_distance_cell_then_id(with_cells, n_threads):
    rng = np.random.default_rng(0)
    for _ in range(40):
        n_rows = int(rng.integers(1, 700))
        n_columns = int(rng.integers(1, 90))
        # Few distinct values: many ties for the cell and the id to decide.
        dist = rng.integers(0, 5, (n_rows, n_columns)).astype(np.float32)
        ids = np.stack([rng.permutation(1000)[:n_columns] for _ in range(n_rows)])
        ids[rng.random(ids.shape) < 0.15] = -1
        dist[ids < 0] = rng.choice([np.inf, -3.0, 0.0])  # ignored for empty slots
        cells = rng.integers(0, 4, ids.shape).astype(np.int32) if with_cells else None
        width = int(rng.integers(0, n_columns + 3))
        got = best_columns(dist, ids, cells, width, n_threads)
        np.testing.assert_array_equal(got, _reference(dist, ids, cells, width))


def test_best_columns_edges_and_validation():
    dist = np.zeros((3, 4), np.float32)
    ids = np.arange(12).reshape(3, 4)
    assert best_columns(dist, ids, None, 0).shape == (3, 0)
    assert best_columns(dist[:0], ids[:0], None, 2).shape == (0, 2)
    np.testing.assert_array_equal(
        best_columns(dist, ids[:, ::-1].copy(), None, 9)[0], [3, 2, 1, 0]
    )
    with pytest.raises(ValueError, match="shape of dist"):
        best_columns(dist, ids[:2], None, 2)
    with pytest.raises(ValueError, match="shape of dist"):
        best_columns(dist, ids, np.zeros((3, 3), np.int32), 2)
    with pytest.raises(ValueError, match="width >= 0"):
        best_columns(dist, ids, None, -1)
