"""The annlearn file format against damaged, truncated, foreign and crafted
files: every one is refused with a ValueError naming the file, before
anything large is allocated and before anything reaches a search kernel.

Files are read and crafted here from the layout documented in
annlearn/_file_format.py, independently of its reader.
"""

import json
import math
import os
import pickle
import struct
import zlib

import numpy as np
import pytest

from annlearn import FlatNeighbors, IVFPQNeighbors, _file_format, load, save
from annlearn._ivfpq_codec import IVFPQCodec
from annlearn._persistence import FORMAT_VERSION
from annlearn._quantizers import CoarseQuantizer

MAGIC = b"\x89annlearn\r\n\x1a\n"


def _align(n):
    return -(-n // 64) * 64


def _split(raw):
    """(header, {name: array}) of a file, by the documented layout."""
    (size,) = struct.unpack_from("<Q", raw, 20)
    header = json.loads(raw[36 : 36 + size])
    arrays = {
        entry["name"]: np.frombuffer(
            raw,
            dtype=entry["dtype"],
            count=math.prod(entry["shape"]),
            offset=entry["offset"],
        )
        .reshape(entry["shape"])
        .copy()
        for entry in header["arrays"]
    }
    return header, arrays


def _preamble(text, version=1):
    fields = struct.pack("<13s3xIQI", MAGIC, version, len(text), zlib.crc32(text))
    return fields + struct.pack("<I", zlib.crc32(fields))


def _with_header(raw, header):
    """The file ``raw`` with another header (checksums right) and the same
    data bytes, moved with the offsets that point at them if the header
    needs more room."""
    (size,) = struct.unpack_from("<Q", raw, 20)
    old_start = start = _align(36 + size)
    while True:
        moved = json.loads(json.dumps(header))
        table = moved.get("arrays") if isinstance(moved, dict) else None
        for entry in table if isinstance(table, list) else []:
            if isinstance(entry, dict) and type(entry.get("offset")) is int:
                entry["offset"] += start - old_start
        text = json.dumps(moved).encode()
        text += b" " * (size - len(text))  # JSON allows trailing blanks
        if _align(36 + len(text)) == start:
            break
        start = _align(36 + len(text))
    head = _preamble(text) + text
    return head + bytes(start - len(head)) + raw[old_start:]


def _rewrite(path, edit):
    """Rewrite the file at ``path`` through ``edit(header, arrays)`` with
    consistent checksums and layout (the real writer)."""
    header, arrays = _split(path.read_bytes())
    edit(header, arrays)
    del header["arrays"]
    _file_format.write_file(str(path), header, list(arrays.items()))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((300, 8)).astype(np.float32),
        rng.standard_normal((5, 8)).astype(np.float32),
    )


# A small IVF-PQ index of the 8-feature data.
_SMALL_IVFPQ = dict(n_neighbors=3, nlist=4, nprobe=2, n_subquantizers=2, nbits=4)


