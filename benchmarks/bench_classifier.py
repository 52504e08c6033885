"""k-NN classification of Fashion-MNIST: annlearn backends against scikit-learn.

``make_pipeline(<annlearn index>, KNeighborsClassifier(metric="precomputed"))``
against ``KNeighborsClassifier(algorithm="brute")`` with the same k, on the
60,000 / 10,000 split, in one process: accuracy difference in points and
predict-time speed-up.

    python benchmarks/bench_classifier.py [--k 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from annlearn import FlatNeighbors, IVFPQNeighbors  # noqa: E402
from annlearn.datasets import load_fashion_mnist  # noqa: E402


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    X, Xt, y, yt = load_fashion_mnist(return_labels=True)
    k, t = args.k, args.threads

    def ivfpq(nprobe, refine):
        return IVFPQNeighbors(
            n_neighbors=k,
            nlist=256,
            nprobe=nprobe,
            n_subquantizers=28,
            refine_factor=refine,
            random_state=0,
            n_jobs=t,
        )

    models = {
        "sklearn KNeighborsClassifier(brute)": KNeighborsClassifier(
            k, algorithm="brute", n_jobs=t
        ),
        "FlatNeighbors": FlatNeighbors(n_neighbors=k, n_jobs=t),
        "IVFPQ nprobe=8": ivfpq(8, None),
        "IVFPQ nprobe=4 refine_factor=4": ivfpq(4, 4),
        "IVFPQ nprobe=8 refine_factor=8": ivfpq(8, 8),
    }
    print(
        f"# Fashion-MNIST {X.shape[0]} train / {Xt.shape[0]} test, k={k}, threads={t}"
    )
    rows = []
    for name, model in models.items():
        if not isinstance(model, KNeighborsClassifier):
            model = make_pipeline(model, KNeighborsClassifier(k, metric="precomputed"))
        start = time.perf_counter()
        model.fit(X, y)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        pred = model.predict(Xt)
        predict_s = time.perf_counter() - start
        rows.append((name, fit_s, predict_s, float(np.mean(pred == yt))))
    ref_name, _, ref_t, ref_acc = rows[0]
    print(
        "\n| model | fit_s | predict_s | accuracy | accuracy - exact (points) "
        "| predict speed-up vs brute |"
    )
    print("|---|---|---|---|---|---|")
    for name, fit_s, predict_s, acc in rows:
        print(
            f"| {name} | {fit_s:.2f} | {predict_s:.2f} | {acc:.4f} | "
            f"{100 * (acc - ref_acc):+.2f} | x{ref_t / predict_s:.1f} |"
        )


if __name__ == "__main__":
    main()
