"""
===============================================================
Exact k-NN classification of Fashion-MNIST with FlatNeighbors
===============================================================

``FlatNeighbors`` as the neighbour backend of scikit-learn's
``KNeighborsClassifier(metric="precomputed")``: the transformer computes the
k-nearest-neighbour graph once, the classifier votes on it. Predictions are
the same as the classifier's own brute force, computed faster.

Runs on Fashion-MNIST when ``dataset-fashion-mnist`` is installed, on
generated data otherwise. By default on 30,000 training and 2,000 test
images to stay under a minute (the pipeline's fit computes the training set's
own neighbour graph); ``--n-train 60000 --n-test 10000`` for the full set.
"""

import argparse
import time

import numpy as np
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline

from annlearn import FlatNeighbors
from annlearn.datasets import load_fashion_mnist, make_embeddings


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=30_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--n-neighbors", type=int, default=10)
    args = parser.parse_args(argv)

    try:
        X_train, X_test, y_train, y_test = load_fashion_mnist(return_labels=True)
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        X_train = make_embeddings(
            args.n_train + args.n_test, 64, n_clusters=10, random_state=0
        )
        y_all = rng.integers(0, 10, len(X_train))
        X_train, X_test = X_train[: args.n_train], X_train[args.n_train :]
        y_train, y_test = y_all[: args.n_train], y_all[args.n_train :]
    X_train, y_train = X_train[: args.n_train], y_train[: args.n_train]
    X_test, y_test = X_test[: args.n_test], y_test[: args.n_test]
    k = args.n_neighbors

    results = []
    for name, model in [
        (
            "FlatNeighbors + KNeighborsClassifier(precomputed)",
            make_pipeline(
                FlatNeighbors(n_neighbors=k, n_jobs=-1),
                KNeighborsClassifier(n_neighbors=k, metric="precomputed"),
            ),
        ),
        (
            "KNeighborsClassifier(brute)",
            KNeighborsClassifier(k, algorithm="brute", n_jobs=-1),
        ),
    ]:
        model.fit(X_train, y_train)
        start = time.perf_counter()
        predicted = model.predict(X_test)
        seconds = time.perf_counter() - start
        results.append(predicted)
        accuracy = np.mean(predicted == y_test)
        print(f"{name:>52}: accuracy {accuracy:.4f}, predict {seconds:.2f} s")
    print(f"identical predictions: {np.mean(results[0] == results[1]):.4f}")


if __name__ == "__main__":
    main()
