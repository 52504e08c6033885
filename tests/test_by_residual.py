"""IVFPQNeighbors(by_residual="auto"): codes of the residuals or of the
vectors, whichever finds more true neighbours of held-out rows."""

import numpy as np
import pytest
from sklearn.utils._param_validation import InvalidParameterError

import annlearn
from annlearn import FlatNeighbors, IVFPQNeighbors
from annlearn.datasets import make_embeddings

M, DSUB = 8, 4


def patterned(n, seed):
    """Rows whose every sub-vector is one of 16 patterns of its sub-space
    (the same patterns for every seed): 4-bit codes of the vectors can be
    exact, codes of their residuals to the cell centres cannot."""
    patterns = np.random.default_rng(0).normal(size=(M, 16, DSUB))
    choice = np.random.default_rng(seed).integers(0, 16, size=(n, M))
    X = patterns[np.arange(M), choice].reshape(n, M * DSUB)
    return X.astype(np.float32)


def index(**params):
    defaults = dict(
        n_neighbors=10,
        nlist=16,
        nprobe=4,
        n_subquantizers=M,
        nbits=4,
        refine_factor=None,
        random_state=0,
    )
    return IVFPQNeighbors(**{**defaults, **params})


def recall(est, X, Q):
    truth = FlatNeighbors(n_neighbors=10, metric=est.metric).fit(X)
    want = truth.kneighbors(Q, return_distance=False)
    got = est.kneighbors(Q, return_distance=False)
    return np.mean(
        [len(np.intersect1d(a, b)) / 10 for a, b in zip(got, want, strict=True)]
    )


def test_auto_codes_the_vectors_where_they_rank_better():
    X, Q = patterned(4000, 1), patterned(100, 2)
    auto = index().fit(X)
    residuals = index(by_residual=True).fit(X)
    vectors = index(by_residual=False).fit(X)
    assert auto.by_residual_ is False
    assert residuals.by_residual_ is True and vectors.by_residual_ is False
    # The choice is the better index on new queries too.
    assert recall(auto, X, Q) > recall(residuals, X, Q) + 0.1


@pytest.mark.parametrize("metric", ["euclidean", "inner_product"])
def test_auto_codes_the_residuals_where_they_rank_better(metric):
    X = make_embeddings(4000, 32, n_clusters=16, random_state=0)
    Q = make_embeddings(100, 32, n_clusters=16, random_state=1)
    auto = index(metric=metric).fit(X)
    vectors = index(metric=metric, by_residual=False).fit(X)
    assert auto.by_residual_ is True
    assert recall(auto, X, Q) > recall(vectors, X, Q) + 0.1


def test_auto_on_few_rows_codes_the_residuals_without_holding_rows_out():
    X = make_embeddings(900, 32, random_state=0)
    auto = index(nlist=4).fit(X)
    residuals = index(nlist=4, by_residual=True).fit(X)
    assert auto.by_residual_ is True
    # No row was held out: the same training as by_residual=True.
    np.testing.assert_array_equal(auto.cluster_centers_, residuals.cluster_centers_)
    np.testing.assert_array_equal(auto.pq_codebooks_, residuals.pq_codebooks_)


def test_auto_choice_is_kept_by_add_save_and_load(tmp_path):
    X, extra = patterned(4000, 1), patterned(50, 3)
    est = index(refine_factor=2).fit(X)
    assert est.by_residual_ is False
    est.add(extra, ids=np.arange(10_000, 10_050))
    # Added rows are coded as the others: each finds itself.
    found = est.kneighbors(extra, n_neighbors=1, return_distance=False)[:, 0]
    np.testing.assert_array_equal(found, np.arange(10_000, 10_050))
    annlearn.save(est, tmp_path / "index")
    loaded = annlearn.load(tmp_path / "index")
    assert loaded.by_residual_ is False
    np.testing.assert_array_equal(loaded.kneighbors(extra), est.kneighbors(extra))


