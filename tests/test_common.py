from sklearn.utils.estimator_checks import parametrize_with_checks

from annlearn import FlatNeighbors, IVFPQNeighbors

ESTIMATORS = [
    FlatNeighbors(),
    FlatNeighbors(metric="sqeuclidean", mode="connectivity"),
    FlatNeighbors(metric="cosine"),
    FlatNeighbors(metric="inner_product", n_jobs=1),
    FlatNeighbors(algorithm="pca_bound"),
    FlatNeighbors(vector_dtype="uint8"),
    FlatNeighbors(metric="cosine", algorithm="pca_bound", vector_dtype="float16"),
    IVFPQNeighbors(nlist=2, nprobe=2, nbits=4, n_subquantizers=1, random_state=0),
    IVFPQNeighbors(
        nlist=2, nprobe=1, nbits=4, metric="cosine", refine_factor=2, random_state=0
    ),
    IVFPQNeighbors(
        nlist=2,
        nprobe=2,
        nbits=4,
        refine_factor=2,
        vector_dtype="uint8",
        random_state=0,
    ),
    IVFPQNeighbors(nlist=2, nbits=4, target_recall=0.9, random_state=0),
    IVFPQNeighbors(
        nlist=2,
        nbits=4,
        metric="inner_product",
        refine_factor=2,
        vector_dtype="float16",
        random_state=0,
    ),
]

_TOO_FEW_FOR_PQ = (
    "IVF-PQ trains 2**nbits >= 16 centres per sub-quantizer and raises a "
    "ValueError naming n_samples when given fewer rows; this check fits on "
    "10 to 15 rows."
)


def _expected_failed_checks(estimator):
    if isinstance(estimator, IVFPQNeighbors):
        return {
            "check_n_features_in_after_fitting": _TOO_FEW_FOR_PQ,
            "check_estimators_nan_inf": _TOO_FEW_FOR_PQ,
            "check_fit2d_1feature": _TOO_FEW_FOR_PQ,
        }
    return {}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