@pytest.fixture(scope="module")
def ivfpq_bytes(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("ivfpq") / "ivfpq.annlearn"
    est = IVFPQNeighbors(
        **_SMALL_IVFPQ,
        refine_factor=2,
        random_state=np.random.RandomState(0),
    )
    save(est.fit(data[0][:120], ids=np.arange(120) * 2), path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def flat_bytes(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("flat") / "flat.annlearn"
    est = FlatNeighbors(n_neighbors=3, algorithm="pca_bound").fit(data[0][:64])
    assert est._store.bound is not None
    save(est, path)
    return path.read_bytes()


@pytest.fixture(params=["ivfpq", "flat"])
def saved(request, ivfpq_bytes, flat_bytes, tmp_path):
    """A fresh copy of a saved file, and its bytes."""
    raw = ivfpq_bytes if request.param == "ivfpq" else flat_bytes
    path = tmp_path / f"{request.param}.annlearn"
    path.write_bytes(raw)
    return path, raw


def _refused(path, match=None, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        load(path, **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


def test_the_documented_layout(saved):
    path, raw = saved
    assert raw.startswith(MAGIC) and raw[13:16] == bytes(3)
    header, arrays = _split(raw)
    assert list(header) == [
        "format_version",
        "estimator",
        "versions",
        "params",
        "state",
        "arrays",
    ]
    assert set(header["versions"]) == {"annlearn", "numpy", "scikit-learn"}
    end = 36 + struct.unpack_from("<Q", raw, 20)[0]
    for entry in header["arrays"]:
        assert entry["offset"] == _align(end) and entry["offset"] % 64 == 0
        assert entry["dtype"] in ("<f4", "<f8", "<i8", "<u4", "|u1")
        data = raw[entry["offset"] : entry["offset"] + entry["nbytes"]]
        assert zlib.crc32(data) == entry["crc32"]
        end = entry["offset"] + entry["nbytes"]
    assert end == len(raw)
    # Loaded memory-mapped, the arrays are views of the file, not copies.
    loaded = load(path, mmap_mode="r")
    ids = loaded._store.ids
    assert isinstance(ids, np.memmap) and not ids.flags.owndata
    assert ids.ctypes.data % 64 == 0


def _flip_positions(raw):
    """Every byte of the preamble, the header and the padding, and of the
    first and last 16 bytes of every array; every third byte inside arrays
    (a changed byte fails the CRC-32 wherever it is)."""
    header, _ = _split(raw)
    inside = set()
    for entry in header["arrays"]:
        start, end = entry["offset"] + 16, entry["offset"] + entry["nbytes"] - 16
        inside |= {i for i in range(start, end) if (i - start) % 3}
    return [i for i in range(len(raw)) if i not in inside]


def test_every_flipped_byte_is_detected(saved):
    """A verified load (every array of these small files is verified, even
    memory-mapped) refuses a file with any byte changed."""
    path, raw = saved
    fd = os.open(path, os.O_RDWR)  # bytes changed in place: no rewrite
    try:
        for i in _flip_positions(raw):
            os.pwrite(fd, bytes([raw[i] ^ (0x01, 0x80, 0xFF)[i % 3]]), i)
            with pytest.raises(ValueError, match="Cannot load"):
                load(path, mmap_mode="r" if i % 5 == 0 else None)
            os.pwrite(fd, raw[i : i + 1], i)
    finally:
        os.close(fd)
    assert load(path).n_samples_fit_ > 0


def test_truncated_files(saved):
    path, raw = saved
    path.write_bytes(raw + b"\0")
    _refused(path, "has .* bytes, its header describes")
    header, _ = _split(raw)
    cuts = set(range(0, 200)) | set(range(0, len(raw), 7))
    for entry in header["arrays"]:
        cuts |= {entry["offset"] - 1, entry["offset"], entry["offset"] + 1}
    cuts.add(len(raw) - 1)
    for cut in sorted(cuts, reverse=True):
        os.truncate(path, cut)
        message = _refused(path, mmap_mode="r" if cut % 2 else None)
        assert "empty" in message or "truncated" in message, (cut, message)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "the file is empty"),
        (b"\x89ann", "truncated"),
        (b"hello, world\n" * 10, "not an annlearn file"),
        (np.random.default_rng(1).bytes(5000), "not an annlearn file"),
        (pickle.dumps({"a": 1}), "this is a pickle file"),
        (b"\x1f\x8b\x08\x00" + bytes(50), "compressed joblib file"),
    ],
)
def test_foreign_files(content, match, tmp_path):
    path = tmp_path / "x.annlearn"
    path.write_bytes(content)
    _refused(path, match)


def test_newer_format_and_damaged_preamble(saved):
    path, raw = saved
    text = raw[36 : 36 + struct.unpack_from("<Q", raw, 20)[0]]
    path.write_bytes(_preamble(text, version=2) + raw[36:])
    _refused(path, "file format version 2 by a newer annlearn.*Upgrade")
    path.write_bytes(_preamble(text, version=0) + raw[36:])
    _refused(path, "unknown file format version 0")
    huge = struct.pack("<13s3xIQI", MAGIC, 1, 10**18, 0)
    path.write_bytes(huge + struct.pack("<I", zlib.crc32(huge)) + raw[36:])
    _refused(path, "header would take")


def test_newer_data_layout(saved):
    path, raw = saved
    header, _ = _split(raw)
    newer = FORMAT_VERSION + 1
    header["state"]["_annlearn_format"] = newer
    path.write_bytes(_with_header(raw, header))
    _refused(path, f"data layout version {newer}.*Upgrade annlearn")


def _table_edit(key, value):
    def edit(header):
        header["arrays"][0][key] = value

    return edit


def _claims(shape):
    """An array table entry claiming a huge array, consistently."""

    def edit(header):
        entry = header["arrays"][0]
        entry["shape"] = shape
        entry["nbytes"] = math.prod(shape) * np.dtype(entry["dtype"]).itemsize

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_table_edit("shape", [10**18]), "bytes for shape"),
        (_claims([10**18]), "would end at byte"),
        (_claims([2**40, 2**40]), "would end at byte"),
        (_table_edit("dtype", ">f4"), "dtype '>f4' is not one of"),
        (_table_edit("dtype", "|O"), "dtype '|O' is not one of"),
        (_table_edit("dtype", "<c16"), "is not one of"),
        (_table_edit("offset", 4100), "expected .* multiple of 64"),
        (_table_edit("nbytes", 3), "bytes for shape"),
        (_table_edit("crc32", -1), "is not a uint32"),
        (_table_edit("shape", [-1]), "not a list of at most 8 integers"),
        (_table_edit("name", 3), "not a new string"),
        (lambda h: h["arrays"][0].pop("crc32"), "must hold exactly the keys"),
        (lambda h: h["arrays"].append(h["arrays"][0]), "not a new string"),
        (lambda h: h.update(format_version=2), "header says format version 2"),
        (lambda h: h.update(extra=1), "the header must be a JSON object with"),
        (lambda h: h["versions"].update(numpy=2), "versions must map"),
        (lambda h: h.update(estimator="os.system"), "holds a 'os.system'"),
        (lambda h: h.update(estimator=["x"]), "estimator must be a string"),
        (lambda h: h.update(state=[]), "state must be a JSON object"),
    ],
)
def test_crafted_headers(edit, match, saved):
    path, raw = saved
    header, _ = _split(raw)
    edit(header)
    path.write_bytes(_with_header(raw, header))
    _refused(path, match)


