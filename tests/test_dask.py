"""annlearn.dask: sharded indexes on a real LocalCluster (2 worker processes).

The answers are compared with the local estimators holding every row, with
``==``: the merge of the shards' answers is exactly the answer of one index.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import sparse
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from annlearn import FlatNeighbors, IVFPQNeighbors
from annlearn.datasets import make_embeddings

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from annlearn.dask import (  # noqa: E402 (after the skips)
    DaskFlatNeighbors,
    DaskIVFPQNeighbors,
    ShardLostError,
    load,
    save,
)

METRICS = ["euclidean", "sqeuclidean", "cosine", "inner_product"]


def _local_cluster(n_workers):
    return distributed.LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
    )


@pytest.fixture(scope="module")
def client():
    with _local_cluster(2) as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def data():
    X = make_embeddings(6000, 32, n_clusters=30, random_state=0)
    Q = make_embeddings(300, 32, n_clusters=30, random_state=1)
    return X, Q


def assert_same(result, reference):
    for got, expected in zip(result, reference, strict=True):
        assert got.dtype == expected.dtype
        assert_array_equal(got, expected)


def ivfpq(**params):
    # One thread: k-means' barriers are slow when the worker processes share
    # the cores.
    defaults = dict(
        nlist=32,
        nprobe=4,
        n_subquantizers=8,
        nbits=6,
        refine_factor=None,
        random_state=0,
    )
    defaults.update(n_jobs=1)
    return IVFPQNeighbors(**{**defaults, **params})


def dask_ivfpq(local, **params):
    """The sharded counterpart of a local IVFPQNeighbors (same parameters)."""
    names = DaskIVFPQNeighbors().get_params()
    same = {k: v for k, v in local.get_params().items() if k in names}
    return DaskIVFPQNeighbors(**{**same, **params})


# -- the same answers as one index -------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_flat_equals_flat_on_all_rows(client, data, metric):
    X, Q = data
    reference = FlatNeighbors(n_neighbors=10, metric=metric).fit(X).kneighbors(Q)
    # 3 shards on 2 workers: shards need not match workers.
    index = DaskFlatNeighbors(n_neighbors=10, metric=metric, n_shards=3).fit(X)
    assert index.n_shards_ == 3 and index.n_samples_fit_ == len(X)
    assert_same(index.kneighbors(Q), reference)


def test_flat_equals_with_ties_and_user_ids(client):
    rng = np.random.default_rng(0)
    # Small integers: many exactly equal distances, cut at rank k too.
    X = rng.integers(0, 3, size=(3000, 6)).astype(np.float32)
    Q = rng.integers(0, 3, size=(100, 6)).astype(np.float32)
    reference = FlatNeighbors(n_neighbors=20).fit(X).kneighbors(Q)
    assert_same(DaskFlatNeighbors(n_neighbors=20).fit(X).kneighbors(Q), reference)
    ids = rng.permutation(10 * len(X))[: len(X)]
    X = make_embeddings(3000, 16, random_state=2)
    Q = make_embeddings(50, 16, random_state=3)
    reference = FlatNeighbors(n_neighbors=5).fit(X, ids=ids).kneighbors(Q)
    assert_same(
        DaskFlatNeighbors(n_neighbors=5).fit(X, ids=ids).kneighbors(Q), reference
    )


@pytest.mark.parametrize(
    "metric, refine_factor",
    [("euclidean", None), ("euclidean", 4), ("cosine", 4), ("inner_product", None)],
)
def test_ivfpq_equals_ivfpq_with_the_same_quantizers(
    client, data, metric, refine_factor
):
    X, Q = data
    local = ivfpq(n_neighbors=10, metric=metric, refine_factor=refine_factor).fit(X)
    index = dask_ivfpq(local, n_shards=3).fit(X, quantizers=local)
    assert_same(index.kneighbors(Q), local.kneighbors(Q))
    assert_array_equal(index.cluster_centers_, local.cluster_centers_)


def test_blocks_routed_in_pieces_and_shards_stay_put(client, data):
    """Blocks of 1,200 queries are routed in a piece per worker (the pieces
    of a block concatenate to the probes of one index) and searched where
    the shards live: the answers are one index's, and after the search every
    shard is still on its one worker, not copied to where the queries were
    (the scheduler knows a shard's size: held_bytes)."""
    from annlearn.dask._cluster import held_bytes
    from annlearn.dask._shards import MIN_ROUTE_ROWS, route_pieces

    X, _ = data
    Q = make_embeddings(2500, 32, n_clusters=30, random_state=5)
    local = ivfpq(n_neighbors=10, nbits=4, refine_factor=4).fit(X)
    index = dask_ivfpq(local, query_block_size=1200).fit(X, quantizers=local)
    shards = list(index._index.shards)
    before = client.who_has(shards)
    assert_same(index.kneighbors(Q), local.kneighbors(Q))
    after = client.who_has(shards)
    assert after == before and all(len(w) == 1 for w in after.values())
    assert route_pieces(1200, 2) == [(0, 600), (600, 1200)]
    assert route_pieces(2 * MIN_ROUTE_ROWS - 1, 2) == [(0, 2 * MIN_ROUTE_ROWS - 1)]
    assert route_pieces(5, 3) == [(0, 5)]
    sizes = client.gather([client.submit(held_bytes, s) for s in shards])
    stored = sum(a.nbytes for a in (local._store.codes, local._store.ids))
    assert sum(sizes) >= stored


def test_pixel_queries_travel_as_uint8_and_come_back_exactly():
    from annlearn.dask._shards import _gather_rows, as_sent, route_pieces

    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, size=(1000, 8)).astype(np.float32)
    other = pixels + 0.5
    assert as_sent(pixels, 2).dtype == np.uint8
    assert as_sent(other, 2) is other
    # A block's pieces, sent either way, gather back to the float32 rows.
    pieces = [as_sent(pixels[a:b], 1) for a, b in route_pieces(1000, 2)]
    rows = rng.permutation(1000)[:300]
    gathered = _gather_rows(pieces, rows)
    assert gathered.dtype == np.float32
    assert_array_equal(gathered, pixels[rows])


