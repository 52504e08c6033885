"""best_columns and rank_candidates: the top-k per row that merges shards'
candidates."""

import numpy as np
import pytest

from annlearn._merge import best_columns, rank_candidates


def _reference(dist, ids, cells, width):
    """numpy's full sort by (distance, cell, id, column), empty slots (id -1)
    last (by column), even after a candidate at +inf."""
    empty = ids < 0
    keys = [
        np.broadcast_to(np.arange(ids.shape[1]), ids.shape),
        np.where(empty, np.iinfo(np.int64).max, ids),
    ]
    if cells is not None:
        keys.append(np.where(empty, 0, cells))
    keys += [np.where(empty, np.inf, dist), empty]
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
        dist[rng.random(ids.shape) < 0.05] = np.inf  # candidates at +inf
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


def _rank_reference(parts, n_candidates, n_neighbors):
    """The parts side by side, sorted by (code, cell, id) with numpy, cut to
    n_candidates, then (with exact distances) sorted again by (exact, cell,
    id); empty slots last."""
    code, exact, ids, cells = (
        None if column[0] is None else np.concatenate(column, axis=1)
        for column in zip(*parts, strict=True)
    )
    empty = ids < 0
    big_id = np.where(empty, np.iinfo(np.int64).max, ids)

    def order(dist):
        return np.lexsort([big_id, cells, np.where(empty, np.inf, dist), empty], axis=1)

    keep = order(code)[:, :n_candidates]
    take = lambda a: np.take_along_axis(a, keep, 1)  # noqa: E731
    code, ids, cells, empty, big_id = map(take, (code, ids, cells, empty, big_id))
    dist = code
    if exact is not None:
        dist = take(exact)
        again = order(dist)
        dist, ids, empty = (np.take_along_axis(a, again, 1) for a in (dist, ids, empty))
    dist = np.where(empty, np.inf, dist)[:, :n_neighbors]
    ids = ids[:, :n_neighbors]
    more = n_neighbors - ids.shape[1]
    dist = np.pad(dist, ((0, 0), (0, more)), constant_values=np.inf)
    ids = np.pad(ids, ((0, 0), (0, more)), constant_values=-1)
    return dist.astype(np.float32), ids


@pytest.mark.parametrize("refined", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_rank_candidates_ranks_as_one_index(refined, n_threads):
    rng = np.random.default_rng(1)
    for _ in range(60):
        n_rows = int(rng.integers(1, 600))
        widths = rng.integers(0, 30, int(rng.integers(1, 4)))
        if widths.sum() == 0:
            continue
        # Distinct ids per row (rows of different shards), few distinct
        # distances and cells: ties for every key to decide.
        all_ids = np.stack(
            [rng.permutation(10_000)[: widths.sum()] for _ in range(n_rows)]
        )
        parts, start = [], 0
        for width in widths:
            ids = all_ids[:, start : start + width].copy()
            start += width
            ids[rng.random(ids.shape) < 0.15] = -1
            code = rng.integers(0, 6, ids.shape).astype(np.float32)
            code[rng.random(ids.shape) < 0.05] = np.inf  # candidates at +inf
            code[ids < 0] = rng.choice([np.inf, -2.0])  # ignored for empty slots
            exact = (
                rng.integers(0, 6, ids.shape).astype(np.float32) if refined else None
            )
            cells = rng.integers(0, 4, ids.shape).astype(np.int32)
            parts.append((code, exact, ids, cells))
        n_candidates = int(rng.integers(1, widths.sum() + 5))
        n_neighbors = int(rng.integers(1, 12))
        got = rank_candidates(parts, n_candidates, n_neighbors, n_threads)
        want = _rank_reference(parts, n_candidates, n_neighbors)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_rank_candidates_validation():
    part = (
        np.zeros((3, 2), np.float32),
        None,
        np.arange(6).reshape(3, 2),
        np.zeros((3, 2), np.int32),
    )
    refined = (part[0], part[0], part[2], part[3])
    dist, ids = rank_candidates(
        [
            part,
            part[:0]
            + (
                np.zeros((3, 0), np.float32),
                None,
                np.zeros((3, 0), np.int64),
                np.zeros((3, 0), np.int32),
            ),
        ],
        5,
        4,
    )
    np.testing.assert_array_equal(ids, [[0, 1, -1, -1], [2, 3, -1, -1], [4, 5, -1, -1]])
    assert np.isinf(dist[:, 2:]).all()
    with pytest.raises(ValueError, match="at least one part"):
        rank_candidates([], 1, 1)
    with pytest.raises(ValueError, match="n_candidates >= 1"):
        rank_candidates([part], 0, 1)
    with pytest.raises(ValueError, match="every part or in none"):
        rank_candidates([part, refined], 2, 1)
    with pytest.raises(ValueError, match="same n_rows"):
        rank_candidates(
            [part, tuple(a[:2] for a in part[:1]) + (None, part[2][:2], part[3][:2])],
            2,
            1,
        )
