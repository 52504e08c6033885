"""annlearn.save / annlearn.load and joblib round trips of both estimators."""

import os
import pickle

import joblib
import numpy as np
import pytest

import annlearn
from annlearn import FlatNeighbors, IVFPQNeighbors, load, save


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    return (
        rng.standard_normal((1500, 16)).astype(np.float32),
        rng.standard_normal((40, 16)).astype(np.float32),
    )


def _estimators():
    ivfpq = dict(
        n_neighbors=4, nlist=8, nprobe=4, n_subquantizers=4, nbits=5, random_state=0
    )
    return [
        FlatNeighbors(n_neighbors=4),
        FlatNeighbors(n_neighbors=4, metric="cosine"),
        IVFPQNeighbors(**ivfpq),
        IVFPQNeighbors(**ivfpq, refine_factor=3, metric="inner_product"),
    ]


@pytest.mark.parametrize("est", _estimators(), ids=repr)
@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_round_trip_then_mutate(est, mmap_mode, data, tmp_path):
    X, Q = data
    est.fit(X, ids=np.arange(len(X)) + 100)
    expected = est.kneighbors(Q)
    path = tmp_path / "index.joblib"
    save(est, path)
    before = path.read_bytes()
    loaded = load(path, mmap_mode=mmap_mode)
    if mmap_mode:
        assert isinstance(loaded._store["ids"], np.memmap)
    np.testing.assert_array_equal(loaded.kneighbors(Q)[1], expected[1])
    np.testing.assert_allclose(loaded.kneighbors(Q)[0], expected[0], rtol=1e-6)
    # Mutations after a read-only load build new arrays; the file is intact.
    loaded.add(Q[:5], ids=[1, 2, 3, 4, 5]).remove([100, 101])
    assert loaded.n_samples_fit_ == len(X) + 3
    assert 100 not in loaded.kneighbors(X[:1], n_neighbors=10)[1]
    assert path.read_bytes() == before
    # joblib and pickle read the same state.
    np.testing.assert_array_equal(joblib.load(path).kneighbors(Q)[1], expected[1])
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(est)).kneighbors(Q)[1], expected[1]
    )


def test_save_is_atomic(data, tmp_path, monkeypatch):
    X, Q = data
    path = tmp_path / "index.joblib"
    first = FlatNeighbors(n_neighbors=2).fit(X)
    save(first, path)
    before = path.read_bytes()

    def crash(obj, f, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(joblib, "dump", crash)
    with pytest.raises(OSError, match="disk full"):
        save(FlatNeighbors(n_neighbors=3).fit(Q), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["index.joblib"]  # no temporary left over
    monkeypatch.undo()
    assert load(path).n_neighbors == 2
    save(FlatNeighbors(n_neighbors=3).fit(Q), path)  # replaces it
    assert load(path).n_neighbors == 3


def test_save_keeps_permissions(data, tmp_path):
    path = tmp_path / "index.joblib"
    save(FlatNeighbors().fit(data[0]), path)
    assert path.stat().st_mode & 0o777 == 0o644
    os.chmod(path, 0o600)
    save(FlatNeighbors().fit(data[0]), path)
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("fraction", [0.0001, 0.3, 0.7, 0.99])
@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_truncated_file(fraction, mmap_mode, data, tmp_path):
    path = tmp_path / "index.joblib"
    est = IVFPQNeighbors(nlist=4, n_subquantizers=4, nbits=4, refine_factor=2)
    save(est.fit(data[0]), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: max(int(len(raw) * fraction), 1)])
    with pytest.raises(ValueError, match="index.joblib.*truncated"):
        load(path, mmap_mode=mmap_mode)


def test_foreign_files(tmp_path):
    path = tmp_path / "x.joblib"
    path.write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(ValueError, match="truncated or not a joblib file"):
        load(path)
    joblib.dump({"a": 1}, path)
    with pytest.raises(ValueError, match="holds a dict, not an annlearn estimator"):
        load(path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.joblib")
    with pytest.raises(TypeError, match="save writes annlearn estimators"):
        save({"a": 1}, path)


def test_tampered_arrays_and_newer_layout(data, tmp_path):
    path = tmp_path / "index.joblib"
    est = FlatNeighbors().fit(data[0])
    state = est.__getstate__()
    state["_store"] = dict(state["_store"], sqnorms=state["_store"]["sqnorms"][:5])
    bad = FlatNeighbors.__new__(FlatNeighbors)
    bad.__dict__.update(est.__dict__)
    bad.__getstate__ = lambda: state  # what a tampered file would hold
    joblib.dump(bad, path)
    with pytest.raises(ValueError, match="Corrupted FlatNeighbors state: sqnorms"):
        load(path)
    newer = dict(
        est.__getstate__(), _annlearn_format=annlearn._persistence.FORMAT_VERSION + 1
    )
    with pytest.raises(ValueError, match="Upgrade annlearn"):
        FlatNeighbors().__setstate__(newer)