def test_auto_with_a_recall_target_calibrates_the_chosen_codes():
    X = patterned(4000, 1)
    est = index(refine_factor=4, target_recall=0.9).fit(X)
    assert est.by_residual_ is False
    assert est.calibration_recall_ >= 0.9


def test_refit_chooses_again():
    est = index().fit(patterned(4000, 1))
    assert est.by_residual_ is False
    est.fit(make_embeddings(4000, 32, n_clusters=16, random_state=0))
    assert est.by_residual_ is True


def test_by_residual_is_checked_before_anything_changes():
    X = patterned(2000, 1)
    est = index().fit(X)
    before = est.kneighbors(X[:5])
    est.set_params(by_residual="yes")
    with pytest.raises(InvalidParameterError, match="by_residual"):
        est.fit(X[:1500])
    assert est.n_samples_fit_ == 2000
    np.testing.assert_array_equal(est.kneighbors(X[:5])[1], before[1])


def test_by_residual_unfitted_is_an_attribute_error():
    assert not hasattr(index(), "by_residual_")


def _lifted_norms(est):
    lift = est._ip_lift
    centres = est.cluster_centers_.astype(np.float64)
    extra = lift["extra"].astype(np.float64)
    return np.sqrt((centres**2).sum(axis=1) + extra**2), np.sqrt(lift["max_sqnorm"])


def test_inner_product_cells_are_spherical_for_codes_of_the_vectors():
    X = make_embeddings(4000, 32, n_clusters=16, random_state=0)
    X[:100] *= 1.5  # unequal norms: the lift is not zero
    Q = make_embeddings(50, 32, n_clusters=16, random_state=1)
    vectors = index(metric="inner_product", by_residual=False).fit(X)
    norms, radius = _lifted_norms(vectors)
    np.testing.assert_allclose(norms, radius, rtol=1e-5)
    # Probing then ranks cells by inner product with the query.
    cells = vectors._codec.probe(Q, 16, 2)[0]
    by_ip = np.argsort(-(Q @ vectors.cluster_centers_.T), axis=1, kind="stable")
    np.testing.assert_array_equal(np.sort(cells[:, :4]), np.sort(by_ip[:, :4]))
    # Codes of the residuals keep the cell means, which are inside the sphere.
    residuals = index(metric="inner_product", by_residual=True).fit(X)
    norms, radius = _lifted_norms(residuals)
    assert np.all(norms < radius * (1 - 1e-3))


def test_spherical_kmeans_keeps_centres_on_the_sphere():
    from annlearn._clustering import train_kmeans
    from annlearn._quantizers import CoarseQuantizer

    X = make_embeddings(2000, 8, random_state=0)
    X = np.ascontiguousarray(2.0 * X / np.linalg.norm(X, axis=1, keepdims=True))
    centres, _, _ = train_kmeans(X, 10, sphere_radius=2.0, random_state=0)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 2.0, rtol=1e-5)
    with pytest.raises(ValueError, match="Only inner-product cells are spherical"):
        CoarseQuantizer.train(
            X, 4, metric="l2", max_iter=2, random_state=0, n_threads=1, spherical=True
        )


def test_auto_for_the_inner_product_keeps_each_codes_cells():
    X = patterned(4000, 1)
    auto = index(metric="inner_product").fit(X)
    assert auto.by_residual_ is False
    norms, radius = _lifted_norms(auto)
    np.testing.assert_allclose(norms, radius, rtol=1e-5)


def test_auto_without_rows_to_spare_codes_the_residuals():
    # As many cells as rows leave none to hold out: no comparison (and no
    # error about held-out rows), the residuals' codes.
    X = make_embeddings(1000, 8, random_state=0)
    with pytest.warns(UserWarning):
        est = index(nlist=1000, n_subquantizers=2).fit(X)
    assert est.by_residual_ is True
