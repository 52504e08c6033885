"""
======================================================
Approximate k-NN classification with IVFPQNeighbors
======================================================

``IVFPQNeighbors`` as the neighbour backend of
``KNeighborsClassifier(metric="precomputed")`` on Fashion-MNIST: accuracy
against the exact classifier, and how much faster it predicts than
``KNeighborsClassifier(algorithm="brute")`` (2,000 test images by default to
stay under a minute; ``benchmarks/bench_classifier.py`` runs all 10,000).
"""

import argparse
import time

import numpy as np
from _data import load
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline

from annlearn import IVFPQNeighbors


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=60_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--n-neighbors", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--nprobe", type=int, default=8)
    # 28 sub-vectors of 28 features (the default, 98 of 8, trains 3 times
    # longer) trained on 20,000 rows: under a minute on two cores.
    parser.add_argument("--n-subquantizers", type=int, default=28)
    parser.add_argument("--nbits", type=int, default=8)
    parser.add_argument("--max-train-samples", type=int, default=20_000)
    args = parser.parse_args(argv)
    pq = dict(
        n_subquantizers=args.n_subquantizers,
        nbits=args.nbits,
        max_train_samples=args.max_train_samples,
    )
    X_train, X_test, y_train, y_test = load(args.n_train, args.n_test, labels=True)
    k = args.n_neighbors

    models = {
        "IVFPQNeighbors + KNeighborsClassifier(precomputed)": make_pipeline(
            IVFPQNeighbors(
                n_neighbors=k,
                nlist=args.nlist,
                nprobe=args.nprobe,
                refine_factor=4,
                random_state=0,
                **pq,
            ),
            KNeighborsClassifier(n_neighbors=k, metric="precomputed"),
        ),
        "KNeighborsClassifier(brute)": KNeighborsClassifier(k, algorithm="brute"),
    }
    results = {}
    for name, model in models.items():
        start = time.perf_counter()
        model.fit(X_train, y_train)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        predicted = model.predict(X_test)
        predict_s = time.perf_counter() - start
        results[name] = (np.mean(predicted == y_test), predict_s)
        print(
            f"{name:>52}: fit {fit_s:6.2f} s, predict {predict_s:6.2f} s, "
            f"accuracy {results[name][0]:.4f}"
        )
    (acc_a, t_a), (acc_e, t_e) = results.values()
    print(
        f"accuracy difference: {100 * (acc_a - acc_e):+.2f} points; "
        f"predict x{t_e / t_a:.1f} faster"
    )
    return results


if __name__ == "__main__":
    main()
