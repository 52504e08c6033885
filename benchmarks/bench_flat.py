"""Exact search: FlatNeighbors against FAISS IndexFlatL2 and scikit-learn.

annlearn.FlatNeighbors, FAISS ``IndexFlatL2`` and scikit-learn's brute force
run in one process, on the same data and threads.

    python benchmarks/bench_flat.py                         # environment as is
    env -u OPENBLAS_CORETYPE python benchmarks/bench_flat.py  # OpenBLAS autodetects

Prints the environment, a table (build s, batch queries/s, effective GFLOP/s,
single-query p50/p99 latency, recall@k), numpy's float32 GEMM GFLOP/s
measured in the same run, and the ratios the foundation issue asks for.

"Effective" GFLOP/s count the 2 * n_queries * n_samples * n_features flops of
brute force for every system. FlatNeighbors' default search
(``algorithm="auto"``, the principal-component bound on Fashion-MNIST) does
fewer, so its figure can exceed the machine's peak; the
``algorithm="brute"`` row measures the GEMM kernel alone.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    best_time,
    environment,
    exact_ground_truth,
    latencies_us,
    load_data,
    numpy_gemm_gflops,
    print_environment,
    print_table,
    publish,
    recall_at_k,
    tie_aware_recall,
    write_json,
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", choices=["fashion-mnist", "random"], default="fashion-mnist"
    )
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--sklearn-queries", type=int, default=2000)
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="also copy the results to doc/_static/benchmarks/flat-latest.json "
        "(the doc site's benchmark page shows them)",
    )
    args = parser.parse_args(argv)

    from annlearn import FlatNeighbors

    env = environment()
    print_environment(env)
    X, Q = load_data(args.data, args.n_queries)
    n, d = X.shape
    k = args.k
    print(
        f"# data {args.data}: database {n} x {d}, {len(Q)} queries, k={k}, "
        f"threads={args.threads}"
    )

    true_dist, true_ids = exact_ground_truth(X, Q, k)
    Q_lat = Q[: args.latency_queries]
    rows = []

    def measure(name, build, search, n_queries=None):
        build_s, index = best_time(build, 1)
        n_queries = len(Q) if n_queries is None else n_queries
        Qb = Q[:n_queries]
        seconds, found = best_time(lambda: search(index, Qb), args.repeats)
        lat = latencies_us(lambda q: search(index, q), Q_lat)
        row = {
            "system": name,
            "build_s": build_s,
            "qps": len(Qb) / seconds,
            "gflops": 2.0 * len(Qb) * n * d / seconds / 1e9,
            "p50_us": float(np.percentile(lat, 50)),
            "p99_us": float(np.percentile(lat, 99)),
            "recall": recall_at_k(found, true_ids[:n_queries]),
            "recall_tie": tie_aware_recall(found, X, Qb, true_dist[:n_queries]),
            "n_queries": len(Qb),
        }
        rows.append(row)
        print(f"#   measured {name}: {row['qps']:.0f} queries/s", flush=True)
        return row

    for metric, algorithm in (
        ("sqeuclidean", "auto"),
        ("euclidean", "auto"),
        ("sqeuclidean", "brute"),
    ):
        name = metric if algorithm == "auto" else f"{metric}, algorithm='brute'"
        measure(
            f"annlearn FlatNeighbors({name})",
            lambda m=metric, a=algorithm: FlatNeighbors(
                n_neighbors=k, metric=m, algorithm=a, n_jobs=args.threads
            ).fit(X),
            lambda index, q: index.kneighbors(q, return_distance=False),
        )

    import faiss

    faiss.omp_set_num_threads(args.threads)

    def faiss_build():
        index = faiss.IndexFlatL2(d)
        index.add(X)
        return index

    measure("faiss IndexFlatL2", faiss_build, lambda index, q: index.search(q, k)[1])

    if not args.skip_sklearn:
        from sklearn.neighbors import NearestNeighbors

        measure(
            "sklearn NearestNeighbors(brute)",
            lambda: NearestNeighbors(
                n_neighbors=k, algorithm="brute", n_jobs=args.threads
            ).fit(X),
            lambda index, q: index.kneighbors(q, return_distance=False),
            n_queries=min(args.sklearn_queries, len(Q)),
        )

    gemm = numpy_gemm_gflops(m=4096, n=n, k=d)
    print()
    print_table(
        rows,
        [
            ("system", "s"),
            ("build_s", ".2f"),
            ("qps", ".0f"),
            ("gflops", ".1f"),
            ("p50_us", ".0f"),
            ("p99_us", ".0f"),
            ("recall", ".4f"),
            ("recall_tie", ".4f"),
            ("n_queries", "d"),
        ],
    )
    print(
        f"\nnumpy float32 GEMM (4096 x {d} @ {d} x {n}), same run: {gemm:.1f} GFLOP/s"
    )

    by_name = {row["system"]: row for row in rows}
    ours = by_name["annlearn FlatNeighbors(sqeuclidean)"]
    faiss_row = by_name["faiss IndexFlatL2"]
    ratios = {"batch QPS / faiss IndexFlatL2": ours["qps"] / faiss_row["qps"]}
    if "sklearn NearestNeighbors(brute)" in by_name:
        sk = by_name["sklearn NearestNeighbors(brute)"]
        ratios["batch QPS / sklearn brute"] = ours["qps"] / sk["qps"]
    ratios["p50 latency / faiss IndexFlatL2 p50"] = ours["p50_us"] / faiss_row["p50_us"]
    ratios["effective GFLOP/s / numpy GEMM"] = ours["gflops"] / gemm
    brute = by_name.get("annlearn FlatNeighbors(sqeuclidean, algorithm='brute')")
    if brute is not None:
        ratios["brute-force kernel: QPS / faiss"] = brute["qps"] / faiss_row["qps"]
        ratios["brute-force kernel: GFLOP/s / numpy"] = brute["gflops"] / gemm
    print("\nratios (annlearn FlatNeighbors(sqeuclidean) / peer, same run):")
    for name, value in ratios.items():
        print(f"  {name:<37}: {value:.2f}")
    path = write_json(
        "flat",
        {
            "args": vars(args),
            "environment": env,
            "rows": rows,
            "numpy_gemm_gflops": gemm,
            "ratios": ratios,
        },
    )
    print(f"\nresults written to {path}")
    if args.publish:
        for target in publish("flat", path):
            print(f"published {target}")


if __name__ == "__main__":
    main()
