"""The quantizers of an IVF-PQ index, each usable alone.

::

    vector x ──► CoarseQuantizer ──► cell c (nlist k-means centres)
          │                             │
          └──── x - c (residual) ──► ProductQuantizer ──► M codes of nbits
                                                             │
                  InvertedLists (annlearn._invlists) ◄───────┘ codes + id, by cell

A query probes the ``nprobe`` cells nearest to it (``CoarseQuantizer.search``,
whose distances are term 1 of the ADC decomposition, see ``annlearn/_ivf.pyx``)
and scores the codes of those cells with lookup tables built from the product
quantizer's codebooks (``ProductQuantizer.term2_tables`` and the transposed
codebooks the scan kernel reads). With re-ranking, the lists also keep every
vector as a :class:`ScalarQuantizer` stores it (float32, float16 or uint8),
and the best candidates are re-ranked by exact distance to those rows. The
quantizers are plain Python objects over the Cython kernels, immutable once
trained, and hold nothing of the estimator.
"""

from annlearn._quantizers._coarse import CoarseQuantizer
from annlearn._quantizers._product import ProductQuantizer
from annlearn._quantizers._scalar import VECTOR_DTYPES, ScalarQuantizer

__all__ = ["VECTOR_DTYPES", "CoarseQuantizer", "ProductQuantizer", "ScalarQuantizer"]