def test_ivfpq_ties_are_ranked_as_one_index_ranks_them(client):
    rng = np.random.default_rng(0)
    # Small integers: distinct rows at equal exact distances, in different
    # cells, which one index ranks by its lists' rows (cell, then insertion
    # order); and rows three times (equal codes in one cell).
    X = rng.integers(0, 3, size=(2000, 32)).astype(np.float32)
    X, Q = np.concatenate([X, X[:1000], X[:1000]]), X[:200] + 1
    for refine_factor in (None, 3):
        local = ivfpq(n_neighbors=10, refine_factor=refine_factor).fit(X)
        index = dask_ivfpq(local, n_shards=3).fit(X, quantizers=local)
        assert_same(index.kneighbors(Q), local.kneighbors(Q))


@pytest.mark.parametrize("n_shards", [2, 3])
@pytest.mark.parametrize("refine_factor", [None, 4])
@pytest.mark.parametrize("ties", [False, True])
def test_ivfpq_two_passes_equal_one_index(data, n_shards, refine_factor, ties):
    """The shards' two passes and the merge, run in this process: each
    query's leader scans it in full, the other shards from the leader's
    bound (4-bit codes), a query on two shards is answered by the second,
    one on three by the merge; the answers are one index's, ties included
    (small integers: equal codes and equal exact distances)."""
    import copy

    from annlearn.dask import _shards
    from annlearn.dask._cluster import assign_cells

    X, Q = data
    if ties:
        rng = np.random.default_rng(1)
        X = rng.integers(0, 3, size=(4000, 32)).astype(np.float32)
        X, Q = np.concatenate([X, X[:1000]]), X[:300] + 1
    local = ivfpq(n_neighbors=10, nbits=4, nprobe=8, refine_factor=refine_factor)
    local.fit(X)
    template = copy.deepcopy(local).remove(local._store.ids)
    part = _shards.encode_part(template, X, np.arange(len(X)))
    counts = _shards.cell_counts(part, local.nlist)
    owner = assign_cells(counts, n_shards, local.cluster_centers_).astype(np.int32)
    shards = [
        _shards.assemble_shard(template, piece)
        for piece in _shards.split_part(part, owner, n_shards)
    ]
    router = _shards.CellRouter(8, 10, counts, owner, 1)
    P = template._prepare_queries(Q)
    probes = [
        _shards.route(router, template, P, 0, 100),
        _shards.route(router, template, P, 100, len(P)),
    ]
    # The block as the workers hold it: in its routed pieces.
    pieces = [P[:100], P[100:]]
    n_candidates = 10 * (refine_factor or 1)
    args = (10, n_candidates, refine_factor is not None, 1)
    firsts = [
        _shards.search_ivfpq(sh, pieces, probes, n, *args)
        for n, sh in enumerate(shards)
    ]
    rests = [
        _shards.search_ivfpq_rest(sh, pieces, probes, n, firsts, *args)
        for n, sh in enumerate(shards)
    ]
    merged = _shards.merge_ivfpq(rests, 10, n_candidates, local.effective_metric_)
    assert_same(merged, local.kneighbors(Q))
    # The paths taken: queries answered by a second pass, and on three
    # shards by the merge (own queries are few here: probes spread).
    own = sum(len(first[1][0]) for first in firsts)
    assert sum(len(rest[1][0]) for rest in rests) > own
    wide = sum(len(first[2][0]) for first in firsts)
    assert (wide > 0) == (n_shards == 3)


