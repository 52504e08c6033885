"""Persistence of annlearn's estimators: their state, and annlearn files.

The state (``__getstate__``) is plain numpy arrays and Python scalars, so
``pickle`` and ``joblib.dump``/``joblib.load(path, mmap_mode="r")`` work as
for any scikit-learn estimator. Unpickling runs whatever code the file names,
so these are for files one wrote oneself.

:func:`save` and :func:`load` write and read the same state in annlearn's
own file format (``_file_format``), which holds no pickle: a JSON header and
raw arrays. ``load`` accepts only the estimator classes and state keys of
``_SCHEMAS`` below, then rebuilds the estimator through ``__setstate__``, so
that the estimator's own checks run exactly as for a pickle.

On top of scikit-learn's own ``_sklearn_version`` the state records:

- ``_annlearn_version``: the annlearn release that wrote it (information);
- ``_annlearn_format``: the version of the data layout. A reader refuses a
  layout newer than it knows, with a message saying so; older layouts are
  read (upgraded in ``__setstate__``) as long as annlearn supports them.

Tables derived from the fitted quantizers are not stored: they are rebuilt
on load (``_derive_tables``), which keeps files small and cannot disagree
with the quantizers. The arrays of the index are checked for consistency on
load (``_check_state``: shapes, dtypes, list offsets, code ranges, ids, finite
quantizers), so that a tampered or truncated state fails with a clear error
instead of reading out of bounds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import sklearn
from sklearn.utils._param_validation import validate_parameter_constraints

from annlearn import _file_format
from annlearn._version import __version__

__all__ = [
    "FORMAT_VERSION",
    "PersistenceMixin",
    "check_array_state",
    "check_ids_state",
    "load",
    "save",
]

# Version of the data layout written by this annlearn.
# 1: the first layout.
# 2: FlatNeighbors also stores its principal-component bound
#    (``_store["bound"]``, None for brute force).
# 3: IVFPQNeighbors with metric="inner_product" stores the lift of its cells
#    (``_ip_lift``, None for the other metrics and for older files, whose
#    cells stay probed by the largest inner product).
# 4: IVFPQNeighbors (its re-ranking copy) and FlatNeighbors may store their
#    vectors as float16 or uint8 (``vector_dtype``); uint8 with its
#    per-feature ``_vector_offset`` and ``_vector_scale`` (None otherwise, and
#    in older files: float32).
# 5: IVFPQNeighbors fitted with a target_recall stores the settings it chose
#    and their calibration (``nprobe_``, ``refine_factor_``,
#    ``calibration_recall_``, ``calibration_results_``); absent otherwise.
FORMAT_VERSION = 5
# The data layout of the first annlearn files (earlier layouts were pickled).
_FIRST_FILE_LAYOUT = 2


class PersistenceMixin:
    """Versioned ``__getstate__``/``__setstate__`` for annlearn estimators.

    Subclasses list their derived attributes in ``_derived_attributes``,
    rebuild them (and their ``_store`` object, saved as ``to_state()``'s dict
    of arrays) in ``_derive_tables``, check their arrays in
    ``_check_state`` and bring older layouts up to date in
    ``_upgrade_state``.
    """

    _derived_attributes: tuple[str, ...] = ()
    # Process-local helpers (weak references, caches), never saved.
    _transient_attributes: tuple[str, ...] = ("_fit_source", "_exact_ref")

    def __getstate__(self):
        # A copy: object.__getstate__ may return the instance __dict__ itself.
        state = dict(super().__getstate__())
        for name in self._derived_attributes + self._transient_attributes:
            state.pop(name, None)
        store = state.get("_store")
        if store is not None and not isinstance(store, dict):
            # The store object as plain arrays; _derive_tables rebuilds it.
            state["_store"] = store.to_state()
        state["_annlearn_version"] = __version__
        state["_annlearn_format"] = FORMAT_VERSION
        return state

    def __setstate__(self, state):
        state = dict(state)
        layout = state.pop("_annlearn_format", None)
        written_by = state.pop("_annlearn_version", "unknown")
        if layout is not None and layout > FORMAT_VERSION:
            raise ValueError(
                f"This {type(self).__name__} was saved by annlearn {written_by} "
                f"with data layout version {layout}; annlearn {__version__} reads "
                f"layouts up to version {FORMAT_VERSION}. Upgrade annlearn to "
                "load it."
            )
        if "n_samples_fit_" in state:
            # States written before layouts were versioned are layout 1.
            state = self._upgrade_state(state, 1 if layout is None else layout)
        super().__setstate__(state)
        if "n_samples_fit_" in state:
            self._check_state()
            self._derive_tables()

    def _upgrade_state(self, state: dict, layout: int) -> dict:
        """A fitted state written with data layout ``layout``, brought to
        ``FORMAT_VERSION``."""
        return state

    def _derive_tables(self) -> None:
        """Rebuild the attributes listed in ``_derived_attributes``."""

    def _check_state(self) -> None:
        """Raise ValueError if the fitted arrays are inconsistent."""


def check_array_state(
    owner: str,
    name: str,
    array,
    *,
    dtype,
    ndim: int,
    shape=None,
    finite: bool = False,
    low=None,
    distinct: bool = False,
) -> None:
    """Check one array of a loaded state.

    Its type, dtype, dimensions and shape (``None`` for any length); then
    optionally its values: ``finite`` (no NaN or infinity), at least
    ``low``, and ``distinct`` (no value twice, for ids).
    """
    if not isinstance(array, np.ndarray):
        raise ValueError(
            f"Corrupted {owner} state: {name} should be a numpy array, got "
            f"{type(array).__name__}."
        )
    if array.dtype != dtype or array.ndim != ndim:
        raise ValueError(
            f"Corrupted {owner} state: {name} should be a {ndim}-d {np.dtype(dtype)} "
            f"array, got {array.ndim}-d {array.dtype}."
        )
    if shape is not None:
        for axis, expected in enumerate(shape):
            if expected is not None and array.shape[axis] != expected:
                raise ValueError(
                    f"Corrupted {owner} state: {name} has shape {array.shape}, "
                    f"expected {tuple('any' if s is None else s for s in shape)}."
                )
    if finite and not np.isfinite(array).all():
        raise ValueError(f"Corrupted {owner} state: {name} holds NaN or infinity.")
    if low is not None and array.size and array.min() < low:
        raise ValueError(
            f"Corrupted {owner} state: {name} must be >= {low}, found {array.min()}."
        )
    if distinct and not _distinct(array):
        raise ValueError(f"Corrupted {owner} state: {name} must be distinct.")


def check_ids_state(owner: str, ids, n: int) -> None:
    """Check the ids of a loaded index: ``n`` distinct int64 values >= 0."""
    check_array_state(
        owner, "ids", ids, dtype=np.int64, ndim=1, shape=(n,), low=0, distinct=True
    )


def _distinct(values: np.ndarray) -> bool:
    """Whether the integers ``values`` are all different."""
    if len(values) < 2:
        return True
    low, high = int(values.min()), int(values.max())
    if 0 <= low and high < 4 * len(values):
        # Dense values (ids 0 .. n - 1 by default): a bitmap costs less than a
        # sort.
        seen = np.zeros(high + 1, dtype=bool)
        seen[values] = True
        return np.count_nonzero(seen) == len(values)
    ordered = np.sort(values)
    return not np.any(ordered[1:] == ordered[:-1])


# -- what an annlearn file may hold ------------------------------------------


class _Kind(NamedTuple):
    """A leaf of a state schema: what the value must be, and the test."""

    description: str
    accepts: Callable[[object], bool]


class _Maybe(NamedTuple):
    """A sub-schema whose value may also be None."""

    schema: dict


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype != object


_ARRAY = _Kind("a numeric array", _is_array)
_ARRAY_OR_NONE = _Kind("a numeric array or null", lambda v: v is None or _is_array(v))
_COUNT = _Kind("an integer >= 0", lambda v: type(v) is int and v >= 0)
_COUNT_OR_NONE = _Kind(
    "an integer >= 0 or null", lambda v: v is None or (type(v) is int and v >= 0)
)
_FLOAT = _Kind("a float", lambda v: type(v) is float)
_BOOL = _Kind("a bool", lambda v: type(v) is bool)
_STR = _Kind("a string", lambda v: type(v) is str)
_STRINGS = _Kind(
    "an array of strings",
    lambda v: isinstance(v, np.ndarray) and v.dtype == object,
)
_STR_DICT = _Kind(
    "an object of strings",
    lambda v: isinstance(v, dict) and all(type(s) is str for s in v.values()),
)

# The fitted state of each estimator, as __getstate__ returns it: all these
# keys once fitted, none before. The parameters are those of get_params,
# checked against the class's _parameter_constraints.
_SCHEMAS = {
    "FlatNeighbors": {
        "n_features_in_": _COUNT,
        "n_samples_fit_": _COUNT,
        "n_bound_components_": _COUNT,
        "_center": _ARRAY_OR_NONE,
        "_store": {
            "vectors": _ARRAY,
            "sqnorms": _ARRAY,
            "ids": _ARRAY,
            "bound": _Maybe(
                {
                    "mean": _ARRAY,
                    "rotation": _ARRAY,
                    "vectors": _ARRAY,
                    "sqnorms": _ARRAY,
                    "max_sqnorm": _FLOAT,
                }
            ),
        },
    },
    "IVFPQNeighbors": {
        "n_features_in_": _COUNT,
        "n_samples_fit_": _COUNT,
        "cluster_centers_": _ARRAY,
        "pq_codebooks_": _ARRAY,
        "n_subquantizers_": _COUNT,
        "_center_sqnorms": _ARRAY,
        "_store": {
            "list_offsets": _ARRAY,
            "codes": _ARRAY,
            "ids": _ARRAY,
            "vectors": _ARRAY_OR_NONE,
        },
    },
}
# Keys a state may hold or not: scikit-learn's, and those that states written
# before they existed lack (the estimator's _upgrade_state fills them in).
_OPTIONAL = {
    "FlatNeighbors": {
        "effective_metric_": _STR,
        "_vector_offset": _ARRAY_OR_NONE,
        "_vector_scale": _ARRAY_OR_NONE,
    },
    "IVFPQNeighbors": {
        "effective_metric_": _STR,
        "_by_residual": _BOOL,
        "_ip_lift": _Maybe({"extra": _ARRAY, "max_sqnorm": _FLOAT}),
        "_vector_offset": _ARRAY_OR_NONE,
        "_vector_scale": _ARRAY_OR_NONE,
        # All four or none: fitted with a target_recall.
        "nprobe_": _COUNT,
        "refine_factor_": _COUNT_OR_NONE,
        "calibration_recall_": _FLOAT,
        "calibration_results_": {
            "nprobe": _ARRAY,
            "refine_factor": _ARRAY,
            "recall": _ARRAY,
            "cost": _ARRAY,
            "qps": _ARRAY,
        },
    },
}
# Parameters added after the first file layout, which older files lack.
_PARAMS_ADDED_LATER = {
    "FlatNeighbors": ("radius", "vector_dtype"),
    "IVFPQNeighbors": ("radius", "vector_dtype", "target_recall"),
}
_OPTIONAL_EVERYWHERE = {
    "feature_names_in_": _STRINGS,
    "_sklearn_version": _STR,
    "_sklearn_output_config": _STR_DICT,
}


def _estimator_classes() -> dict:
    """The classes an annlearn file may hold, by name: a fixed table, never a
    name imported from a file."""
    # Imported here: both modules import this one.
    from annlearn._flat import FlatNeighbors
    from annlearn._ivfpq import IVFPQNeighbors

    return {"FlatNeighbors": FlatNeighbors, "IVFPQNeighbors": IVFPQNeighbors}


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"{type(value).__name__} {value!r:.60}"


def _check_keys(tree: dict, expected, where: str) -> None:
    unknown = sorted(set(tree) - set(expected))
    missing = sorted(set(expected) - set(tree))
    if unknown or missing:
        problems = [f"unknown keys {unknown}"] if unknown else []
        problems += [f"missing keys {missing}"] if missing else []
        raise ValueError(f"{where} has {' and '.join(problems)}.")


def _check_tree(tree: dict, schema: dict, where: str) -> None:
    """Raise ValueError unless ``tree`` has exactly the keys of ``schema``,
    each holding a value of its kind."""
    _check_keys(tree, schema, where)
    for key, kind in schema.items():
        value, here = tree[key], f"{where}/{key}"
        if isinstance(kind, _Maybe):
            if value is None:
                continue
            kind = kind.schema
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise ValueError(f"{here} must be an object, got {_describe(value)}.")
            _check_tree(value, kind, here)
        elif not kind.accepts(value):
            raise ValueError(
                f"{here} must be {kind.description}, got {_describe(value)}."
            )


def _check_contents(cls: type, params: dict, state: dict) -> None:
    """Raise ValueError unless ``params`` and ``state`` are what a ``cls``
    may hold: the keys and kinds of the schema, and valid parameters."""
    name = cls.__name__
    layout = state.get("_annlearn_format")
    if not _COUNT.accepts(layout) or layout < _FIRST_FILE_LAYOUT:
        raise ValueError(
            f"state/_annlearn_format must be an integer >= {_FIRST_FILE_LAYOUT}, "
            f"got {layout!r}."
        )
    if layout > FORMAT_VERSION:
        raise ValueError(
            f"written with data layout version {layout}; annlearn {__version__} "
            f"reads layouts up to {FORMAT_VERSION}. Upgrade annlearn to load it."
        )
    optional = {**_OPTIONAL_EVERYWHERE, **_OPTIONAL[name], "_annlearn_format": _COUNT}
    present = {key: optional[key] for key in state if key in optional}
    _check_tree({key: state[key] for key in present}, present, "state")
    fitted = {key: value for key, value in state.items() if key not in optional}
    if fitted:
        _check_tree(fitted, _SCHEMAS[name], "state")
        names = state.get("feature_names_in_")
        if names is not None and names.shape != (fitted["n_features_in_"],):
            raise ValueError(
                f"state/feature_names_in_ has {len(names)} names for "
                f"{fitted['n_features_in_']} features."
            )
    _check_keys(params, cls().get_params(deep=False), "params")
    validate_parameter_constraints(cls._parameter_constraints, params, caller_name=name)


# -- save and load -------------------------------------------------------------


def save(estimator, path) -> None:
    """Write an annlearn estimator to ``path`` atomically, in annlearn's
    file format, which holds no pickle.

    The file is a JSON header (format version, estimator class, parameters,
    the annlearn, numpy and scikit-learn versions, fitted scalars, a table of
    the arrays with their dtype, shape, offset and CRC-32 checksum) followed
    by the raw arrays, each at a 64-byte aligned offset, so that
    :func:`load` can memory-map them. The layout is described in
    ``annlearn/_file_format.py``.

    The file is first written in full to a temporary file next to ``path``
    (``.<name>.<random>.annlearn-tmp``), flushed to disk, then renamed over
    ``path``: readers see the old file or the new one, never a partial one,
    and a failure leaves ``path`` as it was. A save killed mid-write leaves
    its temporary file behind; the next save to the same ``path`` deletes
    it.

    Parameters
    ----------
    estimator : FlatNeighbors or IVFPQNeighbors
        The estimator, fitted or not.
    path : str or path-like
        Destination file.

    Raises
    ------
    TypeError
        If ``estimator`` is not a FlatNeighbors or an IVFPQNeighbors
        (subclasses included: the file could not name them).
    ValueError
        If an attribute holds a value an annlearn file cannot hold (the
        message names it): the file holds dicts, numeric numpy arrays, str,
        int, float, bool, None, arrays of str (``feature_names_in_``), a
        ``numpy.random.RandomState`` as ``random_state`` (its exact state)
        and a ``joblib.Memory`` as ``memory`` (its location only: it is
        loaded back as that str, or None), or an attribute or parameter
        :func:`load` would refuse. Nothing is written then.

    See Also
    --------
    load : Read the file back.

    Notes
    -----
    Pickle and ``joblib.dump`` also work, as for any scikit-learn estimator,
    but unpickling a file runs whatever code it names: only
    ``pickle.load``/``joblib.load`` files you wrote yourself, and use
    :func:`save`/:func:`load` for files that may come from elsewhere.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from annlearn import FlatNeighbors, load, save
    >>> index = FlatNeighbors(n_neighbors=1).fit(np.eye(3))
    >>> path = os.path.join(tempfile.mkdtemp(), "index.annlearn")
    >>> save(index, path)
    >>> load(path, mmap_mode="r").kneighbors([[0, 1, 0]], return_distance=False)
    array([[1]])
    """
    classes = _estimator_classes()
    cls = classes.get(type(estimator).__name__)
    if type(estimator) is not cls:
        raise TypeError(
            f"save writes {' and '.join(classes)} estimators, got "
            f"{type(estimator).__name__}."
        )
    state = estimator.__getstate__()
    state.pop("_annlearn_version", None)
    params = estimator.get_params(deep=False)
    for key in params:
        state.pop(key, None)
    arrays = []
    json_params = _file_format.encode(params, "params", arrays)
    json_state = _file_format.encode(state, "state", arrays)
    # Refuse now what load would refuse: such a file could not be read back.
    _decode_and_check(cls, json_params, json_state, dict(arrays))
    _file_format.write_file(
        os.fspath(path),
        {
            "format_version": _file_format.FILE_FORMAT_VERSION,
            "estimator": cls.__name__,
            "versions": {
                "annlearn": __version__,
                "numpy": np.__version__,
                "scikit-learn": sklearn.__version__,
            },
            "params": json_params,
            "state": json_state,
        },
        arrays,
    )


def _decode_and_check(cls: type, json_params, json_state, arrays: dict):
    """(params, state) of a header, checked: arrays from ``arrays``, each used
    once."""
    used = set()
    params = _file_format.decode(json_params, "params", arrays, used)
    state = _file_format.decode(json_state, "state", arrays, used)
    if not isinstance(params, dict) or not isinstance(state, dict):
        raise ValueError("params and state must be objects, not tagged values.")
    # Files written before a parameter existed load with its default.
    defaults = cls().get_params(deep=False)
    added = _PARAMS_ADDED_LATER[cls.__name__]
    params = {**{key: defaults[key] for key in added}, **params}
    _check_contents(cls, params, state)
    unused = sorted(set(arrays) - used)
    if unused:
        raise ValueError(f"the array table lists {unused}, which nothing uses.")
    return params, state


def load(path, *, mmap_mode=None, verify=None):
    """Read an annlearn estimator written by :func:`save`, never unpickling.

    Only the estimator classes FlatNeighbors and IVFPQNeighbors, their
    parameters and their known fitted attributes are accepted, each checked
    for its type; the estimator is then rebuilt through ``__setstate__``,
    whose checks refuse inconsistent arrays. Files written by
    ``joblib.dump``, ``pickle`` or the ``save`` of earlier annlearn versions
    are refused, not unpickled.

    Parameters
    ----------
    path : str or path-like
        The file.
    mmap_mode : {None, "r", "c"}, default=None
        ``None`` reads the arrays into memory. ``"r"`` maps them read-only
        from the file, without copying: loading costs little time and
        resident memory, and pages are read when a search touches them.
        ``"c"`` maps them copy-on-write (writable, never written back).
        ``add``/``remove`` on a mapped index build new arrays in memory and
        never write to the file.
    verify : bool, default=None
        Whether to verify the checksums of every array. ``None`` means
        ``True`` without ``mmap_mode`` and ``False`` with it. What is
        verified:

        - always: the checksums of the preamble, of the header and of every
          array of at most 1 MiB (the quantizers, the list offsets, all of
          a small index), the zero padding between arrays, the file size,
          and the estimator's consistency checks (shapes and dtypes, list
          offsets, codes below ``2**nbits``, ids non-negative and distinct,
          finite quantizers), which read the ids and, for ``nbits < 8``,
          the codes;
        - if ``verify``: also the checksums of the larger arrays (codes, ids
          and vectors of a large index). With ``mmap_mode`` this reads the
          whole file once, through the page cache, and still maps it.

        So a memory-mapped load of a large index does not detect a damaged
        byte in its vectors or codes; load it once with ``verify=True``
        (after copying or downloading it, say) to check every byte.

    Returns
    -------
    estimator : FlatNeighbors or IVFPQNeighbors

    Raises
    ------
    ValueError
        If the file is empty, truncated, damaged (a checksum does not match),
        not an annlearn file (a pickle or joblib file included: the message
        says how to convert a trusted one), written by a newer annlearn, or
        holds an unknown class, unknown keys, values of the wrong type or
        inconsistent arrays. The message names the file and the problem.
    OSError
        If the file cannot be opened.

    See Also
    --------
    save : Write an annlearn file.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from annlearn import FlatNeighbors, load, save
    >>> X = np.random.default_rng(0).standard_normal((100, 8), dtype=np.float32)
    >>> path = os.path.join(tempfile.mkdtemp(), "index.annlearn")
    >>> save(FlatNeighbors(n_neighbors=3).fit(X), path)
    >>> index = load(path, mmap_mode="r")
    >>> index.kneighbors(X[:2], return_distance=False)
    array([[ 0, 65, 39],
           [ 1, 90, 10]])
    """
    path = os.fspath(path)
    if mmap_mode not in (None, "r", "c"):
        raise ValueError(f"mmap_mode must be None, 'r' or 'c', got {mmap_mode!r}.")
    if verify is None:
        verify = mmap_mode is None
    try:
        header, arrays = _file_format.read_file(
            path, mmap_mode=mmap_mode, verify=verify
        )
        cls = _estimator_classes().get(header["estimator"])
        if cls is None:
            raise ValueError(
                f"it holds a {header['estimator']!r}; annlearn files hold "
                f"{' and '.join(_estimator_classes())} estimators."
            )
        params, state = _decode_and_check(
            cls, header["params"], header["state"], arrays
        )
        state.update(params, _annlearn_version=header["versions"]["annlearn"])
        estimator = cls.__new__(cls)
        try:
            estimator.__setstate__(state)
        except (TypeError, LookupError, AttributeError, ArithmeticError) as exc:
            # The checks above should leave nothing for these to catch.
            raise ValueError(
                f"its state is inconsistent ({type(exc).__name__}: {exc})."
            ) from exc
    except ValueError as exc:
        raise ValueError(
            f"Cannot load an annlearn estimator from {path!r}: {exc}"
        ) from exc
    return estimator
