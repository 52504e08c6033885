"""ProductQuantizer: M sub-quantizers of 2**nbits centres, one per sub-vector."""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

from annlearn import _flat_search, _ivf
from annlearn._clustering import _relocate_empty_clusters
from annlearn._kmeans import subspace_sums

__all__ = ["ProductQuantizer"]


class ProductQuantizer:
    """Codes of ``M`` bytes for vectors of ``M * dsub`` features.

    Sub-vector ``m`` (features ``m * dsub`` to ``(m + 1) * dsub``) is coded by
    the index of its nearest centre in ``codebooks[m]``; a code is stored in
    one byte whatever ``nbits``.

    Parameters
    ----------
    codebooks : ndarray of shape (M, 2**nbits, dsub), float32
        The centres of each sub-quantizer.

    Attributes
    ----------
    codebooks_t : ndarray of shape (M, dsub, 2**nbits), float32
        The codebooks transposed, as the lookup-table kernel reads them.
    sqnorms : ndarray of shape (M, 2**nbits), float32
        Squared norms of each sub-quantizer's centres (the encoding takes
        them).
    """

    def __init__(self, codebooks: np.ndarray) -> None:
        self.codebooks = codebooks
        self.codebooks_t = np.ascontiguousarray(codebooks.transpose(0, 2, 1))
        M, ksub, dsub = codebooks.shape
        self.sqnorms = _flat_search.row_sqnorms(
            np.ascontiguousarray(codebooks.reshape(M * ksub, dsub)), 1
        ).reshape(M, ksub)

    @classmethod
    def train(
        cls,
        X: np.ndarray,
        M: int,
        nbits: int,
        *,
        max_iter: int,
        random_state,
        n_threads: int,
        verbose: bool = False,
        tol: float = 1e-4,
    ) -> ProductQuantizer:
        """One k-means of ``2**nbits`` centres per sub-vector of X's rows.

        The M k-means run side by side, one pass over X per iteration for
        all of them (``_ivf.pq_encode`` assigns, ``_kmeans.subspace_sums``
        sums), each as :func:`annlearn._clustering.train_kmeans` would run it
        on its sub-vectors: initial centres drawn from the same random
        stream in the same order, scikit-learn's stopping rule and empty
        cluster rule; a sub-quantizer that has converged keeps its centres
        while the others go on.
        """
        X = np.ascontiguousarray(X, dtype=np.float32)
        n, d = X.shape
        dsub, ksub = d // M, 2**nbits
        if not 1 <= ksub <= n:
            raise ValueError(
                f"sub-quantizer 0: expected 1 <= n_clusters <= n_samples, but "
                f"n_clusters = {ksub}, n_samples = {n}."
            )
        rng = check_random_state(random_state)
        sub = X.reshape(n, M, dsub)
        rows = np.stack([np.sort(rng.choice(n, ksub, replace=False)) for _ in range(M)])
        codebooks = np.ascontiguousarray(sub[rows, np.arange(M)[:, None]])
        # sklearn's tolerance per sub-quantizer: tol times the mean variance
        # of its features.
        variance = X.var(axis=0, dtype=np.float64).reshape(M, dsub).mean(axis=1)
        threshold = variance * tol if tol else np.zeros(M)
        active = np.ones(M, dtype=bool)
        for n_iter in range(1, max_iter + 1):
            labels = cls(codebooks).encode(X, n_threads)
            sums, counts = subspace_sums(X, labels, ksub, n_threads)
            for m in np.flatnonzero(active & (counts == 0).any(axis=1)):
                centre = codebooks[m][labels[:, m]]
                distances = ((sub[:, m] - centre) ** 2).sum(axis=1, dtype=np.float32)
                codes = labels[:, m].astype(np.int64)
                _relocate_empty_clusters(
                    sub[:, m], distances, codes, sums[m], counts[m]
                )
            new = sums / np.maximum(counts, 1)[:, :, None]
            new = np.where((counts == 0)[:, :, None], codebooks, new).astype(np.float32)
            shift = ((new - codebooks) ** 2).sum(axis=(1, 2), dtype=np.float64)
            codebooks[active] = new[active]
            active &= shift > threshold
            if verbose:
                print(
                    f"[product quantizer] iteration {n_iter}: "
                    f"{np.count_nonzero(active)} of {M} sub-quantizers moving"
                )
            if not active.any():
                break
        return cls(codebooks)

    @property
    def M(self) -> int:  # noqa: N802 - FAISS's and the literature's name
        """Sub-vectors per code (bytes per code)."""
        return self.codebooks.shape[0]

    @property
    def ksub(self) -> int:
        """Centres per sub-quantizer, ``2**nbits``."""
        return self.codebooks.shape[1]

    @property
    def nbits(self) -> int:
        """Bits of information per sub-vector code."""
        return self.ksub.bit_length() - 1

    @property
    def dsub(self) -> int:
        """Features per sub-vector."""
        return self.codebooks.shape[2]

    def encode(
        self,
        X: np.ndarray,
        n_threads: int,
        centers: np.ndarray | None = None,
        cells: np.ndarray | None = None,
    ) -> np.ndarray:
        """Codes of the rows of X (float32, C-contiguous), shape (n, M),
        uint8: of ``X[i] - centers[cells[i]]`` when ``centers`` is given
        (residuals, never materialised; ``_ivf.pq_encode``)."""
        return _ivf.pq_encode(
            X, self.codebooks_t, self.sqnorms, centers, cells, n_threads
        )

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstructions of the codes, shape (n, M * dsub), float32."""
        parts = [self.codebooks[m][codes[:, m]] for m in range(self.M)]
        return np.ascontiguousarray(np.hstack(parts), dtype=np.float32)

    def term2_tables(self, centers: np.ndarray | None) -> np.ndarray:
        """Term 2 of the L2 ADC decomposition (see ``annlearn/_ivf.pyx``).

        ``||r_m||^2 + 2 <c_m, r_m>`` for every codeword ``r_m``: one table per
        cell of ``centers`` (residual codes), shape (nlist, M, ksub), or, for
        ``centers=None`` (codes of the vectors themselves), the codeword norms
        alone, shape (1, M, ksub).
        """
        codebooks = self.codebooks
        norms = np.einsum("mkd,mkd->mk", codebooks, codebooks)[None]
        if centers is None:
            return norms.astype(np.float32)
        sub_centers = centers.reshape(len(centers), self.M, self.dsub)
        cross = np.einsum("cmd,mkd->cmk", sub_centers, codebooks)
        return np.ascontiguousarray(norms + 2 * cross, dtype=np.float32)