def test_ivfpq_two_passes_with_an_empty_shard(data):
    """A shard left without rows (its cells empty) is not searched, as the
    client skips it: the queries whose nearest probed cells were its own are
    led by the shard of their nearest non-empty cell."""
    import copy

    from annlearn.dask import _shards
    from annlearn.dask._cluster import assign_cells

    X, Q = data
    local = ivfpq(n_neighbors=10, nbits=4, nprobe=8, refine_factor=4).fit(X)
    template = copy.deepcopy(local).remove(local._store.ids)
    part = _shards.encode_part(template, X, np.arange(len(X)))
    counts = _shards.cell_counts(part, local.nlist)
    owner = assign_cells(counts, 3, local.cluster_centers_).astype(np.int32)
    shards = [
        _shards.assemble_shard(template, piece)
        for piece in _shards.split_part(part, owner, 3)
    ]
    gone = shards[1]._store.ids.copy()
    local.remove(gone)
    shards = [shards[0], shards[2]]
    counts = np.where(owner == 1, 0, counts)
    router = _shards.CellRouter(8, 10, counts, owner, 1)
    P = template._prepare_queries(Q)
    probes = _shards.route(router, template, P, 0, len(P))
    assert (probes[2] != 1).all()
    args = (10, 40, True, 1)
    numbers = (0, 2)
    firsts = [
        _shards.search_ivfpq(sh, P, probes, n, *args)
        for n, sh in zip(numbers, shards, strict=True)
    ]
    rests = [
        _shards.search_ivfpq_rest(sh, P, probes, n, firsts, *args)
        for n, sh in zip(numbers, shards, strict=True)
    ]
    merged = _shards.merge_ivfpq(rests, 10, 40, local.effective_metric_)
    assert_same(merged, local.kneighbors(Q))


def test_ivfpq_widens_nprobe_over_the_whole_index(client, data):
    X, Q = data
    # 32 cells of ~190 rows, 400 neighbours from 1 probed cell: every query
    # needs more cells, judged on the whole index (each shard holds ~1/3).
    local = ivfpq(n_neighbors=400, nprobe=1, refine_factor=2).fit(X)
    index = dask_ivfpq(local, n_shards=3).fit(X, quantizers=local)
    assert_same(index.kneighbors(Q[:40]), local.kneighbors(Q[:40]))


def test_ivfpq_trains_on_a_sample_of_a_dask_array(client, data):
    X, Q = data
    params = dict(n_neighbors=10, nlist=16, nprobe=8, n_subquantizers=16, nbits=5)
    params.update(refine_factor=8)
    index = DaskIVFPQNeighbors(**params, max_train_samples=2000, random_state=0)
    index.fit(da.from_array(X, chunks=1000))
    assert index.cluster_centers_.shape == (16, 32) and index.n_shards_ == 2
    assert index.score(Q) > 0.9
    # Trained on the same 2000 rows (same seed) as one index would be.
    local = IVFPQNeighbors(**params, max_train_samples=2000, random_state=0).fit(X)
    assert index.score(Q) == pytest.approx(local.score(Q), abs=0.05)