@pytest.mark.parametrize(
    "text, match",
    [
        (b"{not json", "not valid JSON"),
        (b'{"a": NaN}', "NaN, which JSON does not allow"),
        (b'{"a": 1, "a": 2}', "repeats a key"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        pytest.param(
            b"[" * 100_000 + b"]" * 100_000,
            "nested too deeply|not valid JSON",
            id="deep",
        ),
    ],
)
def test_malformed_json(text, match, tmp_path):
    path = tmp_path / "x.annlearn"
    path.write_bytes(_preamble(text) + text)
    _refused(path, match)


def _state(*keys, value):
    def edit(header, arrays):
        node = header["state"]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def _array(name, change):
    def edit(header, arrays):
        arrays[name] = change(arrays[name].copy())

    return edit


def _set(index, value):
    def change(a):
        a[index] = value
        return a

    return change


IVFPQ_CRAFTED = [
    (_array("state/_store/ids", _set(1, 0)), "ids must be distinct"),
    (_array("state/_store/ids", _set(3, -5)), "ids must be >= 0"),
    (_array("state/_store/codes", _set((0, 0), 200)), r"codes must be < 2\*\*nbits"),
    (_array("state/_store/list_offsets", _set(2, 10**6)), "list_offsets must incr"),
    (_array("state/_store/list_offsets", _set(-1, 119)), "list_offsets must incr"),
    (_array("state/_store/list_offsets", lambda a: a[::-1].copy()), "list_offsets"),
    (_array("state/_store/codes", lambda a: a[:-1]), "state: codes has shape"),
    (_array("state/_store/vectors", lambda a: a[:, :-1]), "state: vectors has"),
    (_array("state/_store/ids", lambda a: a.astype("<f8")), "ids should be a 1-d"),
    (_array("state/cluster_centers_", _set((0, 0), np.nan)), "cluster_centers_ hol"),
    (_array("state/pq_codebooks_", _set((0, 0, 0), np.inf)), "pq_codebooks_ holds"),
    (_array("state/_center_sqnorms", lambda a: a[:-1]), "_center_sqnorms has"),
    (_state("n_samples_fit_", value="120"), "n_samples_fit_ must be an integer"),
    (_state("n_subquantizers_", value=3), "not 3 sub-quantizers covering 8"),
    (_state("n_subquantizers_", value=0), "not 0 sub-quantizers"),
    (_state("effective_metric_", value="manhattan"), "metric 'manhattan'"),
    (_state("effective_metric_", value=3), "effective_metric_ must be a string"),
    (_state("_by_residual", value="yes"), "_by_residual must be a bool"),
    (_state("fit_time_", value=1.0), r"unknown keys \['fit_time_'\]"),
    (_state("_store", "extra", value=None), r"_store has unknown keys \['extra'\]"),
    (_state("_store", value=[]), "not a value"),
    (_state("_store", value=None), "_store must be an object"),
    (_state("_store", "ids", value={"$array": "state/_store/codes"}), "twice"),
    (_state("_store", "ids", value={"$array": "nope"}), "not in the array table"),
    (_state("_store", "ids", value={"$pickle": "x"}), "unknown tag"),
    (_state("feature_names_in_", value={"$strings": ["a"]}), "1 names for 8"),
    (_state("feature_names_in_", value={"$strings": [1]}), "list of strings"),
    (_state("_center_sqnorms", value=None), "must be a numeric array"),
    (_state("_annlearn_format", value=1), "_annlearn_format must be an integer >="),
    (lambda h, a: h["state"].pop("pq_codebooks_"), r"missing keys \['pq_codeb"),
    (lambda h, a: h["params"].update(nlist=-1), "'nlist' parameter"),
    (lambda h, a: h["params"].update(nbits=3), "'nbits' parameter"),
    (lambda h, a: h["params"].update(metric="l1"), "'metric' parameter"),
    (lambda h, a: h["params"].update(hack=1), r"params has unknown keys \['hack'\]"),
    (lambda h, a: h["params"].pop("nprobe"), r"missing keys \['nprobe'\]"),
    (lambda h, a: h["params"].update(memory={"$memory": 3}), "string or null"),
    (lambda h, a: h["params"].update(nprobe={"$float": "nan"}), "nprobe"),
    (
        _array("params/random_state/key", lambda a: a[:-1]),
        "not an MT19937 state",
    ),
    (
        lambda h, a: h["params"]["random_state"]["$random_state"].update(pos=625),
        "not an MT19937 state",
    ),
]


def _drop_bound(header, arrays):
    header["state"]["_store"]["bound"] = None
    for name in [name for name in arrays if "/bound/" in name]:
        del arrays[name]


FLAT_CRAFTED = [
    (_state("_store", "bound", "extra", value=1), "bound has unknown keys"),
    (_state("_store", "bound", "max_sqnorm", value="x"), "max_sqnorm must be a fl"),
    (
        _state("_store", "bound", "max_sqnorm", value={"$float": "nan"}),
        "state: bound",
    ),
    (_array("state/_store/bound/rotation", _set((0, 0), np.nan)), "rotation holds"),
    (_array("state/_store/bound/mean", lambda a: a[:-1]), "bound mean has shape"),
    (_state("n_bound_components_", value=1), "bound rotation has shape"),
    (_drop_bound, "n_bound_components_ = .* without"),
    (_state("_center", value={"$strings": ["a"]}), "_center must be a numeric array"),
    (_array("state/_store/sqnorms", lambda a: a[:5]), "sqnorms has shape"),
    (_array("state/_store/ids", _set(0, 7)), "ids must be distinct"),
]


@pytest.mark.parametrize(
    "which, edit, match",
    [("ivfpq", *case) for case in IVFPQ_CRAFTED]
    + [("flat", *case) for case in FLAT_CRAFTED],
)
def test_crafted_states(which, edit, match, ivfpq_bytes, flat_bytes, tmp_path):
    """Consistent checksums, inconsistent or unknown contents."""
    path = tmp_path / f"{which}.annlearn"
    path.write_bytes(ivfpq_bytes if which == "ivfpq" else flat_bytes)
    _rewrite(path, edit)
    for mmap_mode in (None, "r"):
        _refused(path, match, mmap_mode=mmap_mode)


def test_crafted_unused_array(saved):
    path, _ = saved
    _rewrite(path, lambda h, a: a.update(extra=np.zeros(3)))
    _refused(path, r"lists \['extra'\], which nothing uses")


def _leaves(node, where=()):
    """Every position in a JSON tree."""
    yield where
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*where, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, (*where, i))


