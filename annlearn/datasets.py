"""Data for demos, examples and benchmarks.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``), the same 60,000 x 784 database
and 10,000 queries that ann-benchmarks uses; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

__all__ = ["FASHION_MNIST_PATH", "load_fashion_mnist", "make_embeddings"]

FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def _read_idx(path: str, magic: int, header_ints: int) -> np.ndarray:
    """Read one gzipped idx file, checking its magic number and its size."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header_bytes = 4 * header_ints
    if len(raw) < header_bytes:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, no idx header.")
    header = np.frombuffer(raw[:header_bytes], dtype=">i4")
    if header[0] != magic:
        raise ValueError(
            f"{path} is not an idx file of the expected kind: magic number "
            f"{header[0]}, expected {magic}."
        )
    shape = tuple(int(v) for v in header[1:])
    expected = int(np.prod(shape)) + header_bytes
    if len(raw) != expected:
        raise ValueError(
            f"{path} is corrupted or truncated: {len(raw)} bytes, expected "
            f"{expected} for shape {shape}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


def load_fashion_mnist(path: str = FASHION_MNIST_PATH, *, return_labels: bool = False):
    """Load Fashion-MNIST as float32 vectors.

    Parameters
    ----------
    path : str, default="/usr/share/datasets/fashion-mnist"
        Folder holding the four gzipped idx files.
    return_labels : bool, default=False
        Also return the labels.

    Returns
    -------
    X_train : ndarray of shape (60000, 784), float32
        The database (pixel values 0-255).
    X_test : ndarray of shape (10000, 784), float32
        The queries.
    y_train, y_test : ndarray of shape (60000,) and (10000,), uint8
        The class labels, only if ``return_labels=True``.

    Raises
    ------
    FileNotFoundError
        If the files are missing (install ``dataset-fashion-mnist``).
    ValueError
        If a file is truncated or is not the expected idx file.

    Examples
    --------
    >>> from annlearn.datasets import load_fashion_mnist
    >>> X, Q = load_fashion_mnist()
    >>> X.shape, Q.shape, X.dtype
    ((60000, 784), (10000, 784), dtype('float32'))
    """
    names = {
        "X_train": "train-images-idx3-ubyte.gz",
        "X_test": "t10k-images-idx3-ubyte.gz",
        "y_train": "train-labels-idx1-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values() if not os.path.exists(os.path.join(path, n))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {path} (missing {', '.join(missing)}). "
            "Install it with: apt-get install dataset-fashion-mnist"
        )
    X_train = _read_idx(os.path.join(path, names["X_train"]), _IMAGES_MAGIC, 4)
    X_test = _read_idx(os.path.join(path, names["X_test"]), _IMAGES_MAGIC, 4)
    X_train = X_train.reshape(len(X_train), -1).astype(np.float32)
    X_test = X_test.reshape(len(X_test), -1).astype(np.float32)
    if not return_labels:
        return X_train, X_test
    y_train = _read_idx(os.path.join(path, names["y_train"]), _LABELS_MAGIC, 2)
    y_test = _read_idx(os.path.join(path, names["y_test"]), _LABELS_MAGIC, 2)
    return X_train, X_test, y_train.copy(), y_test.copy()


def make_embeddings(
    n_samples: int,
    n_features: int,
    *,
    n_clusters: int = 50,
    cluster_std: float = 0.5,
    random_state=None,
) -> np.ndarray:
    """Generate clustered float32 vectors that look like embeddings.

    Points are drawn around ``n_clusters`` Gaussian centres, which gives
    nearest-neighbour structure (unlike uniform noise, where every neighbour
    is almost equally far).

    Parameters
    ----------
    n_samples : int
        Number of vectors.
    n_features : int
        Dimension.
    n_clusters : int, default=50
        Number of cluster centres.
    cluster_std : float, default=0.5
        Spread of each cluster relative to the spread of the centres.
    random_state : int, Generator or None, default=None
        Seed.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float32

    Examples
    --------
    >>> from annlearn.datasets import make_embeddings
    >>> X = make_embeddings(1000, 64, n_clusters=10, random_state=0)
    >>> X.shape, X.dtype
    ((1000, 64), dtype('float32'))
    """
    rng = np.random.default_rng(random_state)
    centres = rng.standard_normal((n_clusters, n_features))
    labels = rng.integers(0, n_clusters, size=n_samples)
    X = centres[labels] + cluster_std * rng.standard_normal((n_samples, n_features))
    return X.astype(np.float32)
