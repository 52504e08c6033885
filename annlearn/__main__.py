"""``python -m annlearn``: index a data set, search it, print recall and speed.

Uses Fashion-MNIST when the Debian package ``dataset-fashion-mnist`` is
installed, generated clustered vectors otherwise.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    """Run the demo (see the module docstring)."""
    from sklearn.neighbors import NearestNeighbors

    from annlearn import FlatNeighbors
    from annlearn.datasets import load_fashion_mnist, make_embeddings

    parser = argparse.ArgumentParser(prog="python -m annlearn", description=__doc__)
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument("--recall-queries", type=int, default=500)
    parser.add_argument("--n-neighbors", type=int, default=10)
    args = parser.parse_args(argv)

    try:
        X, Q = load_fashion_mnist()
        name = "Fashion-MNIST"
    except FileNotFoundError:
        X = make_embeddings(60_000, 256, random_state=0)
        Q = make_embeddings(10_000, 256, random_state=1)
        name = "generated (install dataset-fashion-mnist for the real data)"
    Q = Q[: args.n_queries]
    k = args.n_neighbors

    start = time.perf_counter()
    index = FlatNeighbors(n_neighbors=k, n_jobs=-1).fit(X)
    build = time.perf_counter() - start
    index.kneighbors(Q[:100])  # warm-up
    start = time.perf_counter()
    _, found = index.kneighbors(Q)
    search = time.perf_counter() - start

    n_check = min(args.recall_queries, len(Q))
    exact = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(X)
    truth = exact.kneighbors(Q[:n_check], return_distance=False)
    recall = np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]
    )

    rows = [
        ("dataset", name),
        ("database", f"{X.shape[0]} x {X.shape[1]}"),
        ("queries", str(len(Q))),
        ("index", "FlatNeighbors (exact)"),
        ("build s", f"{build:.2f}"),
        ("queries/s", f"{len(Q) / search:,.0f}"),
        (f"recall@{k}", f"{recall:.4f} (vs scikit-learn brute, {n_check} queries)"),
    ]
    width = max(len(r[0]) for r in rows)
    for key, value in rows:
        print(f"{key:>{width}} : {value}")


if __name__ == "__main__":
    main()