# -- the neighbours of the indexed vectors, graphs, transform -----------------


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "ivfpq-codes"])
def test_x_none_graphs_and_transform_equal_one_index(client, data, kind):
    X, Q = data
    rng = np.random.default_rng(4)
    # Exact duplicates (the self-exclusion's hard case) and user ids, which
    # increase with the rows (ties are then ranked as one index ranks them).
    X = np.concatenate([X[:1500], X[:40]])
    ids = np.sort(rng.choice(10 * len(X), len(X), replace=False))
    if kind == "flat":
        local = FlatNeighbors(n_neighbors=6).fit(X, ids=ids)
        index = DaskFlatNeighbors(n_neighbors=6, n_shards=3, query_block_size=256)
        index.fit(X, ids=ids)
    else:
        refine = 3 if kind == "ivfpq" else None
        local = ivfpq(n_neighbors=6, refine_factor=refine, nbits=8).fit(X, ids=ids)
        index = dask_ivfpq(local, n_shards=3, query_block_size=256)
        index.fit(X, ids=ids, quantizers=local)
    # Rows in id order, each row without itself, as one index answers.
    assert_same(index.kneighbors(), local.kneighbors())
    assert_same(index.kneighbors(n_neighbors=2), local.kneighbors(n_neighbors=2))
    for mode in ("connectivity", "distance"):
        for queries in (None, Q):
            got = index.kneighbors_graph(queries, mode=mode)
            expected = local.kneighbors_graph(queries, mode=mode)
            n_rows = len(X if queries is None else queries)
            assert got.shape == expected.shape == (n_rows, ids.max() + 1)
            assert_array_equal(got.indptr, expected.indptr)
            assert_array_equal(got.indices, expected.indices)
            assert_array_equal(got.data, expected.data)
    lazy = index.kneighbors_graph(da.from_array(Q, chunks=100), mode="distance")
    assert (lazy != local.kneighbors_graph(Q, mode="distance")).nnz == 0
    for mode in ("connectivity", "distance"):
        index.set_params(mode=mode)
        local.set_params(mode=mode)
        assert (index.transform(Q) != local.transform(Q)).nnz == 0
    if kind == "flat":
        got, expected = index.fit_transform(X), local.fit_transform(X)
        assert (got != expected).nnz == 0 and got.shape == (len(X), len(X))


# -- dask arrays ---------------------------------------------------------------


def test_dask_array_queries_give_lazy_blocks(client, data):
    X, Q = data
    index = DaskFlatNeighbors(n_neighbors=5).fit(da.from_array(X, chunks=2500))
    Qd = da.from_array(Q, chunks=120)
    dist, ids = index.kneighbors(Qd)
    assert isinstance(dist, da.Array) and isinstance(ids, da.Array)
    assert dist.chunks == ((120, 120, 60), (5,)) and ids.dtype == np.int64
    # Nothing ran yet: compute gives the numpy answer.
    assert_same(client.compute([dist, ids], sync=True), index.kneighbors(Q))
    assert_same(index.kneighbors(Q), FlatNeighbors(n_neighbors=5).fit(X).kneighbors(Q))
    only_ids = index.kneighbors(Qd, return_distance=False)
    assert_array_equal(only_ids.compute(), ids.compute())


def test_ivfpq_dask_array_queries(client, data):
    X, Q = data
    local = ivfpq(n_neighbors=5, metric="cosine").fit(X)
    index = dask_ivfpq(local).fit(da.from_array(X, chunks=1500), quantizers=local)
    dist, ids = index.kneighbors(da.from_array(Q, chunks=100))
    assert_same(client.compute([dist, ids], sync=True), local.kneighbors(Q))


# -- add, remove, score ------------------------------------------------------------


