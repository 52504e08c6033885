"""ProductQuantizer: M sub-quantizers of 2**nbits centres, one per sub-vector."""

from __future__ import annotations

import numpy as np

from annlearn import _flat_search, _ivf
from annlearn._clustering import train_kmeans

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
    ) -> ProductQuantizer:
        """One k-means of ``2**nbits`` centres per sub-vector of X's rows."""
        dsub = X.shape[1] // M
        codebooks = np.empty((M, 2**nbits, dsub), dtype=np.float32)
        for m in range(M):
            codebooks[m], _, _ = train_kmeans(
                np.ascontiguousarray(X[:, m * dsub : (m + 1) * dsub]),
                2**nbits,
                max_iter=max_iter,
                random_state=random_state,
                n_threads=n_threads,
                verbose=verbose,
                name=f"sub-quantizer {m}",
            )
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
