"""Save and load a sharded index: one annlearn file per shard, a manifest.

A saved index is a directory::

    manifest.json                   what the files are (written last)
    template-<token>.annlearn       the emptied estimator every shard copies
    shard-<token>-00000.annlearn    one annlearn file per shard (no pickle)
    shard-<token>-00001.annlearn
    ...

Each worker writes and reads the files of its own shards, so the directory
must be on a file system that the client and every worker see (NFS, a
parallel file system, a mounted bucket). ``<token>`` is new for every save
and the manifest is replaced atomically after every shard file is written:
a reader sees the previous save or the new one, never a mix, and the files
of the previous save are deleted once the new manifest is in place.

``load`` places the shards on the workers of the cluster at hand in turn,
whatever their number: an index saved from 4 workers loads on 2 (two shards
each) or on 8 (four idle).
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np

from annlearn import _file_format
from annlearn._flat import FlatNeighbors
from annlearn._ivfpq import IVFPQNeighbors
from annlearn._persistence import load as load_local
from annlearn._persistence import save as save_local
from annlearn._version import __version__
from annlearn.dask import _shards
from annlearn.dask._cluster import gather, resolve_client, share, worker_addresses

__all__ = ["load", "save"]

MANIFEST = "manifest.json"
# Version of the manifest's layout.
MANIFEST_VERSION = 1
_KEYS = {
    "format",
    "manifest_version",
    "annlearn_version",
    "estimator",
    "params",
    "n_features_in_",
    "feature_names_in_",
    "template",
    "shards",
}


def _classes() -> dict:
    """Sharded estimator -> the local estimator of its shards (a fixed table:
    a manifest never names code to import)."""
    from annlearn.dask._flat import DaskFlatNeighbors
    from annlearn.dask._ivfpq import DaskIVFPQNeighbors

    return {
        "DaskFlatNeighbors": (DaskFlatNeighbors, FlatNeighbors),
        "DaskIVFPQNeighbors": (DaskIVFPQNeighbors, IVFPQNeighbors),
    }


def save(estimator, path) -> None:
    """Write a fitted sharded index to the directory ``path``.

    Every worker writes its shards (annlearn files, see
    :func:`annlearn.save`) into ``path``, which must be visible to the
    client and to every worker; the client writes the template and, last,
    the manifest. Nothing is pickled.

    Parameters
    ----------
    estimator : DaskFlatNeighbors or DaskIVFPQNeighbors
        A fitted sharded estimator.
    path : str or path-like
        Directory, created if missing. A previous save there is replaced
        (atomically: see the module docstring).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from distributed import Client
    >>> from annlearn.dask import DaskFlatNeighbors, load, save
    >>> client = Client(processes=False, n_workers=2, threads_per_worker=1)
    >>> X = np.random.default_rng(0).standard_normal((100, 4), dtype=np.float32)
    >>> path = tempfile.mkdtemp()
    >>> save(DaskFlatNeighbors(n_neighbors=2).fit(X), path)
    >>> load(path).kneighbors(X[:1], return_distance=False)[0, 0]
    np.int64(0)
    >>> client.close()
    """
    from sklearn.utils.validation import check_is_fitted

    name = type(estimator).__name__
    if _classes().get(name, (None,))[0] is not type(estimator):
        raise TypeError(
            f"annlearn.dask.save writes {' and '.join(_classes())}, got {name}."
        )
    check_is_fitted(estimator)
    arrays = []
    params = _file_format.encode(estimator.get_params(), "params", arrays)
    if arrays:
        raise ValueError(
            "random_state must be an int or None to save a sharded index (it is "
            "not needed once fitted: set_params(random_state=None))."
        )
    index = estimator._index
    client = index.client
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    previous = _previous_files(path)
    token = uuid.uuid4().hex[:12]
    template = f"template-{token}.annlearn"
    save_local(index.template, os.path.join(path, template))
    files = [f"shard-{token}-{i:05d}.annlearn" for i in range(len(index.shards))]
    written = gather(
        client,
        [
            client.submit(_shards.save_shard, shard, os.path.join(path, f), pure=False)
            for shard, f in zip(index.shards, files, strict=True)
        ],
        "annlearn.dask.save",
    )
    names = getattr(estimator, "feature_names_in_", None)
    manifest = {
        "format": "annlearn.dask",
        "manifest_version": MANIFEST_VERSION,
        "annlearn_version": __version__,
        "estimator": name,
        "params": params,
        "n_features_in_": estimator.n_features_in_,
        "feature_names_in_": None if names is None else [str(s) for s in names],
        "template": template,
        "shards": [
            {"file": f, "n_samples": int(n), "bytes": int(b)}
            for f, n, b in zip(files, index.sizes, written, strict=True)
        ],
    }
    temporary = os.path.join(path, f".{MANIFEST}.{token}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(path, MANIFEST))
    for old in previous:
        if old != template and old not in files:
            try:
                os.remove(os.path.join(path, old))
            except FileNotFoundError:
                pass


def _previous_files(path: str) -> list[str]:
    """The files of the save now in ``path`` (none if unreadable)."""
    try:
        manifest = _read_manifest(path)
    except (OSError, ValueError):
        return []
    return [manifest["template"]] + [s["file"] for s in manifest["shards"]]


def _read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != "annlearn.dask":
        raise ValueError(f"{MANIFEST} is not the manifest of a sharded index.")
    version = manifest.get("manifest_version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ValueError(
            f"its manifest has version {version!r}; annlearn {__version__} "
            f"reads versions up to {MANIFEST_VERSION}. Upgrade annlearn."
        )
    if set(manifest) != _KEYS:
        raise ValueError(
            f"its manifest has keys {sorted(manifest)}, expected {sorted(_KEYS)}."
        )
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise ValueError("its manifest lists no shard.")
    for entry in [manifest["template"]] + [s.get("file") for s in shards]:
        # Names inside the directory only: a manifest never points elsewhere.
        if not isinstance(entry, str) or os.path.basename(entry) != entry:
            raise ValueError(f"its manifest names a file {entry!r}.")
    return manifest


def load(path, client=None, *, mmap_mode=None, verify=None):
    """Read a sharded index written by :func:`save` onto a cluster.

    The shards are placed on the workers in turn, each worker reading its
    own files (:func:`annlearn.load`, which checks every array), so the
    cluster may have another number of workers than the one that saved.

    Parameters
    ----------
    path : str or path-like
        The directory given to :func:`save`, visible to every worker.
    client : distributed.Client, default=None
        The cluster; ``None``: the default client.
    mmap_mode : {None, "r", "c"}, default=None
        As :func:`annlearn.load`'s, on each worker: ``"r"`` maps the shard
        files instead of reading them (the workers' page cache holds them).
    verify : bool, default=None
        As :func:`annlearn.load`'s.

    Returns
    -------
    estimator : DaskFlatNeighbors or DaskIVFPQNeighbors

    Raises
    ------
    ValueError
        If the manifest or a file is missing, damaged or inconsistent with
        the others (the message names the directory and the problem).
    """
    client = resolve_client(client)
    path = os.fspath(path)
    try:
        manifest = _read_manifest(path)
        classes = _classes().get(manifest["estimator"])
        if classes is None:
            raise ValueError(f"it holds an unknown {manifest['estimator']!r}.")
        cls, local_cls = classes
        params = _file_format.decode(manifest["params"], "params", {}, set())
        estimator = cls(**params)
        estimator._validate_params()
        template = load_local(os.path.join(path, manifest["template"]))
        if type(template) is not local_cls or template.n_samples_fit_ != 0:
            raise ValueError("its template is not an empty " + local_cls.__name__)
        n_features = manifest["n_features_in_"]
        if template.n_features_in_ != n_features:
            raise ValueError("its template and manifest differ in n_features_in_.")
        workers = worker_addresses(client)
        template_future = share(client, template)
        shards = []
        for i, entry in enumerate(manifest["shards"]):
            shard = client.submit(
                _shards.load_shard,
                os.path.join(path, entry["file"]),
                mmap_mode,
                verify,
                workers=[workers[i % len(workers)]],
                allow_other_workers=True,
                pure=False,
            )
            shards.append(
                client.submit(
                    _shards.check_shard,
                    shard,
                    template_future,
                    entry["n_samples"],
                    pure=False,
                )
            )
        estimator.n_features_in_ = n_features
        if manifest["feature_names_in_"] is not None:
            estimator.feature_names_in_ = np.asarray(
                manifest["feature_names_in_"], dtype=object
            )
        estimator._publish(
            estimator._make_index(client, shards, template, template_future)
        )
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ValueError(
            f"Cannot load a sharded annlearn index from {path!r}: {exc}"
        ) from exc
    return estimator
