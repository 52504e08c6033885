"""Sharded search on a dask LocalCluster against one process with as many threads.

annlearn.dask's DaskFlatNeighbors and DaskIVFPQNeighbors run on a
distributed.LocalCluster of 1 and then 2 worker processes of 1 thread each;
FlatNeighbors and IVFPQNeighbors run in this process with n_jobs equal to
the cluster's total threads (1, then 2), on the same data and queries.

    python benchmarks/bench_dask.py                      # both data sets
    python benchmarks/bench_dask.py --n-generated 2000000

Data: Fashion-MNIST (60,000 x 784, 10,000 queries, from
/usr/share/datasets/fashion-mnist) and generated clustered embeddings of 96
features (annlearn.datasets.make_embeddings; 200,000 rows by default,
--n-generated 2000000 for the 2M x 96 set, which takes several minutes per
configuration).

For every index and cluster size: build time (fit: for IVF-PQ, training on
the client and encoding on the workers) of both and their ratio; for every
query batch size, queries per second of both (every query searched in
batches of that size, one kneighbors call per batch), their ratio (sharded /
one process; the goal on a 2-core machine is at least 0.67 for batches of
10,000, i.e. sharded within 1.5x; the sharded estimators search each
batch as one block, query_block_size set to the batch size, unless
--query-block-size says otherwise: a batch of 10,000 is routed and searched
side by side on the workers), and the scheduler's overhead per batch
in milliseconds (the sharded time minus the local time, per call). A last
line per cluster gives the round trip of a one-query call. The sharded
answers are checked to be equal to the local ones (IVF-PQ: sharded over
the local index's quantizers).

dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which also fixes
glibc's mmap threshold at 128 KiB: every larger array is mapped afresh and
page-faulted in. annlearn's search tasks allocate from a pool of their own
(annlearn._utils._pool), so what is left to fault is dask's own buffers.
--mmap-threshold BYTES sets MALLOC_MMAP_THRESHOLD_ for the workers
(distributed.nanny.pre-spawn-environ), as the docs' Dask page suggests; the
default leaves dask's environment as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment, print_environment, print_table, write_json  # noqa: E402


def load(name: str, n_generated: int, n_queries: int):
    from annlearn.datasets import load_fashion_mnist, make_embeddings

    if name == "fashion-mnist":
        X, Q = load_fashion_mnist()
    else:
        X = make_embeddings(n_generated, 96, n_clusters=1000, random_state=0)
        Q = make_embeddings(n_queries, 96, n_clusters=1000, random_state=1)
    return np.ascontiguousarray(X), np.ascontiguousarray(Q[:n_queries])


def timed(fn, repeats: int, *args):
    """Best wall time of ``repeats`` calls ``fn(*args)``, and the last result."""
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def search_in_batches(index, Q: np.ndarray, batch: int):
    parts = [index.kneighbors(Q[s : s + batch]) for s in range(0, len(Q), batch)]
    return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


def run_index(kind, X, Q, args, n_workers, client):
    """Rows of the table for one index kind on one cluster."""
    from annlearn import FlatNeighbors, IVFPQNeighbors
    from annlearn.dask import DaskFlatNeighbors, DaskIVFPQNeighbors

    k, threads = args.k, n_workers
    if kind == "flat":
        local = FlatNeighbors(n_neighbors=k, n_jobs=threads)
        sharded = DaskFlatNeighbors(n_neighbors=k, n_jobs=1)
    else:
        nlist = args.nlist or int(4 * np.sqrt(len(X)))
        m = args.m or max(d for d in range(1, 33) if X.shape[1] % d == 0)
        params = dict(
            n_neighbors=k,
            nlist=nlist,
            nprobe=args.nprobe,
            n_subquantizers=m,
            refine_factor=args.refine_factor,
            random_state=0,
        )
        local = IVFPQNeighbors(**params, n_jobs=threads)
        sharded = DaskIVFPQNeighbors(**params, n_jobs=1)
    local_build, _ = timed(lambda: local.fit(X), 1)
    dask_build, _ = timed(lambda: sharded.fit(X, client=client), 1)
    if kind == "ivfpq":
        # The equality check needs the same quantizers.
        same = DaskIVFPQNeighbors(**params, n_jobs=1).fit(X, quantizers=local)
    else:
        same = sharded
    equal = all(
        np.array_equal(a, b)
        for a, b in zip(same.kneighbors(Q), local.kneighbors(Q), strict=True)
    )
    rows = []
    for batch in args.batches:
        n = min(len(Q), batch * args.max_calls)
        queries = Q[:n]
        sharded.set_params(query_block_size=args.query_block_size or max(batch, 1))
        t_local, _ = timed(search_in_batches, args.repeats, local, queries, batch)
        t_dask, _ = timed(search_in_batches, args.repeats, sharded, queries, batch)
        calls = -(-n // batch)
        rows.append(
            {
                "data": args.current_data,
                "index": kind,
                "workers": n_workers,
                "threads": threads,
                "build_local_s": local_build,
                "build_dask_s": dask_build,
                "build_ratio": local_build / dask_build,
                "batch": batch,
                "queries": n,
                "qps_local": n / t_local,
                "qps_dask": n / t_dask,
                "qps_ratio": t_local / t_dask,
                "overhead_ms": 1e3 * (t_dask - t_local) / calls,
                "equal": equal,
            }
        )
    one = Q[:1]
    t_one, _ = timed(lambda: sharded.kneighbors(one), 20)
    t_one_local, _ = timed(lambda: local.kneighbors(one), 20)
    print(
        f"{args.current_data} {kind} {n_workers} worker(s): one-query call "
        f"{1e3 * t_one:.2f} ms sharded, {1e3 * t_one_local:.2f} ms local; "
        f"same answers as one index: {equal}",
        flush=True,
    )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default="fashion-mnist,generated", help="comma-separated data sets"
    )
    parser.add_argument("--n-generated", type=int, default=200_000)
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workers", default="1,2", help="cluster sizes")
    parser.add_argument("--indexes", default="flat,ivfpq")
    parser.add_argument("--batches", default="100,1000,10000")
    parser.add_argument(
        "--max-calls", type=int, default=20, help="kneighbors calls per batch size"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--query-block-size",
        type=int,
        default=16384,
        help="the sharded estimators' query_block_size (the default 16384); 0: the "
        "batch size, one block per call",
    )
    parser.add_argument("--nlist", type=int, default=None, help="4 sqrt(n) if unset")
    parser.add_argument("--m", type=int, default=None, help="n_subquantizers")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--refine-factor", type=int, default=4)
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="MALLOC_MMAP_THRESHOLD_ of the workers in bytes; 0: dask's environment",
    )
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]

    import dask
    from distributed import Client, LocalCluster

    if args.mmap_threshold:
        key = "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_"
        dask.config.set({key: str(args.mmap_threshold)})
    print(f"# workers' MALLOC_MMAP_THRESHOLD_: {args.mmap_threshold or 'unset'}")
    env = environment()
    print_environment(env)
    rows = []
    for name in args.data.split(","):
        X, Q = load(name, args.n_generated, args.n_queries)
        args.current_data = f"{name} {len(X)}x{X.shape[1]}"
        for n_workers in [int(w) for w in args.workers.split(",")]:
            with (
                LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",
                ) as cluster,
                Client(cluster) as client,
            ):
                for kind in args.indexes.split(","):
                    rows += run_index(kind, X, Q, args, n_workers, client)
    columns = [
        ("data", "s"),
        ("index", "s"),
        ("workers", "d"),
        ("threads", "d"),
        ("build_local_s", ".2f"),
        ("build_dask_s", ".2f"),
        ("build_ratio", ".2f"),
        ("batch", "d"),
        ("queries", "d"),
        ("qps_local", ".0f"),
        ("qps_dask", ".0f"),
        ("qps_ratio", ".2f"),
        ("overhead_ms", ".1f"),
        ("equal", ""),
    ]
    print_table(rows, columns)
    path = write_json(
        "bench_dask", {"environment": env, "args": vars(args), "rows": rows}
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
