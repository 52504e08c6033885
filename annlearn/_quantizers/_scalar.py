"""ScalarQuantizer: how the re-ranking copy of an index stores each vector.

Three storages, chosen by ``vector_dtype``:

- ``"float32"``: the vectors themselves (4 bytes per feature);
- ``"float16"``: IEEE half floats (2 bytes), about 3 significant digits;
  magnitudes above 65504, which a half float cannot hold, are refused;
- ``"uint8"``: one byte per feature, ``offset + scale * code`` with a
  per-feature ``offset`` (the minimum at ``fit``) and ``scale`` (the range
  over 255). A feature whose values at ``fit`` are integers spanning at most
  256 values (pixels, counts) gets ``scale = 1``: its codes are the values
  minus the offset, exactly, so 8-bit data are stored without any loss.
  Values outside what the codes cover (added later: the range seen at
  ``fit``, or 256 integers from its minimum for an 8-bit feature) are
  clipped to it.

The re-ranking kernels (``annlearn/_ivf.pyx``, ``_utils/_compact.h``) read
the stored rows in place; :meth:`decode` gives the float32 vectors they
represent, which every exact distance is measured to.
"""

from __future__ import annotations

import warnings

import numpy as np

from annlearn import _ivf
from annlearn._persistence import check_array_state
from annlearn._validation import user_stacklevel

__all__ = ["VECTOR_DTYPES", "ScalarQuantizer"]

VECTOR_DTYPES = ("float32", "float16", "uint8")

# Rows converted at once: bounds the float32 temporaries of encode and decode.
_BLOCK = 16_384
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _row_blocks(n: int):
    return (slice(s, min(s + _BLOCK, n)) for s in range(0, n, _BLOCK))