def test_add_and_remove_go_to_the_right_shards(client, data):
    X, Q = data
    local = FlatNeighbors(n_neighbors=8).fit(X[:4000])
    index = DaskFlatNeighbors(n_neighbors=8, n_shards=3).fit(X[:4000])
    sizes = index._index.sizes.tolist()
    assert sizes == [1334, 1333, 1333]
    index.remove(np.arange(0, 1000))  # all from shard 0
    local.remove(np.arange(0, 1000))
    assert index._index.sizes.tolist() == [334, 1333, 1333]
    index.add(X[4000:5000])  # default ids continue after the largest: 4000..
    local.add(X[4000:5000])
    # The smallest shard takes the rows until it reaches the others.
    assert index._index.sizes.tolist() == [1334, 1333, 1333]
    assert_same(index.kneighbors(Q), local.kneighbors(Q))
    index.add(X[5000:5003], ids=[10**9, 7, 5])
    local.add(X[5000:5003], ids=[10**9, 7, 5])
    assert_same(index.kneighbors(Q), local.kneighbors(Q))
    assert index.n_samples_fit_ == local.n_samples_fit_ == 4003

    before = index._index
    with pytest.raises(ValueError, match=r"Ids already in the index: \[4000\]"):
        index.add(X[:2], ids=[4000, 10**8])
    with pytest.raises(ValueError, match=r"not in the index: \[3, 999\]; nothing"):
        index.remove([3, 999, 1000])
    assert index._index is before  # nothing changed


def _cells_per_shard(index):
    from annlearn.dask import _shards

    client, shards = index._index.client, index._index.shards
    infos = client.gather([client.submit(_shards.shard_info, s) for s in shards])
    return np.stack([info["cell_sizes"] for info in infos])


def test_ivfpq_shards_by_cells_and_adds_to_the_cell_owner(client, data):
    X, Q = data
    local = ivfpq(n_neighbors=10, refine_factor=2).fit(X[:3000])
    index = dask_ivfpq(local, n_shards=3).fit(X[:3000], quantizers=local)
    per_shard = _cells_per_shard(index)
    # Every cell on one shard, and the shards about even.
    assert ((per_shard > 0).sum(axis=0) <= 1).all()
    assert per_shard.sum(axis=1).max() < 1.3 * per_shard.sum(axis=1).min()
    for est in (local, index):
        est.add(X[3000:], ids=np.arange(3000, 6000)[::-1])
        est.remove(np.arange(500, 2500))
    assert ((_cells_per_shard(index) > 0).sum(axis=0) <= 1).all()
    assert_same(index.kneighbors(Q), local.kneighbors(Q))


def test_cells_go_to_shards_in_groups_of_neighbours():
    from annlearn.dask._cluster import assign_cells

    rng = np.random.default_rng(0)
    # Cells on a line: each shard takes a run of neighbouring cells, with
    # its share of the rows to within one cell.
    centers = np.zeros((40, 3))
    centers[:, 0] = rng.permutation(40)
    sizes = rng.integers(1, 50, size=40)
    for n_shards in (1, 2, 3, 5):
        owner = assign_cells(sizes, n_shards, centers)
        along = owner[np.argsort(centers[:, 0])]
        assert len(np.flatnonzero(np.diff(along))) == n_shards - 1
        loads = np.bincount(owner, weights=sizes, minlength=n_shards)
        assert np.abs(loads - sizes.sum() / n_shards).max() <= 2 * sizes.max()
    # Two far-apart clumps of cells, two shards: one clump each.
    clumps = np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(50, 1, (30, 8))])
    owner = assign_cells(np.full(60, 10), 2, clumps)
    assert len(set(owner[:30])) == len(set(owner[30:])) == 1
    assert owner[0] != owner[30]


def test_score(client, data):
    X, Q = data
    flat = DaskFlatNeighbors(n_neighbors=10).fit(X)
    assert flat.score(Q) == 1.0
    local = ivfpq(n_neighbors=10, refine_factor=2).fit(X)
    index = dask_ivfpq(local).fit(X, quantizers=local)
    assert index.score(Q) == local.score(Q) < 1.0
    assert index.score(da.from_array(Q, chunks=100)) == local.score(Q)
    # Cosine (normalised queries), and data far from the origin (the exact
    # references centre it): each reference prepares the queries as it
    # prepared its rows.
    for metric, shift in (("cosine", 0.0), ("euclidean", 1e4)):
        local = ivfpq(n_neighbors=10, refine_factor=2, metric=metric).fit(X + shift)
        index = dask_ivfpq(local).fit(X + shift, quantizers=local)
        assert index.score(Q + shift) == local.score(Q + shift)
    assert DaskFlatNeighbors(n_neighbors=10).fit(X + 1e4).score(Q + 1e4) == 1.0
    no_vectors = ivfpq(n_neighbors=10).fit(X)
    index = dask_ivfpq(no_vectors).fit(X, quantizers=no_vectors)
    with pytest.raises(ValueError, match="score needs the indexed vectors"):
        index.score(Q)


