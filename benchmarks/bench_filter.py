"""Filtered search: recall@k and queries/s at 50%, 10%, 1%, 0.1% allowed.

Random subsets of Fashion-MNIST's 60,000 rows are allowed, one filter for
every query (and, for annlearn, one random filter per query in a second
table). Recall@k is measured against the exact answer *over the allowed
rows* (float64 brute force), so an index that returns disallowed ids or
misses allowed neighbours loses recall. In the same process:

- annlearn FlatNeighbors and IVFPQNeighbors (IVF256, 98 x 4-bit codes,
  refine_factor 4, nprobe 8) with ``kneighbors(Q, allowed=...)``;
- FAISS IndexFlatL2 and IVF256,PQ98x4fs,RFlat with an ``IDSelectorBitmap``
  (``SearchParameters(sel=...)``; through ``IndexRefineSearchParameters`` to
  the IVF's ``SearchParametersIVF(sel=..., nprobe=8)``, k_factor 4);
- hnswlib (M 16, efConstruction 200, ef 64) with its ``filter=`` callable,
  on the first ``--hnsw-queries`` queries only (the callable is Python, called
  for every visited node, one thread).

``--crossover`` times annlearn's alternative paths against each other where
its cost rules choose between them (benchmarks/README.md).

    OPENBLAS_CORETYPE=SkylakeX python benchmarks/bench_filter.py

(``OPENBLAS_CORETYPE`` for FAISS's bundled OpenBLAS only; see bench_frontier.)
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
from _common import (
    best_time,
    exact_ground_truth,
    load_data,
    print_table,
    start_with_peers,
    write_json,
)

FRACTIONS = (0.5, 0.1, 0.01, 0.001)


def filtered_truth(X, Q, k, keep):
    """Exact ids of the k nearest allowed rows (one mask for all queries)."""
    rows = np.flatnonzero(keep)
    _, ids = exact_ground_truth(X[rows], Q, k)
    return rows[ids]


def per_query_truth(X, Q, k, masks):
    """Exact ids of the k nearest allowed rows, one mask per query."""
    X64 = X.astype(np.float64)
    x_sq = np.einsum("ij,ij->i", X64, X64)
    ids = np.empty((len(Q), k), dtype=np.int64)
    for start in range(0, len(Q), 250):
        q = Q[start : start + 250].astype(np.float64)
        d = x_sq[None, :] - 2 * q @ X64.T
        d[~masks[start : start + 250]] = np.inf
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, axis=1), axis=1, kind="stable")
        ids[start : start + 250] = np.take_along_axis(part, order, axis=1)
    return ids


def recall(found, truth):
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(a[:k], b)) for a, b in zip(found, truth, strict=True))
    return hits / truth.size


def _ivf_index(X, k, threads):
    """annlearn's IVF256, 98 x 4-bit codes, refine_factor 4, nprobe 8."""
    from annlearn import IVFPQNeighbors

    return IVFPQNeighbors(
        n_neighbors=k,
        nlist=256,
        n_subquantizers=98,
        nbits=4,
        refine_factor=4,
        nprobe=8,
        random_state=0,
        n_jobs=threads,
    ).fit(X)


def annlearn_systems(X, k, threads):
    from annlearn import FlatNeighbors

    flat = FlatNeighbors(n_neighbors=k, n_jobs=threads).fit(X)
    ivf = _ivf_index(X, k, threads)
    return {
        "annlearn Flat": lambda Q, keep: flat.kneighbors(Q, allowed=keep)[1],
        "annlearn IVF256,PQ98x4,rf4 np8": lambda Q, keep: ivf.kneighbors(
            Q, allowed=keep
        )[1],
    }, (flat, ivf)


def faiss_systems(X, k, threads):
    import faiss

    faiss.omp_set_num_threads(threads)
    flat = faiss.IndexFlatL2(X.shape[1])
    flat.add(X)
    ivf = faiss.index_factory(X.shape[1], "IVF256,PQ98x4fs,RFlat")
    ivf.train(X)
    ivf.add(X)

    def selector(keep):
        bits = np.packbits(keep, bitorder="little")
        # The selector reads the bitmap: keep it alive with the selector.
        sel = faiss.IDSelectorBitmap(len(keep), faiss.swig_ptr(bits))
        sel.bits_ref = bits
        return sel

    def search_flat(Q, keep):
        return flat.search(Q, k, params=faiss.SearchParameters(sel=selector(keep)))[1]

    def search_ivf(Q, keep):
        base = faiss.SearchParametersIVF(sel=selector(keep), nprobe=8)
        params = faiss.IndexRefineSearchParameters(k_factor=4, base_index_params=base)
        return ivf.search(Q, k, params=params)[1]

    return {
        "faiss IndexFlatL2": search_flat,
        "faiss IVF256,PQ98x4fs,RFlat np8": search_ivf,
    }


