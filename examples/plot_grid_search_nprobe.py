"""
====================================================
Tuning nlist and nprobe with GridSearchCV
====================================================

``GridSearchCV`` fits each candidate ``IVFPQNeighbors`` on the training split
(the database) and scores it on the held-out split (the queries), on recall@10
against exact search and on queries/second. ``memory`` lets candidates that
differ only in ``nprobe`` share one training; ``fastest_above`` refits the
fastest candidate reaching the target recall. The plot shows recall against
speed for every candidate, with the Pareto front marked.
"""

import argparse
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _data import load  # noqa: E402
from sklearn.model_selection import GridSearchCV, ShuffleSplit  # noqa: E402

from annlearn import IVFPQNeighbors  # noqa: E402
from annlearn.metrics import qps_scorer, recall_scorer  # noqa: E402
from annlearn.model_selection import (  # noqa: E402
    fastest_above,
    ivfpq_param_grid,
    suggest_nprobe,
)


def pareto_front(recall, qps):
    """Indices of the candidates no other one beats on both recall and speed."""
    order = np.argsort(-qps)
    front, best = [], -np.inf
    for i in order:
        if recall[i] > best:
            front.append(i)
            best = recall[i]
    return np.array(front)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--test-size", type=int, default=2_000)
    parser.add_argument("--target-recall", type=float, default=0.6)
    parser.add_argument(
        "--output",
        default=os.path.join(tempfile.gettempdir(), "annlearn_grid_search_nprobe.png"),
        help="where to write the plot (default: the temporary directory)",
    )
    # Quantizers trained on 10,000 rows (39 per centre for 256 cells or
    # 2**8 codes): under a minute on two cores.
    parser.add_argument("--n-subquantizers", type=int, default=28)
    parser.add_argument("--nbits", type=int, default=8)
    parser.add_argument("--max-train-samples", type=int, default=10_000)
    args = parser.parse_args(argv)
    pq = dict(
        n_subquantizers=args.n_subquantizers,
        nbits=args.nbits,
        max_train_samples=args.max_train_samples,
    )
    X, _ = load(args.n_train, 0)
    # ivfpq_param_grid(n_samples) proposes nlist from the number of samples
    # (sqrt(n) to 16 sqrt(n), at least 39 points per cell); here, two cell
    # counts around it, each with four nprobe values from suggest_nprobe.
    grid = [
        {"nlist": [nlist], "nprobe": suggest_nprobe(nlist, 4)} for nlist in (64, 256)
    ]
    print("ivfpq_param_grid would propose:", ivfpq_param_grid(len(X)))

    with tempfile.TemporaryDirectory() as cache:
        search = GridSearchCV(
            IVFPQNeighbors(n_neighbors=10, random_state=0, memory=cache, **pq),
            grid,
            scoring={"recall": recall_scorer, "qps": qps_scorer},
            refit=fastest_above(recall=args.target_recall),
            cv=ShuffleSplit(n_splits=1, test_size=args.test_size, random_state=0),
        ).fit(X)

    res = search.cv_results_
    recall, qps = res["mean_test_recall"], res["mean_test_qps"]
    for params, r, q in zip(res["params"], recall, qps, strict=True):
        print(
            f"nlist={params['nlist']:5d} nprobe={params['nprobe']:4d}: "
            f"recall@10 {r:.4f}, {q:8.0f} queries/s"
        )
    print(f"fastest with recall >= {args.target_recall}: {search.best_params_}")

    fig, ax = plt.subplots(figsize=(6, 4))
    for nlist in sorted({p["nlist"] for p in res["params"]}):
        mask = np.array([p["nlist"] == nlist for p in res["params"]])
        ax.plot(recall[mask], qps[mask], "o-", label=f"nlist={nlist}")
    front = pareto_front(recall, qps)
    ax.plot(recall[front], qps[front], "k--", lw=1, label="Pareto front")
    ax.plot(
        recall[search.best_index_],
        qps[search.best_index_],
        "r*",
        ms=14,
        label="refit: fastest_above",
    )
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries / second")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"plot written to {args.output}")


if __name__ == "__main__":
    main()