# -- files -----------------------------------------------------------------------


def test_save_and_load_on_a_cluster_of_another_size(client, data, tmp_path):
    X, Q = data
    local = ivfpq(n_neighbors=10, refine_factor=2).fit(X)
    index = dask_ivfpq(local, n_shards=3).fit(X, quantizers=local)
    flat = DaskFlatNeighbors(n_neighbors=10, n_shards=3).fit(X)
    save(index, tmp_path / "ivfpq")
    save(flat, tmp_path / "flat")
    save(flat, tmp_path / "flat")  # replaces the previous save
    assert len(os.listdir(tmp_path / "flat")) == 1 + 1 + 3
    with _local_cluster(1) as cluster, distributed.Client(cluster) as one:
        loaded = load(tmp_path / "ivfpq", one, mmap_mode="r")
        assert loaded.n_shards_ == 3 and loaded.get_params() == index.get_params()
        assert_same(loaded.kneighbors(Q), local.kneighbors(Q))
        loaded_flat = load(tmp_path / "flat", one)
        assert_same(loaded_flat.kneighbors(Q), flat.kneighbors(Q))
    manifest_path = tmp_path / "flat" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["n_samples"] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match="Cannot load .* 2000 rows, the manifest says 2001"
    ):
        load(tmp_path / "flat", client)
    manifest["shards"][0]["file"] = "../elsewhere.annlearn"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="names a file '../elsewhere.annlearn'"):
        load(tmp_path / "flat", client)
    with pytest.raises(ValueError, match="Cannot load"):
        load(tmp_path / "missing", client)


# -- filtered search -----------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_flat_filter_equals_one_index(client, data, metric):
    # Every form of filter, applied in every shard, gives one index's answer;
    # small blocks, and filters that leave a shard fewer than k rows of a
    # query (or none), exercise the merge of short answers.
    X, Q = data
    ids = np.random.default_rng(3).permutation(10 * len(X))[: len(X)]
    sharded = DaskFlatNeighbors(n_neighbors=5, metric=metric, query_block_size=64)
    sharded.fit(X, ids=ids)
    local = FlatNeighbors(n_neighbors=5, metric=metric).fit(X, ids=ids)
    rng = np.random.default_rng(4)
    n_ids = ids.max() + 1
    mask = np.zeros(n_ids, dtype=bool)
    mask[ids[rng.random(len(X)) < 0.02]] = True
    few = ids[rng.choice(len(X), 7, replace=False)]
    per_query = np.zeros((len(Q), n_ids), dtype=bool)
    per_query[:, ids] = rng.random((len(Q), len(X))) < 0.01
    for allowed in (mask, few, per_query, sparse.csr_matrix(per_query)):
        dist, ind = sharded.kneighbors(Q, allowed=allowed)
        expected_dist, expected_ind = local.kneighbors(Q, allowed=allowed)
        assert_array_equal(ind, expected_ind)
        # A shard may score its few allowed rows directly where one index
        # masks a GEMM (the cost rule sees the shard's size): float32 rounding.
        assert_allclose(dist, expected_dist, rtol=1e-6, atol=1e-6)
    graph = sharded.kneighbors_graph(Q, allowed=mask)
    assert (graph != local.kneighbors_graph(Q, allowed=mask)).nnz == 0


