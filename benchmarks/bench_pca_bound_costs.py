"""Fit the cost model behind FlatNeighbors' algorithm="auto".

``annlearn/_pca_bound.py`` keeps the principal-component bound only where a
cost model says it beats brute force. This script times both searches side
by side on data of several spectra and numbers of features, forcing the
bound on 16, 32 and 64 axes, records the survivor share the model estimates
for each, and fits the model's three constants (per-pair, projected-column
and per-survivor-feature costs) by non-negative least squares. It prints the
fitted constants next to those in use, and each measured time ratio next to
the ratio the constants in use predict.

    python benchmarks/bench_pca_bound_costs.py               # generated data
    python benchmarks/bench_pca_bound_costs.py --fashion     # and Fashion-MNIST

Run it on a quiet machine: the ratios are of two searches in one process,
but a loaded machine inflates the fixed costs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import environment, load_data, print_environment
from scipy.optimize import nnls

from annlearn import FlatNeighbors, _pca_bound


def power_law(rng, n, d, alpha, n_centres=50):
    """Clustered rows whose i-th principal variance is ``i ** -alpha``."""
    scale = np.sqrt(np.arange(1, d + 1) ** -alpha)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    X = (rng.standard_normal((n, d)) * scale) @ basis
    centres = (rng.standard_normal((n_centres, d)) * scale) @ basis
    return (X + centres[rng.integers(0, n_centres, n)]).astype(np.float32)


def low_rank(rng, n, d, rank=8, noise=0.05):
    """Rows whose variance sits in ``rank`` directions, plus noise."""
    basis = rng.standard_normal((rank, d))
    X = rng.standard_normal((n, rank)) * np.linspace(3, 1, rank) @ basis
    return (X + noise * rng.standard_normal((n, d))).astype(np.float32)


def data_sets(fashion: bool, n_queries: int):
    rng = np.random.default_rng(0)
    sets = {}
    for alpha in (0.8, 1.2, 2.0):
        X = power_law(rng, 60_000 + n_queries, 384, alpha)
        sets[f"power law {alpha}, 384-d"] = (X[n_queries:], X[:n_queries])
    X = low_rank(rng, 20_000 + n_queries, 96)
    sets["low rank, 96-d"] = (X[n_queries:], X[:n_queries])
    X = low_rank(rng, 12_000 + n_queries, 256)
    sets["low rank, 256-d"] = (X[n_queries:], X[:n_queries])
    if fashion:
        sets["fashion-mnist"] = load_data("fashion-mnist", n_queries)
    return sets


def measure(sets, repeats: int, threads: int) -> list[dict]:
    shares = []
    survivor_share = _pca_bound._survivor_share

    def recorded(*args):
        shares.append(survivor_share(*args))
        return shares[-1]

    _pca_bound._survivor_share = recorded
    dims_in_use = _pca_bound._CANDIDATE_DIMS
    rows = []
    try:
        for name, (X, Q) in sets.items():
            brute = FlatNeighbors(n_neighbors=10, algorithm="brute", n_jobs=threads)
            brute.fit(X)
            for d1 in (16, 32, 64):
                if d1 > X.shape[1] // 4:
                    continue
                _pca_bound._CANDIDATE_DIMS = (d1,)
                bound = FlatNeighbors(
                    n_neighbors=10, algorithm="pca_bound", n_jobs=threads
                ).fit(X)
                times = {id(brute): [], id(bound): []}
                for _ in range(repeats):
                    for est in (brute, bound):
                        start = time.perf_counter()
                        est.kneighbors(Q)
                        times[id(est)].append(time.perf_counter() - start)
                ratio = min(times[id(bound)]) / min(times[id(brute)])
                rows.append(
                    dict(
                        name=name,
                        n=len(X),
                        d=X.shape[1],
                        d1=d1,
                        share=shares[-1],
                        ratio=ratio,
                    )
                )
                print(
                    f"# {name}: {d1} axes, survivor share {shares[-1]:.4f}, "
                    f"time bound / brute {ratio:.3f}",
                    flush=True,
                )
    finally:
        _pca_bound._survivor_share = survivor_share
        _pca_bound._CANDIDATE_DIMS = dims_in_use
    return rows


def predicted(row, pair, projected, exact) -> float:
    bound = projected * (row["d1"] + 1) + row["share"] * exact * row["d"]
    return (pair + bound) / (pair + row["d"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fashion", action="store_true", help="add Fashion-MNIST")
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print_environment(environment())
    rows = measure(data_sets(args.fashion, args.n_queries), args.repeats, args.threads)
    # ratio * (pair + d) = pair + projected * (d1 + 1) + share * exact * d is
    # linear in the three constants; relative errors (rows divided by d).
    A = np.array([[1 - r["ratio"], r["d1"] + 1, r["share"] * r["d"]] for r in rows])
    b = np.array([r["ratio"] * r["d"] for r in rows])
    weights = 1.0 / np.array([r["d"] for r in rows])
    fitted, _ = nnls(A * weights[:, None], b * weights)
    in_use = (_pca_bound._PAIR_COST, _pca_bound._PROJECTED_COST, _pca_bound._EXACT_COST)
    names = ("_PAIR_COST", "_PROJECTED_COST", "_EXACT_COST")
    for name, new, old in zip(names, fitted, in_use, strict=True):
        print(f"# {name}: fitted {new:.4g}, in use {old:.4g}")
    print("| data | axes | survivor share | measured | predicted (in use) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['d1']} | {r['share']:.4f} | {r['ratio']:.3f} "
            f"| {predicted(r, *in_use):.3f} |"
        )


if __name__ == "__main__":
    main()