def hnswlib_systems(X, k, threads):
    import hnswlib

    index = hnswlib.Index(space="l2", dim=X.shape[1])
    index.init_index(max_elements=len(X), ef_construction=200, M=16)
    index.set_num_threads(threads)
    index.add_items(X, np.arange(len(X)))
    index.set_ef(64)

    def search(Q, keep):
        return index.knn_query(Q, k=k, num_threads=1, filter=lambda i: bool(keep[i]))[
            0
        ].astype(np.int64)

    return {"hnswlib M16 ef64 filter=": search}


def crossover(X, Q, k, threads, fractions=(0.9, 0.7, 0.5, 0.3, 0.1)):
    """Time the paths annlearn's cost rules choose between."""
    from annlearn import FlatNeighbors, _flat_search, _ivfpq_codec
    from annlearn._filter import FilterBlock
    from annlearn._threads import effective_n_threads

    rows = []
    rng = np.random.default_rng(1)
    flat = FlatNeighbors(n_neighbors=k, n_jobs=threads).fit(X)
    store = flat._store
    n = len(X)
    n_threads = effective_n_threads(threads)
    # Shared filter: masked scan of every row vs the gathered rows.
    for n_q in (1, 16, 1000):
        Qs = np.ascontiguousarray(Q[:n_q])
        for s in fractions:
            keep = rng.random(n) < s
            block = FilterBlock(keep[None, :], np.full(n_q, keep.sum()))
            bitmap = block.bitmap()
            t_mask, _ = best_time(
                partial(store._search, Qs, k, "euclidean", n_threads, bitmap), 3
            )
            t_gather, _ = best_time(
                partial(store.gathered_search, Qs, k, "euclidean", n_threads, keep), 3
            )
            rows.append(
                dict(
                    case=f"Flat shared, {n_q} queries, {s:.0%}",
                    first=f"masked {t_mask * 1e3:.1f} ms",
                    second=f"gathered {t_gather * 1e3:.1f} ms",
                    ratio=t_mask / t_gather,
                )
            )
    # Per-query filter of m rows: exact distances to them vs the masked scan.
    Qs = np.ascontiguousarray(Q[:200])
    for m in (n // 4, n // 16, n // 64, n // 256):
        masks = np.zeros((len(Qs), n), dtype=bool)
        for i in range(len(Qs)):
            masks[i, rng.choice(n, m, replace=False)] = True
        block = FilterBlock(masks, masks.sum(1))
        indptr, cand = block.rows(np.arange(len(Qs)))
        bitmap = block.bitmap()
        t_direct, _ = best_time(
            partial(
                _flat_search.rows_kneighbors,
                Qs,
                store.vectors,
                indptr,
                cand,
                k,
                1,
                n_threads,
            ),
            2,
        )
        t_mask, _ = best_time(
            partial(store._search, Qs, k, "euclidean", n_threads, bitmap), 2
        )
        rows.append(
            dict(
                case=f"Flat per query, {m} rows = n/{n // m}",
                first=f"masked {t_mask * 1e3:.1f} ms",
                second=f"direct {t_direct * 1e3:.1f} ms",
                ratio=t_mask / t_direct,
            )
        )
    # IVF-PQ: the widened scan vs the exact distances to the allowed rows.
    ivf = _ivf_index(X, k, threads)
    Qs = np.ascontiguousarray(Q[:1000])
    saved = _ivfpq_codec._EXACT_COST
    for s in (0.1, 0.03, 0.01, 0.003, 0.001):
        keep = rng.random(n) < s
        keep[:k] = True
        try:
            _ivfpq_codec._EXACT_COST = 1e-30  # always exact
            t_exact, _ = best_time(partial(ivf.kneighbors, Qs, allowed=keep), 2)
            _ivfpq_codec._EXACT_COST = 1e30  # never exact
            t_scan, _ = best_time(partial(ivf.kneighbors, Qs, allowed=keep), 2)
        finally:
            _ivfpq_codec._EXACT_COST = saved
        rows.append(
            dict(
                case=f"IVF-PQ 4-bit, {s:.1%} allowed ({keep.sum()} rows)",
                first=f"widened scan {t_scan * 1e3:.1f} ms",
                second=f"exact {t_exact * 1e3:.1f} ms",
                ratio=t_scan / t_exact,
            )
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-queries", type=int, default=2000)
    parser.add_argument("--hnsw-queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--systems", default="annlearn,faiss,hnswlib", help="comma-separated"
    )
    parser.add_argument(
        "--crossover", action="store_true", help="time the cost rules' choices"
    )
    args = parser.parse_args(argv)
    systems = args.systems.split(",")
    env = start_with_peers(systems)
    X, Q = load_data("fashion-mnist", args.n_queries)
    k = args.k
    print(
        f"# data fashion-mnist: {X.shape[0]} x {X.shape[1]}, {len(Q)} queries "
        f"({min(args.hnsw_queries, len(Q))} for hnswlib), k={k}, "
        f"threads={args.threads}",
        flush=True,
    )
    if args.crossover:
        rows = crossover(X, Q, k, args.threads)
        print_table(
            rows, [("case", "s"), ("first", "s"), ("second", "s"), ("ratio", ".2f")]
        )
        return
    searches = {}
    annlearn_indexes = None
    if "annlearn" in systems:
        found, annlearn_indexes = annlearn_systems(X, k, args.threads)
        searches.update(found)
    if "faiss" in systems:
        searches.update(faiss_systems(X, k, args.threads))
    if "hnswlib" in systems:
        searches.update(hnswlib_systems(X, k, args.threads))
    rng = np.random.default_rng(0)
    rows = []
    for fraction in FRACTIONS:
        keep = rng.random(len(X)) < fraction
        truth = filtered_truth(X, Q, k, keep)
        for name, search in searches.items():
            n_q = args.hnsw_queries if name.startswith("hnswlib") else len(Q)
            Qs = np.ascontiguousarray(Q[:n_q])
            t, ids = best_time(partial(search, Qs, keep), args.repeats)
            ids = np.asarray(ids)
            leaked = int(np.count_nonzero((ids >= 0) & ~keep[np.maximum(ids, 0)]))
            row = dict(
                allowed=f"{fraction:.1%}",
                system=name,
                qps=n_q / t,
                recall=recall(ids, truth[:n_q]),
                disallowed=leaked,
                padded=int(np.count_nonzero(ids < 0)),
            )
            rows.append(row)
            print(
                f"#   {row['allowed']} {name}: {row['qps']:.0f} q/s, recall "
                f"{row['recall']:.4f}, disallowed {leaked}, padded {row['padded']}",
                flush=True,
            )
    columns = [
        ("allowed", "s"),
        ("system", "s"),
        ("qps", ".0f"),
        ("recall", ".4f"),
        ("disallowed", "d"),
        ("padded", "d"),
    ]
    print_table(rows, columns)
    per_query = []
    if annlearn_indexes is not None:
        flat, ivf = annlearn_indexes
        for fraction in FRACTIONS[1:]:
            masks = rng.random((len(Q), len(X))) < fraction
            masks[:, rng.choice(len(X), k, replace=False)] = True
            truth = per_query_truth(X, Q, k, masks)
            for name, index in (("annlearn Flat", flat), ("annlearn IVF", ivf)):
                t, ids = best_time(
                    partial(index.kneighbors, Q, allowed=masks, return_distance=False),
                    args.repeats,
                )
                ok = np.take_along_axis(masks, ids, axis=1).all()
                per_query.append(
                    dict(
                        allowed=f"{fraction:.1%} per query",
                        system=name,
                        qps=len(Q) / t,
                        recall=recall(ids, truth),
                        disallowed=0 if ok else -1,
                        padded=0,
                    )
                )
                print(
                    f"#   per query {fraction:.1%} {name}: {len(Q) / t:.0f} q/s, "
                    f"recall {per_query[-1]['recall']:.4f}",
                    flush=True,
                )
        print_table(per_query, columns)
    print(
        "results written to",
        write_json("filter", {"env": env, "rows": rows, "per_query": per_query}),
    )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"# {time.perf_counter() - start:.0f} s")
