"""The recall/speed frontier: annlearn's indexes against every peer, one run.

Each system runs over its parameter grid in this one process, on the same
data and threads. For every recall@10 level (0.90, 0.95, 0.99) the table gives
each system's best batch queries/s among the configurations reaching it, and
the ratio of annlearn's best to the best peer's. Ratios, not absolute times,
are what compares: the machine is noisy between runs.

    OPENBLAS_CORETYPE=SkylakeX python benchmarks/bench_frontier.py

FAISS's bundled OpenBLAS picks its SSE3 "Prescott" kernel on CPUs it does not
know, which halves its flat search: set ``OPENBLAS_CORETYPE`` to the kernel
the CPU supports for this benchmark process (the header prints which kernel
each library runs). Peers: faiss-cpu (IVF-PQ + RefineFlat, IVF-PQ fast scan +
RFlat), hnswlib; install them with the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import (
    best_time,
    environment,
    exact_ground_truth,
    load_data,
    print_environment,
    print_table,
    tie_aware_recall,
    write_json,
)

LEVELS = (0.90, 0.95, 0.99)


def annlearn_points(X, Q, k, threads, repeats, quick):
    from annlearn import FlatNeighbors, IVFPQNeighbors

    points = []
    start = time.perf_counter()
    flat = FlatNeighbors(n_neighbors=k, n_jobs=threads).fit(X)
    build = time.perf_counter() - start
    t, (_, ids) = best_time(lambda: flat.kneighbors(Q), repeats)
    points.append(("annlearn-Flat", "FlatNeighbors(auto)", build, len(Q) / t, ids))
    codes = [(28, 8), (98, 4)] if quick else [(28, 8), (56, 4), (98, 4), (196, 4)]
    grid = [(4, 4), (8, 4), (8, 8), (16, 8), (16, 16), (32, 16), (32, 32)]
    for nlist in (256,) if quick else (256, 1024):
        for m, nbits in codes:
            start = time.perf_counter()
            index = IVFPQNeighbors(
                n_neighbors=k,
                nlist=nlist,
                n_subquantizers=m,
                nbits=nbits,
                refine_factor=4,
                random_state=0,
                n_jobs=threads,
            ).fit(X)
            build = time.perf_counter() - start
            for nprobe, refine in grid:
                index.set_params(nprobe=nprobe, refine_factor=refine)
                t, (_, ids) = best_time(
                    lambda index=index: index.kneighbors(Q), repeats
                )
                name = f"IVF{nlist},PQ{m}x{nbits},refine nprobe={nprobe} rf={refine}"
                points.append(("annlearn-IVFPQ", name, build, len(Q) / t, ids))
    return points


def faiss_points(X, Q, k, threads, repeats, quick):
    import faiss

    faiss.omp_set_num_threads(threads)
    points = []
    grid = [(4, 4), (8, 8), (16, 8), (16, 16), (32, 16), (32, 32), (64, 32)]
    factories = ["IVF256,PQ56x4fs,RFlat", "IVF256,PQ28x8,RFlat"]
    if not quick:
        factories += ["IVF1024,PQ56x4fs,RFlat", "IVF256,PQ98x4fs,RFlat"]
    for factory in factories:
        start = time.perf_counter()
        index = faiss.index_factory(X.shape[1], factory)
        index.train(X)
        index.add(X)
        build = time.perf_counter() - start
        ivf = faiss.extract_index_ivf(index)
        for nprobe, refine in grid:
            ivf.nprobe = nprobe
            index.k_factor = refine
            t, (_, ids) = best_time(lambda index=index: index.search(Q, k), repeats)
            name = f"{factory} nprobe={nprobe} k_factor={refine}"
            points.append(("faiss", name, build, len(Q) / t, ids))
    return points


def hnswlib_points(X, Q, k, threads, repeats, quick):
    import hnswlib

    points = []
    for m in (16,) if quick else (16, 32):
        start = time.perf_counter()
        index = hnswlib.Index(space="l2", dim=X.shape[1])
        index.init_index(max_elements=len(X), ef_construction=200, M=m)
        index.set_num_threads(threads)
        index.add_items(X, np.arange(len(X)))
        build = time.perf_counter() - start
        for ef in (10, 20, 40, 80, 160, 320):
            index.set_ef(max(ef, k))
            t, (ids, _) = best_time(
                lambda index=index: index.knn_query(Q, k=k), repeats
            )
            name = f"HNSW M={m} efC=200 ef={ef}"
            points.append(("hnswlib", name, build, len(Q) / t, ids.astype(np.int64)))
    return points


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default="fashion-mnist", choices=["fashion-mnist", "random"]
    )
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument(
        "--systems", default="annlearn,faiss,hnswlib", help="comma-separated"
    )
    args = parser.parse_args(argv)
    # The peers are imported first, so that the header lists the BLAS each
    # one loaded and the kernel it runs.
    systems = args.systems.split(",")
    for name in ("faiss", "hnswlib"):
        if name in systems:
            __import__(name)
    env = environment()
    print_environment(env)
    X, Q = load_data(args.data, args.n_queries)
    true_dist, _ = exact_ground_truth(X, Q, args.k)
    print(
        f"# data {args.data}: {X.shape[0]} x {X.shape[1]}, {len(Q)} queries, "
        f"k={args.k}, threads={args.threads}"
    )
    runners = {
        "annlearn": annlearn_points,
        "faiss": faiss_points,
        "hnswlib": hnswlib_points,
    }
    rows = []
    for system in systems:
        for family, name, build, qps, ids in runners[system](
            X, Q, args.k, args.threads, args.repeats, args.quick
        ):
            recall = tie_aware_recall(ids, X, Q, true_dist)
            rows.append(
                dict(system=family, config=name, build_s=build, qps=qps, recall=recall)
            )
            print(
                f"#   {family} {name}: {qps:.0f} q/s, recall {recall:.4f}", flush=True
            )
    summary = []
    for level in LEVELS:
        best = {}
        for row in rows:
            if row["recall"] >= level and row["qps"] > best.get(row["system"], {}).get(
                "qps", 0
            ):
                best[row["system"]] = row
        ours = max(
            (r for s, r in best.items() if s.startswith("annlearn")),
            key=lambda r: r["qps"],
            default=None,
        )
        peer = max(
            (r for s, r in best.items() if not s.startswith("annlearn")),
            key=lambda r: r["qps"],
            default=None,
        )
        for row in sorted(best.values(), key=lambda r: -r["qps"]):
            summary.append(dict(level=level, **row))
        if ours and peer:
            print(
                f"# recall@{args.k} >= {level}: annlearn {ours['qps']:.0f} "
                f"({ours['config']}) / best peer {peer['qps']:.0f} "
                f"({peer['system']} {peer['config']}) = "
                f"{ours['qps'] / peer['qps']:.2f}x"
            )
    print_table(
        summary,
        [
            ("level", ".2f"),
            ("system", "s"),
            ("config", "s"),
            ("qps", ".0f"),
            ("recall", ".4f"),
            ("build_s", ".1f"),
        ],
    )
    print("results written to", write_json("frontier", {"env": env, "rows": rows}))


if __name__ == "__main__":
    main()
