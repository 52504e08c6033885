"""Data of the examples: Fashion-MNIST when installed, generated otherwise."""

import numpy as np

from annlearn.datasets import load_fashion_mnist, make_embeddings


def load(n_train: int, n_test: int, labels: bool = False):
    """(X_train, X_test[, y_train, y_test]) float32, at most n_train/n_test rows."""
    try:
        X_train, X_test, y_train, y_test = load_fashion_mnist(return_labels=True)
    except FileNotFoundError:
        n = n_train + n_test
        # Fashion-MNIST's width, so that the examples' defaults (28
        # sub-quantizers, a divisor of 784) hold for both data sets.
        X = make_embeddings(n, 784, n_clusters=10, random_state=0)
        y = np.random.default_rng(0).integers(0, 10, n)
        X_train, X_test, y_train, y_test = (
            X[:n_train],
            X[n_train:],
            y[:n_train],
            y[n_train:],
        )
    out = (X_train[:n_train], X_test[:n_test])
    if labels:
        out += (y_train[:n_train], y_test[:n_test])
    return out
