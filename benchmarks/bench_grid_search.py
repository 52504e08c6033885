"""GridSearchCV over nlist x nprobe: its cost with and without a training cache.

The cache is ``IVFPQNeighbors(memory=...)``; the data is Fashion-MNIST.

Both searches run in this process on the same split (50,000 training rows as
the database, held-out rows as queries), scored on recall@10 and
queries/second, refit by ``fastest_above``. Prints the wall time of each,
the number of trainings, and the recall/speed of every candidate.

    python benchmarks/bench_grid_search.py [--test-size 2000] [--no-refit-run]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import load_data  # noqa: E402
from sklearn.model_selection import GridSearchCV, ShuffleSplit

from annlearn import IVFPQNeighbors
from annlearn import _ivfpq as ivfpq_module
from annlearn.metrics import qps_scorer, recall_scorer
from annlearn.model_selection import fastest_above


def run(X, grid, memory, test_size, threads):
    trainings = []
    original = ivfpq_module.IVFPQNeighbors._train

    def counting(self, *args, **kwargs):
        trainings.append(self.nlist)
        return original(self, *args, **kwargs)

    ivfpq_module.IVFPQNeighbors._train = counting
    try:
        search = GridSearchCV(
            IVFPQNeighbors(
                n_neighbors=10,
                n_subquantizers=28,
                nbits=8,
                random_state=0,
                memory=memory,
                n_jobs=threads,
            ),
            grid,
            scoring={"recall": recall_scorer, "qps": qps_scorer},
            refit=fastest_above(recall=0.6),
            cv=ShuffleSplit(n_splits=1, test_size=test_size, random_state=0),
        )
        start = time.perf_counter()
        search.fit(X)
        elapsed = time.perf_counter() - start
    finally:
        ivfpq_module.IVFPQNeighbors._train = original
    return search, elapsed, len(trainings)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-refit-run", action="store_true", help="skip the search without the cache"
    )
    args = parser.parse_args()
    X, _ = load_data("fashion-mnist")
    grid = {"nlist": [128, 256, 512, 1024], "nprobe": [1, 2, 4, 8, 16, 32]}
    n_candidates = 4 * 6
    print(
        f"# Fashion-MNIST {X.shape}, grid 4 nlist x 6 nprobe = {n_candidates} "
        f"candidates, test_size={args.test_size}, threads={args.threads}"
    )
    with tempfile.TemporaryDirectory() as cache:
        search, cached_s, cached_n = run(X, grid, cache, args.test_size, args.threads)
    res = search.cv_results_
    print("\n| nlist | nprobe | recall@10 | qps | fit_s |")
    print("|---|---|---|---|---|")
    for p, r, q, f in zip(
        res["params"],
        res["mean_test_recall"],
        res["mean_test_qps"],
        res["mean_fit_time"],
        strict=True,
    ):
        print(f"| {p['nlist']} | {p['nprobe']} | {r:.4f} | {q:.0f} | {f:.2f} |")
    print(f"\nrefit fastest_above(0.6): {search.best_params_}")
    print(f"with memory=    : {cached_s:.1f} s, {cached_n} trainings")
    if not args.no_refit_run:
        _, plain_s, plain_n = run(X, grid, None, args.test_size, args.threads)
        print(f"without memory  : {plain_s:.1f} s, {plain_n} trainings")
        print(f"ratio           : x{plain_s / cached_s:.2f}")


if __name__ == "__main__":
    main()
