"""annlearn.save / annlearn.load, and pickle / joblib round trips of both
estimators. The robustness of the file format against damaged and crafted
files is tested in test_file_format.py."""

import os
import pickle
import subprocess
import sys
import textwrap
import time

import joblib
import numpy as np
import pytest

import annlearn
from annlearn import FlatNeighbors, IVFPQNeighbors, _file_format, load, save


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
        FlatNeighbors(n_neighbors=4, metric="cosine", algorithm="pca_bound"),
        IVFPQNeighbors(**ivfpq),
        IVFPQNeighbors(**ivfpq, refine_factor=3, metric="inner_product"),
    ]


@pytest.mark.parametrize("est", _estimators(), ids=repr)
@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_round_trip_then_mutate(est, mmap_mode, data, tmp_path):
    X, Q = data
    est.fit(X, ids=np.arange(len(X)) + 100)
    expected = est.kneighbors(Q)
    path = tmp_path / "index.annlearn"
    save(est, path)
    before = path.read_bytes()
    loaded = load(path, mmap_mode=mmap_mode)
    assert type(loaded) is type(est)
    assert loaded.get_params() == est.get_params()
    if mmap_mode:
        for key in ("ids", "codes", "vectors"):
            if getattr(loaded._store, key, None) is not None:
                assert isinstance(getattr(loaded._store, key), np.memmap)
                assert not getattr(loaded._store, key).flags.writeable
    np.testing.assert_array_equal(loaded.kneighbors(Q)[1], expected[1])
    np.testing.assert_array_equal(loaded.kneighbors(Q)[0], expected[0])
    # Mutations after a read-only load build new arrays; the file is intact.
    loaded.add(Q[:5], ids=[1, 2, 3, 4, 5]).remove([100, 101])
    assert loaded.n_samples_fit_ == len(X) + 3
    assert 100 not in loaded.kneighbors(X[:1], n_neighbors=10)[1]
    assert path.read_bytes() == before
    # The mutated index saves and loads again.
    save(loaded, path)
    again = load(path)
    np.testing.assert_array_equal(again.kneighbors(Q)[1], loaded.kneighbors(Q)[1])


@pytest.mark.parametrize("est", _estimators()[::2], ids=repr)
def test_pickle_and_joblib_still_work(est, data, tmp_path):
    """The scikit-learn convention stays: pickle and joblib (memory-mapped
    included) round-trip the same estimator, for files one wrote oneself."""
    X, Q = data
    expected = est.fit(X).kneighbors(Q)
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(restored.kneighbors(Q)[1], expected[1])
    path = tmp_path / "index.joblib"
    joblib.dump(est, path)
    mapped = joblib.load(path, mmap_mode="r")
    np.testing.assert_array_equal(mapped.kneighbors(Q)[1], expected[1])


def test_unfitted_and_parameters_round_trip(tmp_path):
    path = tmp_path / "index.annlearn"
    random_state = np.random.RandomState(7)
    random_state.standard_normal(3)  # a state with a cached Gaussian
    est = IVFPQNeighbors(
        nlist=3,
        nprobe=2,
        metric="cosine",
        memory=joblib.Memory(str(tmp_path / "cache"), verbose=0),
        random_state=random_state,
        by_residual=False,
    )
    save(est, path)
    loaded = load(path)
    params = loaded.get_params()
    assert params["nlist"] == 3 and params["metric"] == "cosine"
    assert params["by_residual"] is False
    # A Memory is saved as its location, which fit turns into a Memory again.
    assert params["memory"] == str(tmp_path / "cache")
    # The RandomState is rebuilt in its exact state.
    expected = random_state.get_state(legacy=False)
    got = params["random_state"].get_state(legacy=False)
    np.testing.assert_array_equal(got["state"]["key"], expected["state"]["key"])
    assert got["state"]["pos"] == expected["state"]["pos"]
    assert (got["has_gauss"], got["gauss"]) == (
        expected["has_gauss"],
        expected["gauss"],
    )
    assert params["random_state"].random() == random_state.random()
    assert not hasattr(loaded, "n_samples_fit_")
    save(IVFPQNeighbors(memory=str(tmp_path), random_state=3), path)
    params = load(path).get_params()
    assert params["memory"] == str(tmp_path) and params["random_state"] == 3


