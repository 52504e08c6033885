"""``python -m annlearn``: index a data set, search it, print recall and speed.

Uses Fashion-MNIST when the Debian package ``dataset-fashion-mnist`` is
installed, generated clustered vectors otherwise.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    """Run the demo (see the module docstring)."""
    from sklearn.neighbors import NearestNeighbors

    from annlearn import FlatNeighbors
    from annlearn.datasets import load_fashion_mnist, make_embeddings
    from annlearn.metrics import recall_at_k

    parser = argparse.ArgumentParser(prog="python -m annlearn", description=__doc__)
    parser.add_argument(
        "--n-samples", type=int, default=None, help="database rows (default: all)"
    )
    parser.add_argument("--n-queries", type=int, default=10_000)
    parser.add_argument(
        "--recall-queries",
        type=int,
        default=500,
        help="queries whose recall is checked against scikit-learn",
    )
    parser.add_argument("--n-neighbors", type=int, default=10)
    args = parser.parse_args(argv)

    try:
        X, Q = load_fashion_mnist()
        name = "Fashion-MNIST"
    except FileNotFoundError:
        X = make_embeddings(60_000, 256, random_state=0)
        Q = make_embeddings(10_000, 256, random_state=1)
        name = "generated (install dataset-fashion-mnist for the real data)"
    X = X[: args.n_samples]
    Q = Q[: args.n_queries]
    k = args.n_neighbors

    start = time.perf_counter()
    index = FlatNeighbors(n_neighbors=k, n_jobs=-1).fit(X)
    build = time.perf_counter() - start
    index.kneighbors(Q[:100])  # warm-up
    start = time.perf_counter()
    distances, found = index.kneighbors(Q)
    search = time.perf_counter() - start

    # Only the first n_check queries have a reference answer, so only their
    # rows of the search result are scored (tie-fair: equal distances count).
    n_check = min(args.recall_queries, len(Q))
    exact = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(X)
    true_distances, truth = exact.kneighbors(Q[:n_check])
    recall = recall_at_k(
        truth,
        found[:n_check],
        true_distances=true_distances,
        pred_distances=distances[:n_check],
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
