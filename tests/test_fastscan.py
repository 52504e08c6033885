"""The 4-bit fast-scan kernels against numpy references (annlearn._fastscan)."""

import itertools
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from annlearn import _fastscan
from annlearn._fastscan import (
    _block_sums,
    fastscan_isa,
    ivf_fastscan,
    ivf_fastscan_queries,
    pack_codes,
    pack_lists,
    quantize_tables,
    unpack_codes,
)

# The checkout whose annlearn the tests import (for the subprocess).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(_fastscan.__file__)))
ISAS = {"none": ["none"], "avx2": ["none", "avx2"]}.get(
    fastscan_isa(), ["none", "avx2", "avx512"]
)


@pytest.fixture
def rng():
    return np.random.default_rng(20261201)


# -- packing -----------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 3, 8, 17])
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 100])
def test_pack_unpack_round_trip(rng, n, M):
    codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (-(-n // 32), 16 * (M + M % 2))
    np.testing.assert_array_equal(unpack_codes(packed, n, M), codes)
    # The padding rows of the last block hold code 0.
    padded = unpack_codes(packed, 32 * packed.shape[0], M)
    np.testing.assert_array_equal(padded[:n], codes)
    assert not padded[n:].any()


def test_pack_layout_is_the_documented_one(rng):
    # The layout is the contract with the estimator: byte t of run j of block
    # b holds sub-quantizers 2j (low nibble) and 2j + 1 (high nibble) of
    # vector 32 b + (t % 2) * 16 + (t // 16) * 8 + (t % 16) // 2.
    n, M = 70, 5
    codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
    packed = pack_codes(codes)
    padded = np.zeros((96, M + 1), dtype=np.uint8)
    padded[:n, :M] = codes
    t = np.arange(32)
    vector = (t % 2) * 16 + (t // 16) * 8 + (t % 16) // 2
    for b in range(3):
        for j in range(3):
            rows = padded[32 * b + vector]
            expected = rows[:, 2 * j] | (rows[:, 2 * j + 1] << 4)
            np.testing.assert_array_equal(packed[b, 32 * j : 32 * j + 32], expected)


def test_pack_lists_blocks_per_cell(rng):
    sizes = np.array([0, 33, 0, 32, 1, 0, 70])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    codes = rng.integers(0, 16, (offsets[-1], 7), dtype=np.uint8)
    packed, blocks = pack_lists(codes, offsets)
    np.testing.assert_array_equal(np.diff(blocks), -(-sizes // 32))
    assert blocks[0] == 0 and packed.shape == (blocks[-1], 16 * 8)
    for c in range(len(sizes)):
        part = packed[blocks[c] : blocks[c + 1]]
        np.testing.assert_array_equal(
            unpack_codes(part, sizes[c], 7), codes[offsets[c] : offsets[c + 1]]
        )


def test_packing_validation():
    with pytest.raises(ValueError, match="Expected 4-bit codes"):
        pack_codes(np.full((3, 2), 16, dtype=np.uint8))
    with pytest.raises(ValueError, match="dtype uint8"):
        pack_codes(np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="non-decreasing offsets"):
        pack_lists(np.zeros((4, 2), dtype=np.uint8), [0, 3, 2, 4])
    with pytest.raises(ValueError, match="Expected packed codes of shape"):
        unpack_codes(np.zeros((1, 32), dtype=np.uint8), 3, 4)


# -- the integer sums of every kernel ----------------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 28, 33, 98, 256])
def test_block_sums_exact_on_every_isa(rng, isa, M):
    # Entries up to min(255, 65535 // M): at M = 256 the sums reach 65280, so
    # the uint16 accumulation (with its wrap-around trick) is used to the end.
    n = 100
    vmax = min(255, 65535 // M)
    codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
    table = rng.integers(0, vmax + 1, (M, 16)).astype(np.uint8)
    table[:, 15] = vmax
    codes[0] = 15  # a vector at the largest possible sum
    expected = table[np.arange(M), codes].astype(np.int64).sum(axis=1)
    assert expected[0] == M * vmax
    sums = _block_sums(pack_codes(codes), table, isa)
    np.testing.assert_array_equal(sums[:n], expected)
    np.testing.assert_array_equal(sums[n:], table[:, 0].astype(np.int64).sum())


def test_isa_parameter_and_environment():
    assert fastscan_isa() == ISAS[-1]
    with pytest.raises(ValueError, match="isa must be one of"):
        _block_sums(np.zeros((1, 32), dtype=np.uint8), np.zeros((2, 16), np.uint8), "x")
    # ANNLEARN_ISA lowers the automatic choice (read once per process).
    for env, expected in [("avx2", ISAS[min(1, len(ISAS) - 1)]), ("none", "none")]:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from annlearn import _fastscan as f; print(f.fastscan_isa())",
            ],
            env=dict(os.environ, ANNLEARN_ISA=env, PYTHONPATH=REPO),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        assert out == expected


# -- quantized tables --------------------------------------------------------


def _quantize_reference(tables, base):
    M = tables.shape[2]
    vmax = min(255, 65535 // M)
    lo = tables.min(axis=3, keepdims=True)
    # One scale per (query, probe): its widest table's range.
    span = (tables.max(axis=3) - tables.min(axis=3)).max(axis=2)
    scale = np.ones_like(span)
    np.divide(np.float32(vmax), span, out=scale, where=span > 0)
    x = (tables - lo) * scale[:, :, None, None]
    q = np.rint(np.minimum(x, np.float32(vmax))).astype(np.uint8)
    bias = base.astype(np.float64) + lo[..., 0].astype(np.float64).sum(axis=2)
    return q, scale, bias.astype(np.float32)


@pytest.mark.parametrize("M", [1, 7, 64, 256, 300])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
def test_quantize_tables_reference_and_error_bound(rng, M, n_threads, isa):
    tables = rng.standard_normal((5, 3, M, 16)).astype(np.float32) * 3 + 1e3
    tables[1, 2] = 7.0  # flat tables of one probe
    tables[4] = 2.0  # a query whose tables are all flat
    base = rng.standard_normal((5, 3)).astype(np.float32)
    q, scale, bias = quantize_tables(tables, base, n_threads=n_threads, isa=isa)
    q_ref, scale_ref, bias_ref = _quantize_reference(tables, base)
    np.testing.assert_array_equal(scale, scale_ref)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_allclose(bias, bias_ref, rtol=1e-6)
    vmax = min(255, 65535 // M)
    flat = np.zeros((5, 3), dtype=bool)
    flat[1, 2] = flat[4] = True
    # Every probe's widest table spans the whole uint8 range; flat ones get
    # scale 1 and zero tables.
    assert q.max() <= vmax and (q.max(axis=(2, 3))[~flat] == vmax).all()
    assert (scale[flat] == 1).all() and not q[flat].any()
    # Error bound: each sum is off by at most M / 2 steps of 1 / scale.
    codes = rng.integers(0, 16, (50, M))
    exact = base[..., None] + tables[:, :, np.arange(M), codes].astype(np.float64).sum(
        axis=-1
    )
    approx = (
        bias[..., None]
        + q[:, :, np.arange(M), codes].astype(np.float64).sum(axis=-1)
        / scale[:, :, None]
    )
    bound = M / (2 * scale[:, :, None]) + 1e-6 * np.abs(exact) + 1e-4
    assert np.all(np.abs(approx - exact) <= bound)
    # ... and the bound is not loose by orders of magnitude: the typical
    # error is ~sqrt(M / 12) steps.
    steps = (np.abs(approx - exact) * scale[:, :, None])[:4]
    assert steps.max() > 0.1 * np.sqrt(M / 12)


@pytest.mark.parametrize("n_tables", [0, 1, 5])
@pytest.mark.parametrize("inner_product", [False, True])
@pytest.mark.parametrize("isa", ISAS)
def test_ivf_tables_equal_quantized_float_tables(rng, n_tables, inner_product, isa):
    n_queries, nprobe, M, dsub = 7, 3, 6, 5
    Q = rng.standard_normal((n_queries, M * dsub)).astype(np.float32)
    codebooks = rng.standard_normal((M, 16, dsub)).astype(np.float32)
    term2 = rng.standard_normal((n_tables, M, 16)).astype(np.float32)
    cells = rng.integers(0, 5, (n_queries, nprobe))
    cells[2, 1] = -1
    base = rng.standard_normal((n_queries, nprobe)).astype(np.float32)
    alpha = -1 if inner_product else -2
    term3 = alpha * np.einsum("qmd,mkd->qmk", Q.reshape(-1, M, dsub), codebooks)
    tables = np.repeat(term3[:, None], nprobe, axis=1)
    if n_tables == 1:
        tables += term2[0]
    elif n_tables > 1:
        tables += term2[cells]
    tables[cells < 0] = 0
    q_ref, scale_ref, bias_ref = quantize_tables(tables.astype(np.float32), base)
    q, scale, bias = _fastscan.ivf_tables(
        Q,
        np.ascontiguousarray(codebooks.transpose(0, 2, 1)),
        term2,
        cells,
        base,
        inner_product,
        2,
        isa,
    )
    # Every ISA gives the same bytes (only the table sums can differ from
    # numpy's).
    same = _fastscan.ivf_tables(
        Q,
        np.ascontiguousarray(codebooks.transpose(0, 2, 1)),
        term2,
        cells,
        base,
        inner_product,
        1,
        "none",
    )
    for a, b in zip(same, (q, scale, bias), strict=True):
        np.testing.assert_array_equal(a, b)
    # Float sums in another order: a table entry may round the other way.
    assert np.abs(q.astype(int) - q_ref).max() <= 1
    assert (q != q_ref).mean() < 0.01
    np.testing.assert_allclose(scale, scale_ref, rtol=1e-5)
    np.testing.assert_allclose(bias, bias_ref, rtol=1e-5, atol=1e-5)


def test_a_probes_tables_depend_on_its_cell_alone(rng):
    """One scale per probe: a cell's quantized tables, scale and bias are the
    same whichever other cells the query probes (what lets an index cut by
    cells build only its own cells' tables and rank as one index)."""
    n_queries, M, dsub, nlist = 6, 8, 4, 9
    Q = rng.standard_normal((n_queries, M * dsub)).astype(np.float32)
    codebooks_t = rng.standard_normal((M, dsub, 16)).astype(np.float32)
    term2 = rng.standard_normal((nlist, M, 16)).astype(np.float32)
    term2[3] *= 50  # a cell with much wider tables than the others
    others = np.delete(np.arange(nlist), 3)
    cells = np.stack([rng.permutation(others)[:4] for _ in range(n_queries)])
    cells[:, 0] = 3
    base = rng.standard_normal(cells.shape).astype(np.float32)
    whole = _fastscan.ivf_tables(Q, codebooks_t, term2, cells, base, False, 1)
    for p in range(1, 4):
        alone = _fastscan.ivf_tables(
            Q,
            codebooks_t,
            term2,
            cells[:, p : p + 1].copy(),
            base[:, p : p + 1].copy(),
            False,
            1,
        )
        for a, b in zip(alone, whole, strict=True):
            np.testing.assert_array_equal(a[:, 0], b[:, p])
    # The wide cell did not coarsen the others' steps.
    assert (whole[1][:, 1:] > 5 * whole[1][:, :1]).all()


def test_quantize_tables_validation():
    Q = np.zeros((2, 6), dtype=np.float32)
    cb = np.zeros((3, 2, 16), dtype=np.float32)
    cells, base = np.zeros((2, 4), dtype=np.int64), np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="Expected codebooks_t of shape"):
        _fastscan.ivf_tables(Q, cb[:, :, :8].copy(), cb[:0], cells, base, False, 1)
    with pytest.raises(ValueError, match="one term 2 per cell"):
        _fastscan.ivf_tables(
            Q, cb, np.zeros((2, 3, 16), np.float32), cells + 2, base, False, 1
        )
    with pytest.raises(ValueError, match="finite queries"):
        _fastscan.ivf_tables(Q + np.nan, cb, cb[:0], cells, base, False, 1)
    with pytest.raises(ValueError, match="Expected tables of shape"):
        quantize_tables(np.zeros((2, 3, 4), dtype=np.float32))
    tables = np.zeros((2, 1, 3, 16), dtype=np.float32)
    tables[1, 0, 2, 5] = np.nan
    with pytest.raises(ValueError, match="finite lookup tables"):
        quantize_tables(tables)
    with pytest.raises(ValueError, match="Expected base of shape"):
        quantize_tables(tables[:1], np.zeros((2, 1)))


# -- the IVF scan ------------------------------------------------------------


def _ivf_problem(
    rng, n_queries=13, M=6, sizes=(0, 33, 5, 64, 0, 100, 31, 1), nprobe=5, table_max=3
):
    """Lists with empty cells and partial last blocks, few distinct table
    values (many ties), probes with -1 holes."""
    sizes = np.asarray(sizes)
    nlist = len(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    codes = rng.integers(0, 16, (offsets[-1], M), dtype=np.uint8)
    packed, blocks = pack_lists(codes, offsets)
    qtables = rng.integers(0, table_max + 1, (n_queries, nprobe, M, 16)).astype(
        np.uint8
    )
    scale = rng.uniform(0.5, 4, (n_queries, nprobe)).astype(np.float32)
    bias = rng.integers(0, 4, (n_queries, nprobe)).astype(np.float32)
    cells = np.stack([rng.permutation(nlist)[:nprobe] for _ in range(n_queries)])
    cells[rng.random(cells.shape) < 0.2] = -1
    return dict(
        codes=codes,
        offsets=offsets,
        packed=packed,
        blocks=blocks,
        qtables=qtables,
        scale=scale,
        bias=bias,
        cells=cells.astype(np.int64),
    )


def _scan_reference(pb, k, allowed=None):
    """Brute force over the quantized tables, ties by position; ``allowed``
    (n_queries, n_rows) bool keeps only the allowed rows."""
    codes, offsets = pb["codes"], pb["offsets"]
    M = codes.shape[1]
    n_queries = pb["qtables"].shape[0]
    dist = np.full((n_queries, k), np.inf, dtype=np.float32)
    ids = np.full((n_queries, k), -1, dtype=np.int64)
    for q in range(n_queries):
        dists, positions = [], []
        for p, c in enumerate(pb["cells"][q]):
            if c < 0:
                continue
            rows = np.arange(offsets[c], offsets[c + 1])
            if allowed is not None:
                rows = rows[allowed[q, rows]]
            sums = pb["qtables"][q, p, np.arange(M), codes[rows]].astype(np.int64)
            sums = sums.sum(axis=1).astype(np.float32)
            dists.append(pb["bias"][q, p] + sums / pb["scale"][q, p])
            positions.append(rows)
        if not dists:
            continue
        dists, positions = np.concatenate(dists), np.concatenate(positions)
        order = np.lexsort((positions, dists))[:k]
        dist[q, : len(order)] = dists[order]
        ids[q, : len(order)] = positions[order]
    return dist, ids


def _scan(pb, k, n_threads=1, isa=None, collector=None, allowed=None):
    return ivf_fastscan(
        pb["qtables"],
        pb["scale"],
        pb["bias"],
        pb["cells"],
        pb["packed"],
        pb["blocks"],
        pb["offsets"],
        k,
        n_threads,
        isa,
        collector,
        allowed,
    )


@pytest.mark.parametrize("collector", ["heap", "buffer"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("fraction", [0.5, 0.05])
def test_ivf_fastscan_filter_equals_brute_force(rng, isa, collector, shared, fraction):
    """A filter in the packed layout (one 32-bit word per block) gives brute
    force over the allowed rows: disallowed lanes never pass, blocks with
    none allowed are skipped, the padding of last blocks stays out."""
    from annlearn._filter import FilterBlock
    from annlearn._invlists import InvertedLists

    pb = _ivf_problem(rng, M=6)
    n_rows, n_queries = len(pb["codes"]), len(pb["qtables"])
    mask = rng.random((1 if shared else n_queries, n_rows)) < fraction
    lists = InvertedLists(pb["offsets"], pb["codes"], np.arange(n_rows))
    block = FilterBlock(mask, mask.sum(1))
    words = block.slot_bitmap(lists.fastscan_slots(), 32 * len(pb["packed"]))
    D_ref, I_ref = _scan_reference(pb, 7, np.broadcast_to(mask, (n_queries, n_rows)))
    dist, ids = _scan(pb, 7, isa=isa, collector=collector, allowed=words)
    np.testing.assert_array_equal(ids, I_ref)
    np.testing.assert_array_equal(dist, D_ref)
    with pytest.raises(ValueError, match="Expected allowed of shape"):
        _scan(pb, 7, allowed=np.ascontiguousarray(words[:, 1:]))


@pytest.mark.parametrize("collector", ["heap", "buffer"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [1, 7, 40])
@pytest.mark.parametrize("M", [1, 6, 33])
def test_ivf_fastscan_equals_brute_force(rng, isa, k, M, collector):
    # Few distinct table values: many ties, also at the k-th distance, which
    # the buffer's compactions (every 2k + 32 candidates) must settle by
    # position as the heap does.
    pb = _ivf_problem(rng, M=M)
    D_ref, I_ref = _scan_reference(pb, k)
    dist, ids = _scan(pb, k, isa=isa, collector=collector)
    np.testing.assert_array_equal(ids, I_ref)
    np.testing.assert_array_equal(dist, D_ref)


def test_ivf_fastscan_wide_tables_and_large_bias(rng):
    # Full-range tables (few ties, the threshold prunes most blocks) and a
    # bias far from zero, where float32 rounding of the distance is coarse
    # and the threshold's slack matters.
    pb = _ivf_problem(rng, M=16, sizes=(500, 300, 0, 257), nprobe=3, table_max=255)
    pb["bias"] = pb["bias"] * 1e5 + 3e6
    for k in (1, 10):
        D_ref, I_ref = _scan_reference(pb, k)
        for isa, collector in itertools.product(ISAS, ["heap", "buffer"]):
            dist, ids = _scan(pb, k, isa=isa, collector=collector)
            np.testing.assert_array_equal(ids, I_ref)
            np.testing.assert_array_equal(dist, D_ref)


def test_ivf_fastscan_pads_when_fewer_rows_than_k(rng):
    pb = _ivf_problem(rng, sizes=(3, 0, 2), nprobe=3)
    pb["cells"][:] = [0, 1, 2]
    pb["cells"][0] = [-1, 1, -1]  # nothing probed at all
    dist, ids = _scan(pb, 8)
    D_ref, I_ref = _scan_reference(pb, 8)
    np.testing.assert_array_equal(ids, I_ref)
    np.testing.assert_array_equal(dist, D_ref)
    assert (ids[0] == -1).all() and np.isinf(dist[0]).all()
    assert (ids[1:, :5] >= 0).all() and (ids[1:, 5:] == -1).all()
    assert np.isinf(dist[1:, 5:]).all() and np.isfinite(dist[1:, :5]).all()


def test_buffer_collector_with_many_candidates(rng):
    # Long lists and k = 100: the buffer is compacted many times, with ties
    # and without, on every ISA; the automatic choice picks it from
    # HEAP_MAX_K on.
    pb = _ivf_problem(
        rng, n_queries=6, M=4, sizes=(700, 0, 450, 333), nprobe=3, table_max=7
    )
    k = max(100, _fastscan.HEAP_MAX_K)
    D_ref, I_ref = _scan_reference(pb, k)
    for isa in ISAS:
        for collector in ("buffer", None, "heap"):
            dist, ids = _scan(pb, k, isa=isa, collector=collector)
            np.testing.assert_array_equal(ids, I_ref)
            np.testing.assert_array_equal(dist, D_ref)
    with pytest.raises(ValueError, match="collector must be"):
        _scan(pb, k, collector="reservoir")


def test_ivf_fastscan_threads_identical(rng):
    pb = _ivf_problem(
        rng, n_queries=200, M=8, sizes=(400, 130, 0, 77, 260), nprobe=4, table_max=20
    )
    for collector in ("heap", "buffer"):
        D1, I1 = _scan(pb, 25, n_threads=1, collector=collector)
        D2, I2 = _scan(pb, 25, n_threads=2, collector=collector)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_array_equal(D1, D2)


def test_ivf_fastscan_overflow_and_validation(rng):
    pb = _ivf_problem(rng, M=3)
    pb["qtables"][2, 1, 0, 0] = 255  # 3 * 255 fits
    _scan(pb, 5)
    pb = _ivf_problem(rng, n_queries=2, M=258, nprobe=2, sizes=(10, 10))
    pb["cells"][:] = [0, 1]
    pb["qtables"][1, 1, 0, 0] = 255  # 258 * 255 does not (257 * 255 == 65535)
    with pytest.raises(ValueError, match="65535"):
        _scan(pb, 5)
    pb = _ivf_problem(rng)
    with pytest.raises(ValueError, match="k >= 1"):
        _scan(pb, 0)
    with pytest.raises(ValueError, match="probe_cells in"):
        _scan(dict(pb, cells=pb["cells"] + 100), 3)
    with pytest.raises(ValueError, match="same lists"):
        _scan(dict(pb, blocks=pb["blocks"] * 2), 3)
    with pytest.raises(ValueError, match="positive finite scale"):
        _scan(dict(pb, scale=-pb["scale"]), 3)
    with pytest.raises(ValueError, match="cannot run here|isa must be"):
        _scan(pb, 3, isa="avx1024")


def _clustered_ivf(rng, n=3000, d=32, M=16, nlist=8, n_queries=40):
    """A small by-residual IVF-PQ with 4-bit codes, fitted with numpy."""

    def kmeans(X, k, iters=10):
        C = X[rng.choice(len(X), k, replace=False)]
        for _ in range(iters):
            a = ((X[:, None] - C[None]) ** 2).sum(-1).argmin(1)
            C = np.stack(
                [X[a == j].mean(0) if (a == j).any() else C[j] for j in range(k)]
            )
        return C, a

    centers = rng.standard_normal((20, d)) * 4
    X = centers[rng.integers(0, 20, n)] + rng.standard_normal((n, d))
    Q = centers[rng.integers(0, 20, n_queries)] + rng.standard_normal((n_queries, d))
    coarse, assign = kmeans(X, nlist)
    order = np.argsort(assign, kind="stable")
    X, assign = X[order], assign[order]
    R = (X - coarse[assign]).reshape(n, M, d // M)
    codebooks, codes = zip(*(kmeans(R[:, m], 16) for m in range(M)), strict=True)
    codebooks, codes = np.stack(codebooks), np.stack(codes, 1).astype(np.uint8)
    offsets = np.searchsorted(assign, np.arange(nlist + 1)).astype(np.int64)
    return Q, coarse, codebooks, codes, offsets


def test_quantized_ranking_recall_on_clustered_data(rng):
    # The approximation of interest: ranking by the quantized tables against
    # ranking by the float tables (the 8-bit-style ADC of the same codes).
    Q, coarse, codebooks, codes, offsets = _clustered_ivf(rng)
    n_queries, d = Q.shape
    M = codebooks.shape[0]
    nprobe, k = 3, 10
    cells = np.argsort(((Q[:, None] - coarse[None]) ** 2).sum(-1), axis=1)[:, :nprobe]
    # tables[q, p, m, j] = ||q_m - c_m - codebook_m[j]||^2 (no term 1 needed).
    resid = (Q[:, None] - coarse[cells]).reshape(n_queries, nprobe, M, 1, d // M)
    tables = ((resid - codebooks[None, None]) ** 2).sum(-1).astype(np.float32)
    qt, scale, bias = quantize_tables(tables)
    packed, blocks = pack_lists(codes, offsets)
    dist, ids = ivf_fastscan(
        qt, scale, bias, cells.astype(np.int64), packed, blocks, offsets, k, 2
    )
    recalls = []
    for q in range(n_queries):
        rows = np.concatenate([np.arange(offsets[c], offsets[c + 1]) for c in cells[q]])
        where = np.repeat(np.arange(nprobe), np.diff(offsets)[cells[q]])
        exact = tables[q, where[:, None], np.arange(M), codes[rows]].sum(1)
        truth = rows[np.argsort(exact, kind="stable")[:k]]
        recalls.append(len(np.intersect1d(truth, ids[q])) / k)
        # The returned distances are within the error bound of the float ones.
        probe_of = dict(zip(rows, where, strict=True))
        probes = [probe_of[i] for i in ids[q]]
        got = tables[q, [[p] for p in probes], np.arange(M), codes[ids[q]]].sum(1)
        assert np.all(np.abs(dist[q] - got) <= M / (2 * scale[q, probes]) + 1e-3)
    assert np.mean(recalls) >= 0.9, np.mean(recalls)


def _fused_problem(rng, n_tables, n_queries=40, M=6, dsub=3, nlist=5, nprobe=3):
    """Queries, codebooks, term 2 and lists for ``ivf_fastscan_queries``:
    lists of 0 to 70 rows (empty lists, partial last blocks), repeated
    codes (ties), some skipped probes."""
    Q = rng.standard_normal((n_queries, M * dsub)).astype(np.float32)
    codebooks_t = rng.standard_normal((M, dsub, 16)).astype(np.float32)
    term2 = rng.standard_normal((n_tables, M, 16)).astype(np.float32)
    sizes = rng.integers(0, 70, nlist)
    sizes[1] = 0
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    codes = rng.integers(0, 4, (offsets[-1], M)).astype(np.uint8)
    packed, blocks = pack_lists(codes, offsets)
    cells = np.stack([rng.permutation(nlist)[:nprobe] for _ in range(n_queries)])
    cells[::7, 0] = -1
    base = rng.standard_normal((n_queries, nprobe)).astype(np.float32)
    tables = (Q, codebooks_t, term2, cells, base)
    return tables, (packed, blocks, offsets), codes


@pytest.mark.parametrize("n_tables", [0, 1, 5])
@pytest.mark.parametrize("inner_product", [False, True])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("collector", ["heap", "buffer"])
@pytest.mark.parametrize("k", [1, 10, 60])
def test_ivf_fastscan_queries_equal_tables_then_scan(
    rng, n_tables, inner_product, isa, collector, k
):
    """The fused scan builds each query's tables as ivf_tables does and
    scans them as ivf_fastscan does: the same distances and positions, bit
    for bit, on 1 and 2 threads."""
    tables, lists, _ = _fused_problem(rng, n_tables)
    qtables = _fastscan.ivf_tables(*tables, inner_product, 1, isa)
    expected = ivf_fastscan(*qtables, tables[3], *lists, k, 1, isa, collector)
    for n_threads in (1, 2):
        got = ivf_fastscan_queries(
            *tables, inner_product, *lists, k, n_threads, isa, collector
        )
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])
    assert (expected[1] >= 0).mean() > 0.5
    if k == 60:  # some queries probe fewer rows: padding
        assert (expected[1] == -1).any()


@pytest.mark.parametrize("n_tables", [0, 5])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("collector", ["heap", "buffer"])
@pytest.mark.parametrize("k", [1, 10, 60])
def test_ivf_fastscan_queries_bound(rng, n_tables, isa, collector, k):
    """From a bound, a query's candidates are the rows at most that far,
    those of a scan without one (ties at the bound included), k at most;
    the buffer may keep rows a little past it. +inf is no bound."""
    tables, lists, _ = _fused_problem(rng, n_tables)
    full_d, full_p = ivf_fastscan_queries(
        *tables, False, *lists, 200, 1, isa, collector
    )
    n_queries = len(full_d)
    # Bounds at a rank of the full answer (ties there on repeated codes),
    # between two distances, below every row, +inf, and the empty query's.
    pick = rng.integers(0, 12, n_queries)
    bound = full_d[np.arange(n_queries), pick].copy()
    bound[1::5] = np.nextafter(bound[1::5], -np.inf)
    bound[2::5] = full_d[2::5, 0] - 1.0
    bound[3::5] = np.inf
    for n_threads in (1, 2):
        d, p = ivf_fastscan_queries(
            *tables, False, *lists, k, n_threads, isa, collector, bound=bound
        )
        for q in range(n_queries):
            within = full_d[q] <= bound[q]
            n = min(int(within.sum()), k)
            np.testing.assert_array_equal(d[q, :n], full_d[q, :n])
            if collector == "heap":
                np.testing.assert_array_equal(p[q, :n], full_p[q, :n])
                assert np.isinf(d[q, n:]).all() and (p[q, n:] == -1).all()
            else:
                # Equal distances may come in another order of rows.
                assert set(p[q, :n]) <= set(full_p[q][full_d[q] == d[q, n - 1]]) | set(
                    full_p[q, :n]
                )
                assert (d[q, n:] > bound[q]).all() or n == k
    assert (bound[3::5] == np.inf).all()
    unbounded = ivf_fastscan_queries(*tables, False, *lists, k, 1, isa, collector)
    got = ivf_fastscan_queries(
        *tables, False, *lists, k, 1, isa, collector, bound=np.full(n_queries, np.inf)
    )
    np.testing.assert_array_equal(got[0], unbounded[0])
    np.testing.assert_array_equal(got[1], unbounded[1])
    with pytest.raises(ValueError, match="Expected bound of shape"):
        ivf_fastscan_queries(*tables, False, *lists, k, 1, bound=bound[:-1])
    with pytest.raises(ValueError, match="Expected bound of shape"):
        ivf_fastscan_queries(*tables, False, *lists, k, 1, bound=bound + np.nan)


@pytest.mark.parametrize("shared", [True, False])
def test_ivf_fastscan_queries_filter(rng, shared):
    from annlearn._filter import FilterBlock
    from annlearn._invlists import InvertedLists

    tables, lists, codes = _fused_problem(rng, 5)
    n_queries, n_rows = len(tables[0]), len(codes)
    mask = rng.random((1 if shared else n_queries, n_rows)) < 0.3
    inv = InvertedLists(lists[2], codes, np.arange(n_rows))
    words = FilterBlock(mask, mask.sum(1)).slot_bitmap(
        inv.fastscan_slots(), 32 * len(lists[0])
    )
    qtables = _fastscan.ivf_tables(*tables, False, 1)
    expected = ivf_fastscan(*qtables, tables[3], *lists, 7, 1, allowed=words)
    got = ivf_fastscan_queries(*tables, False, *lists, 7, 2, allowed=words)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    assert np.isin(got[1][got[1] >= 0], np.flatnonzero(mask.any(0))).all()


def test_ivf_fastscan_queries_edges_and_validation(rng):
    tables, lists, _ = _fused_problem(rng, 5)
    Q, codebooks_t, term2, cells, base = tables
    # No query, no probe.
    d, p = ivf_fastscan_queries(
        Q[:0], codebooks_t, term2, cells[:0], base[:0], False, *lists, 3, 1
    )
    assert d.shape == p.shape == (0, 3)
    d, p = ivf_fastscan_queries(
        Q,
        codebooks_t,
        term2,
        np.ascontiguousarray(cells[:, :0]),
        np.ascontiguousarray(base[:, :0]),
        False,
        *lists,
        3,
        1,
    )
    assert np.isinf(d).all() and (p == -1).all()
    with pytest.raises(ValueError, match="finite queries"):
        ivf_fastscan_queries(
            Q + np.nan, codebooks_t, term2, cells, base, False, *lists, 3, 1
        )
    with pytest.raises(ValueError, match="one term 2 per cell"):
        ivf_fastscan_queries(
            Q, codebooks_t, term2[:2], cells, base, False, *lists, 3, 1
        )
    with pytest.raises(ValueError, match="Expected k >= 1"):
        ivf_fastscan_queries(*tables, False, *lists, 0, 1)
    with pytest.raises(ValueError, match="Expected probe_cells in"):
        ivf_fastscan_queries(
            Q,
            codebooks_t,
            np.zeros((9, 6, 16), np.float32),
            cells + 4,
            base,
            False,
            *lists,
            3,
            1,
        )
    with pytest.raises(ValueError, match="collector must be"):
        ivf_fastscan_queries(*tables, False, *lists, 3, 1, collector="sort")


@pytest.mark.parametrize("fused", [False, True])
def test_ivf_fastscan_releases_the_gil(rng, fused):
    # A long scan (the portable kernel, ~0.3 s) in a thread must let the main
    # thread run meanwhile: with the GIL held, the main thread would stall
    # for the whole call.
    pb = _ivf_problem(rng, n_queries=200, M=32, sizes=(20000,) * 4, nprobe=4)
    pb["cells"][:] = np.arange(4)
    Q = rng.standard_normal((200, 64)).astype(np.float32)
    codebooks_t = rng.standard_normal((32, 2, 16)).astype(np.float32)
    term2 = np.zeros((0, 32, 16), np.float32)
    base = np.zeros((200, 4), np.float32)
    lists = (pb["packed"], pb["blocks"], pb["offsets"])
    window = []

    def work():
        window.append(time.perf_counter())
        if fused:
            ivf_fastscan_queries(
                Q, codebooks_t, term2, pb["cells"], base, False, *lists, 10, 1, "none"
            )
        else:
            _scan(pb, 10, isa="none")
        window.append(time.perf_counter())

    thread = threading.Thread(target=work)
    ticks = []
    thread.start()
    while thread.is_alive():
        time.sleep(0.001)
        ticks.append(time.perf_counter())
    thread.join()
    start, end = window
    inside = [t for t in ticks if start <= t <= end]
    gaps = np.diff([start, *inside, end])
    assert end - start > 0.05
    assert len(inside) > 10 and gaps.max() < (end - start) / 3, (
        end - start,
        gaps.max(),
    )


def test_docstring_examples_run():
    # pytest --doctest-modules does not collect compiled modules.
    import doctest

    result = doctest.testmod(_fastscan)
    assert result.attempted > 0 and result.failed == 0


def test_module_docstring_names_every_entry_point():
    for name in (
        "ivf_tables",
        "pack_codes",
        "unpack_codes",
        "pack_lists",
        "quantize_tables",
        "ivf_fastscan",
        "ivf_fastscan_queries",
    ):
        assert name in _fastscan.__doc__
        assert getattr(_fastscan, name).__doc__
