from sklearn.utils.estimator_checks import parametrize_with_checks

from annlearn import FlatNeighbors

ESTIMATORS = [
    FlatNeighbors(),
    FlatNeighbors(metric="sqeuclidean", mode="connectivity"),
    FlatNeighbors(metric="cosine"),
    FlatNeighbors(metric="inner_product", n_jobs=1),
]


def _expected_failed_checks(estimator):
    return {}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