def _replaced(tree, where, value):
    tree = json.loads(json.dumps(tree))
    node = tree
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    return tree


@pytest.mark.parametrize("which", ["ivfpq", "flat"])
def test_header_fuzz(which, ivfpq_bytes, flat_bytes, data, tmp_path):
    """Every position of the header replaced by values of other types: the
    load raises ValueError, or gives an estimator that searches (or refuses
    a query with ValueError, as a fitted one with those parameters does)."""
    raw = ivfpq_bytes if which == "ivfpq" else flat_bytes
    header, _ = _split(raw)
    values = [None, True, -1, 0, 7, 2**63, 10**400, 1.5, "x", [], {}, [1], {"a": 1}]
    values += [{"$array": "state/_store/ids"}, {"$float": "inf"}, {"$strings": []}]
    loaded = 0
    for where in list(_leaves(header))[1:]:
        for value in values:
            # A new file each time: rewriting one in place syncs it (ext4).
            path = tmp_path / f"fuzz-{len(where)}-{loaded}-{hash((where, repr(value)))}"
            path.write_bytes(_with_header(raw, _replaced(header, where, value)))
            try:
                estimator = load(path)
            except ValueError:
                continue
            loaded += 1
            try:
                estimator.kneighbors(data[1])
            except ValueError:
                pass
    assert loaded > 0  # harmless changes (versions, n_jobs, ...) do load