class ScalarQuantizer:
    """Stored form of the vectors kept for exact re-ranking.

    Parameters
    ----------
    dtype : {"float32", "float16", "uint8"}
        The storage.
    offset, scale : ndarray of shape (n_features,), float32, or None
        The per-feature ``offset + scale * code`` of ``"uint8"`` (None for
        the float storages).
    """

    def __init__(self, dtype: str, offset=None, scale=None) -> None:
        self.dtype = dtype
        self.offset = offset
        self.scale = scale

    @classmethod
    def train(cls, X: np.ndarray, dtype: str, n_threads: int = 1) -> ScalarQuantizer:
        """The quantizer for rows like X (float32): for ``"uint8"``, the
        range of every feature over all of X (one pass on ``n_threads``
        threads); nothing to learn otherwise."""
        if dtype != "uint8":
            return cls(dtype)
        low, high, integral = _ivf.sq8_range(
            np.ascontiguousarray(X, dtype=np.float32), n_threads
        )
        if not len(X):
            low[:], high[:] = 0.0, 0.0
        span = high.astype(np.float64) - low
        # Integer features spanning at most 256 values keep unit steps, so
        # their codes are exact; the others spread their range over 255 steps.
        exact = (integral & (span <= 255)) | (span == 0)
        scale = np.where(exact, 1.0, span / 255).astype(np.float32)
        return cls(dtype, low, scale)

    @classmethod
    def of_stored(cls, vectors: np.ndarray, offset, scale) -> ScalarQuantizer:
        """The quantizer of a loaded index, from its stored vectors' dtype."""
        return cls(np.dtype(vectors.dtype).name, offset, scale)

    @property
    def itemsize(self) -> int:
        """Bytes per stored feature."""
        return np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        """Memory of the quantizer itself (offset and scale)."""
        if self.offset is None:
            return 0
        return self.offset.nbytes + self.scale.nbytes

    def describe(self) -> str:
        """How the vectors are stored, for ``summary()``."""
        if self.dtype == "uint8":
            return "uint8 (scalar-quantized) vectors"
        return f"{self.dtype} vectors"

    def encode(self, X: np.ndarray, n_threads: int = 1) -> tuple[np.ndarray, int]:
        """The stored form of float32 rows X and the number of rows with a
        value clipped to the range of ``"uint8"`` (0 for the float storages),
        ``"uint8"`` on ``n_threads`` threads.

        Raises ValueError if ``"float16"`` cannot hold a value of X.
        """
        if self.dtype == "float32":
            return X, 0
        if self.dtype == "float16":
            largest = float(np.abs(X).max(initial=0.0))
            if largest > _FLOAT16_MAX:
                raise ValueError(
                    f"vector_dtype='float16' holds magnitudes up to "
                    f"{_FLOAT16_MAX:g}, but X has a value of magnitude "
                    f"{largest:g}. Use vector_dtype='float32' or 'uint8'."
                )
            return X.astype(np.float16), 0
        # rint((x - offset) / scale), exact for the unit-step features.
        codes, clipped = _ivf.sq8_encode(
            np.ascontiguousarray(X, dtype=np.float32),
            self.offset,
            self.scale,
            n_threads,
        )
        return codes, int(clipped)

    def encode_added(
        self, X: np.ndarray, owner: str, copy: str, n_threads: int = 1
    ) -> np.ndarray:
        """``encode`` for the rows that ``owner.add`` brings, with a
        UserWarning when uint8 clips some (``copy`` names the store)."""
        stored, clipped = self.encode(X, n_threads)
        if clipped:
            warnings.warn(
                f"{owner}.add: {clipped} of {len(X)} vectors have values "
                "outside the range of the features at fit, clipped to it in "
                f"{copy} (vector_dtype='uint8'): distances to them are "
                "distances to the clipped vectors. Fit again on data covering "
                "the new range to store them exactly.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return stored

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """The float32 vectors that stored rows represent (what the
        re-ranking measures distances to)."""
        if self.dtype == "float32":
            return stored
        out = np.empty(stored.shape, dtype=np.float32)
        for rows in _row_blocks(len(stored)):
            if self.dtype == "float16":
                out[rows] = stored[rows]
            else:
                # float32 throughout (a float64 temporary tripled the cost of
                # FlatNeighbors' per-call decoding); within one rounding of
                # the kernels' FMA, and exact on 8-bit features (scale 1).
                block = out[rows]
                np.multiply(stored[rows], self.scale, out=block)
                block += self.offset
        return out

    def kernel_args(self) -> dict:
        """The keyword arguments of the ``_ivf`` kernels for stored rows."""
        return {"offset": self.offset, "scale": self.scale}

    def refine(self, Q, stored, candidates, k: int, inner_product: bool, n_threads):
        """``_ivf.refine`` over these stored rows."""
        return _ivf.refine(
            Q, stored, candidates, k, inner_product, n_threads, **self.kernel_args()
        )

    def exact_scores(self, Q, stored, candidates, inner_product: bool, n_threads):
        """``_ivf.exact_scores`` over these stored rows."""
        return _ivf.exact_scores(
            Q, stored, candidates, inner_product, n_threads, **self.kernel_args()
        )

    @staticmethod
    def check_state(owner: str, vectors, offset, scale, *, d: int) -> None:
        """Raise ValueError unless loaded stored vectors (or None) and the
        ``uint8`` quantizer (``_vector_offset``, ``_vector_scale``) agree."""
        is_uint8 = isinstance(vectors, np.ndarray) and vectors.dtype == np.uint8
        if vectors is not None and (
            not isinstance(vectors, np.ndarray)
            or vectors.dtype.name not in VECTOR_DTYPES
        ):
            kind = getattr(vectors, "dtype", type(vectors).__name__)
            raise ValueError(
                f"Corrupted {owner} state: vectors should be float32, float16 or "
                f"uint8, got {kind}."
            )
        if (offset is None) != (scale is None) or is_uint8 != (offset is not None):
            raise ValueError(
                f"Corrupted {owner} state: _vector_offset and _vector_scale "
                "must be set if and only if the vectors are uint8."
            )
        if is_uint8:
            for name, array in (("_vector_offset", offset), ("_vector_scale", scale)):
                check_array_state(
                    owner,
                    name,
                    array,
                    dtype=np.float32,
                    ndim=1,
                    shape=(d,),
                    finite=True,
                )
            if scale.size and scale.min() <= 0:
                raise ValueError(f"Corrupted {owner} state: _vector_scale must be > 0.")