def test_optional_attributes_round_trip(data, tmp_path):
    """feature_names_in_ (an object array of str), effective_metric_ and
    scikit-learn's output configuration are kept; anything else is refused
    at save."""
    X, Q = data
    path = tmp_path / "index.annlearn"
    est = FlatNeighbors().fit(X)
    est.feature_names_in_ = np.array([f"f{i}" for i in range(16)], dtype=object)
    est.effective_metric_ = getattr(est, "effective_metric_", est.metric)
    est.set_output(transform="default")
    save(est, path)
    loaded = load(path)
    assert loaded.feature_names_in_.dtype == object
    np.testing.assert_array_equal(loaded.feature_names_in_, est.feature_names_in_)
    assert loaded.effective_metric_ == est.effective_metric_
    assert loaded._sklearn_output_config == {"transform": "default"}


@pytest.mark.parametrize(
    "attribute, value, match",
    [
        ("n_jobs", np.random.default_rng(0), "params/n_jobs is a Generator"),
        ("mode", object(), "params/mode is a object"),
        ("n_neighbors", [1, 2], "params/n_neighbors is a list"),
        ("notes_", "text", r"state has unknown keys \['notes_'\]"),
        ("_cache", {"a": lambda: 0}, "state/_cache/a is a function"),
        ("n_neighbors", 0, "n_neighbors' parameter of FlatNeighbors must be"),
        ("feature_names_in_", np.array([1, "a"], dtype=object), "object array"),
        ("_center", np.zeros(3, dtype=np.complex64), "dtype complex64"),
    ],
)
def test_save_refuses_what_it_cannot_store(attribute, value, match, data, tmp_path):
    path = tmp_path / "index.annlearn"
    save(FlatNeighbors().fit(data[0]), path)
    before = path.read_bytes()
    est = FlatNeighbors().fit(data[0])
    setattr(est, attribute, value)
    with pytest.raises(ValueError, match=match):
        save(est, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["index.annlearn"]


@pytest.mark.parametrize(
    "random_state",
    [np.random.default_rng(0), np.random.RandomState(np.random.PCG64(0))],
    ids=["Generator", "RandomState(PCG64)"],
)
def test_save_refuses_other_random_states(random_state, tmp_path):
    with pytest.raises(ValueError, match="params/random_state is a"):
        save(IVFPQNeighbors(random_state=random_state), tmp_path / "x.annlearn")


def test_save_refuses_other_objects(tmp_path):
    class MyFlat(FlatNeighbors):
        pass

    for obj in ({"a": 1}, MyFlat()):
        with pytest.raises(TypeError, match="save writes FlatNeighbors and"):
            save(obj, tmp_path / "x.annlearn")
    assert os.listdir(tmp_path) == []


def test_old_joblib_files_are_refused_not_unpickled(data, tmp_path):
    """Unpickling runs code: a pickle that would create a file when unpickled
    is refused without creating it, with the way to convert a trusted one."""
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for compress in (0, 3):
        path = tmp_path / f"old-{compress}.joblib"
        joblib.dump([Payload(), FlatNeighbors().fit(data[0])], path, compress=compress)
        with pytest.raises(ValueError, match="annlearn.load never unpickles") as info:
            load(path)
        assert str(path) in str(info.value)
        assert "annlearn.save(joblib.load(old_path), new_path)" in str(info.value)
        assert not marker.exists()
    # Converting a trusted old file as the message says.
    old = tmp_path / "old.joblib"
    joblib.dump(FlatNeighbors(n_neighbors=2).fit(data[0]), old)
    save(joblib.load(old), tmp_path / "new.annlearn")
    assert load(tmp_path / "new.annlearn").n_neighbors == 2


def test_load_arguments(data, tmp_path):
    path = tmp_path / "index.annlearn"
    save(FlatNeighbors().fit(data[0]), path)
    with pytest.raises(ValueError, match="mmap_mode must be None, 'r' or 'c'"):
        load(path, mmap_mode="r+")
    copy = load(path, mmap_mode="c")
    copy._store.vectors[0] = 0.0  # copy-on-write: never written back
    assert load(path)._store.vectors[0].any()
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.annlearn")


def test_save_is_atomic(data, tmp_path, monkeypatch):
    X, Q = data
    path = tmp_path / "index.annlearn"
    save(FlatNeighbors(n_neighbors=2).fit(X), path)
    before = path.read_bytes()

    def crash(f, arrays, position):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(_file_format, "_write_arrays", crash)
    with pytest.raises(OSError, match="disk full"):
        save(FlatNeighbors(n_neighbors=3).fit(Q), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["index.annlearn"]  # no temporary left over
    monkeypatch.undo()
    assert load(path).n_neighbors == 2
    save(FlatNeighbors(n_neighbors=3).fit(Q), path)  # replaces it
    assert load(path).n_neighbors == 3


def test_save_keeps_permissions(data, tmp_path):
    path = tmp_path / "index.annlearn"
    save(FlatNeighbors().fit(data[0]), path)
    assert path.stat().st_mode & 0o777 == 0o644
    os.chmod(path, 0o600)
    save(FlatNeighbors().fit(data[0]), path)
    assert path.stat().st_mode & 0o777 == 0o600


# A save that stops in the middle of writing its arrays, and says so.
_STALLED_SAVE = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from annlearn import FlatNeighbors, _file_format, save

    def stall(f, arrays, position):
        f.write(b"\\0" * 100)
        f.flush()
        print("writing", flush=True)
        time.sleep(600)

    _file_format._write_arrays = stall
    save(FlatNeighbors(n_neighbors=7).fit(np.eye(4)), sys.argv[1])
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and flock")
def test_killed_save_leaves_a_temporary_that_the_next_save_removes(data, tmp_path):
    path = tmp_path / "index.annlearn"
    save(FlatNeighbors(n_neighbors=2).fit(data[0]), path)
    # Files that only look like temporaries of this target are not touched.
    others = [".index.annlearn.0123.annlearn-tmp", ".other.annlearn.tmp", "index.tmp"]
    for name in others:
        (tmp_path / name).write_bytes(b"x")
    child = subprocess.Popen(
        [sys.executable, "-c", _STALLED_SAVE, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        (temporary,) = (
            p
            for p in tmp_path.iterdir()
            if p.suffix == ".annlearn-tmp" and p.name not in others
        )
        # Older than the grace period, but locked by a live save: kept.
        past = time.time() - 60
        os.utime(temporary, (past, past))
        save(FlatNeighbors(n_neighbors=3).fit(data[0]), path)
        assert temporary.exists()
        assert load(path).n_neighbors == 3
    finally:
        child.kill()
        child.wait()
    # Killed mid-write: the target is complete, the temporary left behind.
    assert load(path).n_neighbors == 3
    assert temporary.exists()
    os.utime(temporary, (past, past))  # its last write, a minute ago
    save(FlatNeighbors(n_neighbors=4).fit(data[0]), path)
    assert not temporary.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(others + ["index.annlearn"])
    assert load(path).n_neighbors == 4


def test_recent_unlocked_temporary_is_kept(data, tmp_path):
    """Within the grace period a temporary may belong to a save that has
    created it and not yet locked it."""
    path = tmp_path / "index.annlearn"
    temporary = tmp_path / ".index.annlearn.0123456789abcdef.annlearn-tmp"
    temporary.write_bytes(b"")
    save(FlatNeighbors().fit(data[0]), path)
    assert temporary.exists()
    past = time.time() - 60
    os.utime(temporary, (past, past))
    save(FlatNeighbors().fit(data[0]), path)
    assert not temporary.exists()


def test_public_names():
    assert annlearn.load is load and annlearn.save is save