def test_mapped_load_verifies_small_arrays_and_on_request(data, tmp_path, monkeypatch):
    """What load(mmap_mode="r") verifies, as documented: the header and the
    arrays up to ALWAYS_VERIFIED_BYTES always, larger ones with verify=True
    (and on every load into memory)."""
    monkeypatch.setattr(_file_format, "ALWAYS_VERIFIED_BYTES", 2000)
    path = tmp_path / "flat.annlearn"
    save(FlatNeighbors(algorithm="brute").fit(data[0]), path)
    raw = path.read_bytes()
    header, _ = _split(raw)
    sizes = {e["name"]: (e["offset"], e["nbytes"]) for e in header["arrays"]}
    offset, nbytes = sizes["state/_store/vectors"]
    assert nbytes > 2000 and sizes["state/_store/sqnorms"][1] <= 2000
    damaged = bytearray(raw)
    damaged[offset + 4 * 17] ^= 0x01  # the lowest mantissa bit of a float
    path.write_bytes(damaged)
    assert load(path, mmap_mode="r").n_samples_fit_ == 300  # not verified
    _refused(path, "state/_store/vectors is damaged", mmap_mode="r", verify=True)
    _refused(path, "state/_store/vectors is damaged")
    _refused(path, "state/_store/vectors is damaged", verify=None)
    assert load(path, verify=False).n_samples_fit_ == 300
    damaged = bytearray(raw)
    damaged[sizes["state/_store/sqnorms"][0]] ^= 0x01
    path.write_bytes(damaged)
    _refused(path, "state/_store/sqnorms is damaged", mmap_mode="r")
    _refused(path, "state/_store/sqnorms is damaged", verify=False)


def test_layout_2_inner_product_cells_are_probed_as_before(data, tmp_path):
    """Before layout 3, inner-product cells were not lifted: such a file
    loads, and its cells are probed by the largest inner product."""
    X, Q = data
    est = IVFPQNeighbors(
        **_SMALL_IVFPQ, metric="inner_product", refine_factor=None, random_state=0
    )
    est = est.fit(X)
    assert est._codec.quantizer.lift is not None
    del est._ip_lift  # what a layout-2 state holds
    path = tmp_path / "old.annlearn"
    save(est, path)
    raw = path.read_bytes()
    header, _ = _split(raw)
    header["state"]["_annlearn_format"] = 2
    path.write_bytes(_with_header(raw, header))
    old = load(path)
    assert old._ip_lift is None and old._codec.quantizer.lift is None
    legacy = CoarseQuantizer(est.cluster_centers_, "inner_product")
    codec = IVFPQCodec(legacy, old._codec.pq, "inner_product", True)
    d, pos = codec.search(old._store, Q, 3, nprobe=2, refine_factor=None, n_threads=1)
    got_d, got = old.kneighbors(Q)
    np.testing.assert_array_equal(got, old._store.ids[pos])
    np.testing.assert_allclose(got_d, d, rtol=1e-6)
    # Saved again, it is a layout-3 file that keeps the old cells.
    save(old, path)
    assert load(path)._ip_lift is None


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda lift: lift.update(extra=-lift["extra"] - 1), "extra must be >= 0"),
        (lambda lift: lift.update(extra=lift["extra"][:-1]), "extra"),
        (lambda lift: lift.update(max_sqnorm=float("nan")), "max_sqnorm"),
    ],
)
def test_corrupted_cells_lift_is_refused(data, edit, match):
    est = IVFPQNeighbors(
        nlist=4, n_subquantizers=2, nbits=4, metric="inner_product", random_state=0
    ).fit(data[0])
    state = est.__getstate__()
    state["_ip_lift"] = dict(state["_ip_lift"])
    edit(state["_ip_lift"])
    with pytest.raises(ValueError, match=f"Corrupted IVFPQNeighbors state: .*{match}"):
        IVFPQNeighbors().__setstate__(state)
    l2 = IVFPQNeighbors(nlist=4, n_subquantizers=2, nbits=4, random_state=0)
    l2_state = l2.fit(data[0]).__getstate__()
    l2_state["_ip_lift"] = est.__getstate__()["_ip_lift"]
    with pytest.raises(ValueError, match="_ip_lift is set for metric 'euclidean'"):
        IVFPQNeighbors().__setstate__(l2_state)


def test_files_without_later_parameters_load_with_their_default(saved, tmp_path):
    """``radius`` came after the first file layout: older files lack it."""
    path, raw = saved
    header, _ = _split(raw)
    header["params"].pop("radius")
    path.write_bytes(_with_header(raw, header))
    assert load(path).radius == 1.0
    header["params"]["radius"] = "far"
    path.write_bytes(_with_header(raw, header))
    _refused(path, "radius")