def test_flat_filter_bad_input_changes_nothing(client, data):
    X, Q = data
    sharded = DaskFlatNeighbors(n_neighbors=3).fit(X)
    before = sharded.kneighbors(Q)
    with pytest.raises(ValueError, match="ids that are not in the index: 6000"):
        sharded.kneighbors(Q, allowed=[0, 1, 6000])
    with pytest.raises(ValueError, match=r"query 0 \(and 299 other queries\)"):
        sharded.kneighbors(Q, allowed=[0, 1])
    with pytest.raises(ValueError, match="boolean mask of 5 entries"):
        sharded.kneighbors(Q, allowed=np.ones(5, dtype=bool))
    with pytest.raises(TypeError, match="ids must be integers"):
        sharded.kneighbors(Q, allowed=np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="numpy array of queries only"):
        sharded.kneighbors(allowed=np.arange(10))
    with pytest.raises(ValueError, match="numpy array of queries only"):
        sharded.kneighbors(da.from_array(Q, chunks=100), allowed=np.arange(10))
    assert_same(sharded.kneighbors(Q), before)


# -- errors ----------------------------------------------------------------------


def test_bad_input(client, data):
    X, Q = data
    local = ivfpq().fit(X)
    with pytest.raises(ValueError, match="does not support filtered search"):
        dask_ivfpq(local).fit(X, quantizers=local).kneighbors(Q, allowed=[0, 1, 2])
    with pytest.raises(NotFittedError):
        DaskFlatNeighbors().kneighbors(Q)
    with pytest.raises(InvalidParameterError):
        DaskFlatNeighbors(n_shards=0).fit(X)
    bad = X[:100].copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DaskFlatNeighbors().fit(bad)
    # A dask array is checked on the workers, at fit: the worker's error.
    with pytest.raises(ValueError, match="NaN"):
        DaskFlatNeighbors().fit(da.from_array(bad, chunks=50))
    index = DaskFlatNeighbors(n_neighbors=3).fit(X[:100])
    with pytest.raises(ValueError, match="X has 5 features, but DaskFlatNeighbors"):
        index.kneighbors(Q[:, :5])
    with pytest.raises(ValueError, match="X has 5 features, but DaskFlatNeighbors"):
        index.kneighbors(da.from_array(Q[:, :5]))
    with pytest.raises(ValueError, match="n_neighbors <= n_samples_fit"):
        index.kneighbors(Q, n_neighbors=101)
    with pytest.raises(ValueError, match="n_neighbors < n_samples_fit"):
        index.kneighbors(n_neighbors=100)  # X=None: each row excludes itself
    local = ivfpq().fit(X)
    with pytest.raises(ValueError, match=r"nlist=32 \(this estimator: 16\)"):
        dask_ivfpq(local, nlist=16).fit(X, quantizers=local)
    with pytest.raises(ValueError, match="no stored vectors, and refine_factor"):
        dask_ivfpq(local, refine_factor=2).fit(X, quantizers=local)
    with pytest.raises(ValueError, match="X has 16 features, but the quantizers"):
        dask_ivfpq(local).fit(X[:, :16], quantizers=local)


def test_estimator_api_and_pickling(client, data):
    X, Q = data
    est = DaskIVFPQNeighbors(nlist=8, nbits=4, n_shards=2, query_block_size=50)
    assert clone(est).get_params() == est.get_params()
    assert pickle.loads(pickle.dumps(est)).get_params() == est.get_params()
    est.set_params(nprobe=8, random_state=0).fit(X)
    # Small query blocks: many tasks, same answer.
    assert_same(est.kneighbors(Q), est.set_params(query_block_size=1000).kneighbors(Q))
    with pytest.raises(TypeError, match="cannot be pickled: its shards live"):
        pickle.dumps(est)
    assert pickle.loads(pickle.dumps(clone(est))).get_params() == est.get_params()


def test_annlearn_does_not_import_dask():
    code = "import sys, annlearn; sys.exit('dask' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


# -- scikit-learn workflows on the dask backend ------------------------------------


def test_grid_search_on_the_dask_joblib_backend(client, data):
    import joblib
    from sklearn.model_selection import GridSearchCV

    X, _ = data
    grid = {"nprobe": [1, 8], "nlist": [8, 16]}
    search = GridSearchCV(ivfpq(n_neighbors=5, nbits=4), grid, cv=2, n_jobs=-1)
    with joblib.parallel_backend("dask"):
        search.fit(X[:2000])
    expected = GridSearchCV(ivfpq(n_neighbors=5, nbits=4), grid, cv=2).fit(X[:2000])
    assert search.best_params_ == expected.best_params_
    assert_array_equal(
        search.cv_results_["mean_test_score"], expected.cv_results_["mean_test_score"]
    )


