"""k-means training: annlearn's Lloyd loop against scikit-learn's KMeans.

Both run in one process, on the same training data, from the same initial
centres (the rows annlearn draws), with the same max_iter, tol and thread
count: ``sklearn.cluster.KMeans(algorithm="lloyd", n_init=1, init=<rows>)``
under a threadpoolctl OpenMP limit, and annlearn's ``_lloyd`` with
``n_threads``. The cases are the trainings ``IVFPQNeighbors`` runs on
Fashion-MNIST:

- coarse-256, coarse-1024: the coarse quantizer, nlist cells on
  min(256 * max(nlist, 256), 60,000) rows of 784 features, max_iter 10;
- pq-8, pq-28: one PQ sub-quantizer, 256 centres on the residual
  sub-vectors (to a 256-cell coarse quantizer) of dsub = 8 or 28 features of
  the same rows, max_iter 25 (the middle sub-space, where the pixels vary).

    python benchmarks/bench_kmeans.py                  # environment as is
    OPENBLAS_CORETYPE=Haswell python benchmarks/bench_kmeans.py

Prints the environment, which GEMM each library runs (annlearn's packed
kernel or SciPy's sgemm; scikit-learn's k-means calls SciPy's sgemm with one
BLAS thread, through ``sklearn.utils._cython_blas``), then a table per case
and seed: best wall time of --repeats alternated runs of each library, the
inertia of each library's final centres (both evaluated by the same exact
search, summed in float64) and the iterations each ran. Then, per case, the
median, minimum and maximum over the paired runs of scikit-learn's time per
iteration over annlearn's, how many pairs annlearn won, and annlearn's
inertia relative to scikit-learn's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment, print_environment, print_table  # noqa: E402

CASES = ("coarse-256", "coarse-1024", "pq-8", "pq-28")


def blas_report() -> list[str]:
    """One line per library naming the GEMM its k-means runs."""
    import scipy
    from threadpoolctl import threadpool_info

    from annlearn._flat_search import DEFAULT_GEMM
    from annlearn._utils._packed_gemm import _simd_isa

    scipy_libs = os.path.dirname(os.path.abspath(scipy.__file__)) + ".libs"
    blas = [
        info
        for info in threadpool_info()
        if info["user_api"] == "blas" and info["filepath"].startswith(scipy_libs)
    ]
    if blas:
        scipy_blas = ", ".join(
            f"{info['internal_api']} {info['version']} kernel "
            f"{info.get('architecture') or '?'} ({os.path.basename(info['filepath'])})"
            for info in blas
        )
    else:
        scipy_blas = "not found by threadpoolctl"
    if DEFAULT_GEMM == "packed":
        ours = f"annlearn packed GEMM, {_simd_isa()} micro-kernel (no BLAS call)"
    else:
        ours = f"SciPy sgemm: {scipy_blas}"
    return [
        f"annlearn k-means assignment: {ours}",
        f"scikit-learn k-means assignment: SciPy sgemm, 1 BLAS thread: {scipy_blas}",
    ]


def training_sets(cases, seed: int, n_threads: int) -> dict:
    """(X, n_clusters, max_iter) of every case, on Fashion-MNIST."""
    from annlearn._clustering import train_kmeans
    from annlearn.datasets import load_fashion_mnist

    X, _ = load_fashion_mnist()
    X = np.ascontiguousarray(X)
    sets = {}
    for case in cases:
        if case.startswith("coarse-"):
            nlist = int(case.split("-")[1])
            n_train = min(256 * max(nlist, 256), len(X))
            rows = np.sort(np.random.RandomState(seed).choice(len(X), n_train, False))
            sets[case] = (np.ascontiguousarray(X[rows]), nlist, 10)
    pq_cases = [c for c in cases if c.startswith("pq-")]
    if pq_cases:
        centers, _, _ = train_kmeans(
            X, 256, max_iter=10, random_state=seed, n_threads=n_threads
        )
        residuals = X - centers[nearest(X, centers, n_threads)[1]]
        for case in pq_cases:
            dsub = int(case.split("-")[1])
            middle = (X.shape[1] // dsub) // 2
            sub = residuals[:, middle * dsub : (middle + 1) * dsub]
            sets[case] = (np.ascontiguousarray(sub), 256, 25)
    return sets


def nearest(X: np.ndarray, centers: np.ndarray, n_threads: int):
    """(squared distance, index) of the nearest centre of every row of X."""
    from annlearn._flat_search import METRIC_SQEUCLIDEAN, flat_kneighbors, row_sqnorms
    from annlearn._threads import flat_search_blas_guard

    centers = np.ascontiguousarray(centers, dtype=np.float32)
    sqnorms = row_sqnorms(centers, n_threads)
    with flat_search_blas_guard():
        distances, labels = flat_kneighbors(
            X, centers, sqnorms, 1, METRIC_SQEUCLIDEAN, n_threads
        )
    return distances[:, 0], labels[:, 0]


def inertia(X: np.ndarray, centers: np.ndarray, n_threads: int) -> float:
    """Sum of squared distances of the rows of X to their nearest centre."""
    return float(nearest(X, centers, n_threads)[0].sum(dtype=np.float64))


def run_case(X, n_clusters, max_iter, tol, seed, n_threads, repeats) -> dict:
    """Paired timings of both libraries from the initial rows of ``seed``."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from annlearn._clustering import _initial_centers, _lloyd

    init = _initial_centers(X, n_clusters, np.random.RandomState(seed))
    times = {"annlearn": [], "sklearn": []}
    result = {}
    for _ in range(max(1, repeats)):
        # The two alternate, so that a burst of load on the shared machine
        # hits both alike and the per-repeat ratios stay comparable.
        start = time.perf_counter()
        centers, _, n_iter = _lloyd(
            X,
            init.copy(),
            metric="sqeuclidean",
            max_iter=max_iter,
            tol=tol,
            n_threads=n_threads,
        )
        times["annlearn"].append(time.perf_counter() - start)
        result["annlearn"] = (centers, n_iter)
        with threadpool_limits(limits=n_threads, user_api="openmp"):
            start = time.perf_counter()
            km = KMeans(
                n_clusters,
                init=init,
                n_init=1,
                max_iter=max_iter,
                tol=tol,
                algorithm="lloyd",
                random_state=seed,
            ).fit(X)
            times["sklearn"].append(time.perf_counter() - start)
        result["sklearn"] = (km.cluster_centers_, km.n_iter_)
    row = {"seed": seed}
    for lib in ("annlearn", "sklearn"):
        centers, n_iter = result[lib]
        row[f"{lib}_s"] = min(times[lib])
        row[f"{lib}_inertia"] = inertia(X, centers, n_threads)
        row[f"{lib}_iter"] = n_iter
    row["ratios"] = [
        (sk / row["sklearn_iter"]) / (ours / row["annlearn_iter"])
        for sk, ours in zip(times["sklearn"], times["annlearn"], strict=True)
    ]
    row["inertia_diff"] = row["annlearn_inertia"] / row["sklearn_inertia"] - 1
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated among {CASES}"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of each library"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="paired runs per case and seed"
    )
    parser.add_argument(
        "--tol", type=float, default=1e-4, help="k-means tolerance of both"
    )
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[0, 1, 2],
        help="initial centres drawn with each seed (comma-separated)",
    )
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; expected some of {CASES}")

    import sklearn.cluster  # noqa: F401  (loads SciPy's BLAS before the report)

    import annlearn._clustering  # noqa: F401

    print_environment(environment())
    for line in blas_report():
        print(f"# {line}")
    sets = training_sets(cases, args.seeds[0], args.threads)
    rows = []
    for case in cases:
        X, n_clusters, max_iter = sets[case]
        for seed in args.seeds:
            row = run_case(
                X, n_clusters, max_iter, args.tol, seed, args.threads, args.repeats
            )
            row.update(case=case, shape=f"{X.shape[0]}x{X.shape[1]}", k=n_clusters)
            rows.append(row)
    print()
    print_table(
        rows,
        [
            ("case", "s"),
            ("shape", "s"),
            ("k", "d"),
            ("seed", "d"),
            ("annlearn_s", ".3f"),
            ("sklearn_s", ".3f"),
            ("annlearn_inertia", ".6g"),
            ("sklearn_inertia", ".6g"),
            ("annlearn_iter", "d"),
            ("sklearn_iter", "d"),
        ],
    )
    print()
    for case in cases:
        ratios = [r for row in rows if row["case"] == case for r in row["ratios"]]
        diffs = [100 * row["inertia_diff"] for row in rows if row["case"] == case]
        print(
            f"{case}: sklearn / annlearn time per iteration, median "
            f"{np.median(ratios):.2f}x (min {min(ratios):.2f}, max "
            f"{max(ratios):.2f}; annlearn faster in {sum(r > 1 for r in ratios)} "
            f"of {len(ratios)} paired runs); annlearn inertia vs "
            f"sklearn {np.mean(diffs):+.3f}% on average (min {min(diffs):+.3f}%, "
            f"max {max(diffs):+.3f}%, {len(diffs)} seeds)"
        )


if __name__ == "__main__":
    main()
