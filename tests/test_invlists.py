"""InvertedLists: the layout by cell, add/remove as new objects, the state."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from annlearn._invlists import InvertedLists


# -- InvertedLists -----------------------------------------------------------------
def _lists(vectors=True):
    rng = np.random.default_rng(1)
    cells = rng.integers(0, 5, 40)
    codes = rng.integers(0, 256, (40, 3)).astype(np.uint8)
    ids = rng.permutation(1000)[:40].astype(np.int64)
    vecs = rng.standard_normal((40, 6)).astype(np.float32) if vectors else None
    return cells, codes, ids, vecs, InvertedLists.from_cells(5, cells, codes, ids, vecs)


def test_inverted_lists_layout():
    cells, codes, ids, vecs, lists = _lists()
    assert len(lists) == 40 and lists.nlist == 5
    assert_array_equal(lists.sizes(), np.bincount(cells, minlength=5))
    for c in range(5):
        rows = slice(lists.offsets[c], lists.offsets[c + 1])
        mine = np.flatnonzero(cells == c)  # order kept within a cell
        assert_array_equal(lists.ids[rows], ids[mine])
        assert_array_equal(lists.codes[rows], codes[mine])
        assert_array_equal(lists.vectors[rows], vecs[mine])
    assert_array_equal(lists.cells(), np.sort(cells, kind="stable"))
    assert_array_equal(lists.cells_of(np.arange(40)), lists.cells())


def test_inverted_lists_add_remove_are_new_objects():
    cells, codes, ids, vecs, lists = _lists()
    more = lists.add(cells[:3], codes[:3], ids[:3] + 5000, vecs[:3])
    assert more is not lists and len(lists) == 40 and len(more) == 43
    assert set(more.ids) == set(ids) | set(ids[:3] + 5000)
    fewer = more.remove(np.isin(more.ids, ids[:10]))
    assert len(fewer) == 33 and not np.isin(ids[:10], fewer.ids).any()
    assert fewer.offsets[-1] == 33 and np.all(np.diff(fewer.offsets) >= 0)
    for row in range(len(fewer)):  # every row still in its own cell
        original = np.flatnonzero(more.ids == fewer.ids[row])[0]
        assert more.cells()[original] == fewer.cells()[row]
    with pytest.raises(ValueError, match="if and only if"):
        lists.add(cells[:1], codes[:1], ids[:1] + 9000)


def test_inverted_lists_state_round_trip_and_checks():
    *_, lists = _lists(vectors=False)
    state = lists.to_state()
    back = InvertedLists.from_state(state)
    assert back.vectors is None and back.ids is lists.ids
    check = dict(owner="X", n=40, nlist=5, code_size=3, ksub=256, d=6)
    InvertedLists.check_state(state=state, **check)
    bad = dict(state, list_offsets=state["list_offsets"][::-1].copy())
    with pytest.raises(ValueError, match="list_offsets must increase"):
        InvertedLists.check_state(state=bad, **check)
    with pytest.raises(ValueError, match="codes must be < 2\\*\\*nbits = 16"):
        InvertedLists.check_state(state=state, **{**check, "ksub": 16})
    dup = dict(state, ids=np.zeros(40, dtype=np.int64))
    with pytest.raises(ValueError, match="distinct"):
        InvertedLists.check_state(state=dup, **check)


def test_imbalance_factor():
    even = InvertedLists.from_cells(
        4,
        np.repeat(np.arange(4), 5),
        np.zeros((20, 1), np.uint8),
        np.arange(20, dtype=np.int64),
    )
    assert even.imbalance_factor() == 1.0
    one = InvertedLists.from_cells(
        4, np.zeros(20, int), np.zeros((20, 1), np.uint8), np.arange(20)
    )
    assert one.imbalance_factor() == 4.0