# -- a lost worker -----------------------------------------------------------------


def _kill(client, address):
    """Kill a worker process the hard way and wait for the scheduler to see it."""
    pid = client.run(os.getpid, workers=[address])[address]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while address in client.scheduler_info(n_workers=-1)["workers"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_killed_worker_gives_a_complete_answer_or_an_error(data):
    X, Q = data
    reference = FlatNeighbors(n_neighbors=10).fit(X).kneighbors(Q)
    with _local_cluster(2) as cluster, distributed.Client(cluster) as client:
        # Fitted from a dask array: a lost shard is rebuilt from its source.
        rebuilt = DaskFlatNeighbors(n_neighbors=10).fit(da.from_array(X, chunks=1000))
        # Fitted from numpy: the scattered rows are gone with the worker.
        scattered = DaskFlatNeighbors(n_neighbors=10).fit(X)
        holder = client.who_has([scattered._index.shards[0]])
        _kill(client, holder[scattered._index.shards[0].key][0])
        assert_same(rebuilt.kneighbors(Q), reference)
        with pytest.raises(ShardLostError, match="lost with its worker"):
            scattered.kneighbors(Q)

        # Killed in the middle of a search: complete or an error, never less.
        client.wait_for_workers(2, timeout=30)
        rebuilt = DaskFlatNeighbors(n_neighbors=10).fit(da.from_array(X, chunks=1000))
        big = np.repeat(Q, 20, axis=0)
        outcome = {}

        def search():
            try:
                outcome["result"] = rebuilt.set_params(query_block_size=500).kneighbors(
                    big
                )
            except ShardLostError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=search)
        thread.start()
        time.sleep(0.3)
        _kill(
            client,
            client.who_has([rebuilt._index.shards[1]])[rebuilt._index.shards[1].key][0],
        )
        thread.join(120)
        assert not thread.is_alive()
        # The shards come from a dask array: rebuilt, and the search retried.
        assert "error" not in outcome, outcome.get("error")
        assert_same(outcome["result"], tuple(np.repeat(r, 20, 0) for r in reference))


def test_a_killed_worker_during_a_lazy_search(data, tmp_path):
    X, Q = data
    reference = FlatNeighbors(n_neighbors=10).fit(X).kneighbors(Q)
    big = np.repeat(Q, 20, axis=0)
    expected = tuple(np.repeat(r, 20, 0) for r in reference)
    with _local_cluster(2) as cluster, distributed.Client(cluster) as client:

        def holder(index, i):
            shard = index._index.shards[i]
            return client.who_has([shard])[shard.key][0]

        # Fitted from numpy: the lazy answer, computed after the kill, is
        # the error that says so (not dask's "lost dependencies").
        scattered = DaskFlatNeighbors(n_neighbors=10).fit(X)
        local = ivfpq(n_neighbors=10, refine_factor=2).fit(X)
        coded = dask_ivfpq(local).fit(X, quantizers=local)
        save(scattered, tmp_path / "flat")
        lazy = [
            index.kneighbors(da.from_array(Q, chunks=100))
            for index in (scattered, coded)
        ]
        _kill(client, holder(scattered, 0))
        for dist, ids in lazy:
            with pytest.raises(ShardLostError, match="lost with its worker"):
                client.compute([dist, ids], sync=True)
        client.wait_for_workers(2, timeout=30)

        # Fitted from a dask array or loaded from files: rebuilt, and the
        # lazy search completes, whether the worker dies before or during
        # the computation.
        for index in (
            DaskFlatNeighbors(n_neighbors=10).fit(da.from_array(X, chunks=1000)),
            load(tmp_path / "flat", client),
        ):
            dist, ids = index.kneighbors(da.from_array(big, chunks=500))
            futures = client.compute([dist, ids])
            time.sleep(0.3)
            _kill(client, holder(index, 1))
            assert_same(client.gather(futures), expected)
            client.wait_for_workers(2, timeout=30)
            assert_same(index.kneighbors(Q), reference)
