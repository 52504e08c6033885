"""The bytes of an annlearn file: what :func:`annlearn.save` writes and
:func:`annlearn.load` reads.

A file holds a JSON header and raw arrays, nothing that is executed or
imported, and the reader trusts no field before checking it. Layout (every
integer little-endian)::

    offset  bytes  field
    0       13     magic b"\\x89annlearn\\r\\n\\x1a\\n"
    13      3      zero
    16      4      file format version (uint32): 1
    20      8      header length in bytes (uint64)
    28      4      CRC-32 of the header
    32      4      CRC-32 of bytes 0-31
    36      ...    header: a UTF-8 JSON object
                   zero bytes up to the next multiple of 64, then the arrays:
                   raw, C order, little-endian, each at a multiple of 64, zero
                   bytes between them; the file ends with the last array.

The first 36 bytes keep this meaning in every format version, so that a
reader tells a damaged file from a newer one. As in PNG's signature, the
``\\x89`` byte and the ``\\r\\n``, ``\\x1a``, ``\\n`` bytes make 7-bit and
text-mode transfers fail the magic check.

The header (one line of JSON)::

    {"format_version": 1,
     "estimator": "IVFPQNeighbors",
     "versions": {"annlearn": "...", "numpy": "...", "scikit-learn": "..."},
     "params": {...},
     "state": {...},
     "arrays": [{"name": "state/_store/codes", "dtype": "|u1",
                 "shape": [1000000, 12], "offset": 4096, "nbytes": 12000000,
                 "crc32": 2914372071}, ...]}

``params`` and ``state`` are trees of JSON objects, strings, numbers,
booleans and nulls (lists only inside the tags below), in which an object
with a single key starting with ``$`` stands for a value JSON lacks:

- ``{"$array": name}``: the array of that name in ``arrays``, each
  referenced exactly once;
- ``{"$float": "nan" | "inf" | "-inf"}``;
- ``{"$strings": [...]}``: a 1-d object array of str (``feature_names_in_``);
- ``{"$random_state": {"key": {"$array": ...}, "pos": int, "has_gauss": int,
  "gauss": float}}``: a :class:`numpy.random.RandomState` (MT19937) in its
  exact state;
- ``{"$memory": location}``: a :class:`joblib.Memory`, read back as its
  location (a str, or None), which the estimator turns into a ``Memory`` when
  it fits.

Array dtypes are limited to ``<f2``, ``<f4``, ``<f8``, ``<i8``, ``<u4`` and
``|u1`` (``<f2`` since annlearn files hold float16 vectors, data layout 4).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import struct
import time
import zlib

import joblib
import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = [
    "ALWAYS_VERIFIED_BYTES",
    "FILE_FORMAT_VERSION",
    "MAGIC",
    "decode",
    "encode",
    "read_file",
    "write_file",
]

MAGIC = b"\x89annlearn\r\n\x1a\n"
# Version of the container (preamble, header keys, tags, array layout); the
# estimator's own data layout is versioned separately, inside the state.
FILE_FORMAT_VERSION = 1
# Magic, format version, header length, header CRC-32; then the CRC-32 of
# these 32 bytes.
_PREAMBLE = struct.Struct("<13s3xIQI")
_PREAMBLE_SIZE = _PREAMBLE.size + 4
_ALIGNMENT = 64
# Arrays up to this size are checksummed on every load, memory-mapped or not.
ALWAYS_VERIFIED_BYTES = 1 << 20
# Bounds on what a header may claim, checked before anything is allocated.
_MAX_HEADER_BYTES = 1 << 28
_MAX_DEPTH = 8
_MAX_NDIM = 8
_DTYPES = {
    np.dtype(code).str: np.dtype(code)
    for code in ("<f2", "<f4", "<f8", "<i8", "<u4", "u1")
}
_TABLE_KEYS = ("name", "dtype", "shape", "offset", "nbytes", "crc32")
_HEADER_KEYS = ("format_version", "estimator", "versions", "params", "state", "arrays")
_VERSION_KEYS = ("annlearn", "numpy", "scikit-learn")
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_TEMP_SUFFIX = ".annlearn-tmp"
# A temporary file younger than this may belong to a save that has created it
# but not yet locked it (see _remove_if_abandoned).
_STALE_SECONDS = 2.0
# First bytes of pickle and joblib files (pickle protocols 2-5; joblib's
# gzip, zlib, bz2, xz, lzma and lz4 compressors, and its old "ZF" files), for
# a message that says how to convert them.
_PICKLE = (
    "a pickle file (what pickle.dump, joblib.dump and earlier annlearn.save write)"
)
_COMPRESSED = "a compressed joblib file (joblib.dump with compress)"
_FOREIGN_MAGICS = (
    (re.compile(rb"\x80[\x02-\x05]"), _PICKLE),
    (
        re.compile(
            rb"\x1f\x8b|\x78[\x01\x5e\x9c\xda]|BZh|\xfd7zXZ|\x5d\x00\x00|"
            rb"\x04\x22\x4d\x18|ZF"
        ),
        _COMPRESSED,
    ),
)


def _align(offset: int) -> int:
    return -(-offset // _ALIGNMENT) * _ALIGNMENT


def _is_int(value) -> bool:
    return type(value) is int


# -- the JSON tree ---------------------------------------------------------


def encode(value, where: str, arrays: list) -> object:
    """The JSON form of ``value``; its arrays are appended to ``arrays`` as
    ``(name, array)``, named by ``where``, their path in the tree.

    Raises ValueError, naming ``where``, for a value an annlearn file cannot
    hold.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else repr(value)}
    if isinstance(value, np.ndarray):
        return _encode_array(value, where, arrays)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or key.startswith("$"):
                raise ValueError(
                    f"{where} has the key {key!r}; an annlearn file holds "
                    "string keys that do not start with '$'."
                )
            out[key] = encode(item, f"{where}/{key}", arrays)
        return out
    if isinstance(value, np.random.RandomState):
        state = value.get_state(legacy=False)
        if state["bit_generator"] != "MT19937":
            raise ValueError(
                f"{where} is a RandomState over {state['bit_generator']}; an "
                "annlearn file holds RandomState(MT19937) (the default) only."
            )
        return {
            "$random_state": {
                "key": _encode_array(state["state"]["key"], f"{where}/key", arrays),
                "pos": int(state["state"]["pos"]),
                "has_gauss": int(state["has_gauss"]),
                "gauss": encode(state["gauss"], where, arrays),
            }
        }
    if isinstance(value, joblib.Memory):
        location = value.location
        return {"$memory": None if location is None else os.fspath(location)}
    raise ValueError(
        f"{where} is a {type(value).__name__}, which an annlearn file cannot "
        "hold: it holds dicts, numpy arrays of numbers, str, int, float, bool "
        "and None (and a joblib.Memory or RandomState as memory or "
        "random_state)."
    )


def _encode_array(array: np.ndarray, where: str, arrays: list) -> dict:
    if array.dtype == object:
        if array.ndim != 1 or not all(isinstance(s, str) for s in array):
            raise ValueError(
                f"{where} is an object array; an annlearn file holds object "
                "arrays of one dimension, of str, only."
            )
        return {"$strings": [str(s) for s in array]}
    little = array.dtype.newbyteorder("<")
    if little.str not in _DTYPES:
        raise ValueError(
            f"{where} is an array of dtype {array.dtype}; an annlearn file "
            f"holds the dtypes {', '.join(_DTYPES)} only."
        )
    arrays.append((where, np.ascontiguousarray(array, dtype=little)))
    return {"$array": where}


def decode(node, where: str, arrays: dict, used: set, depth: int = 0) -> object:
    """The value of the JSON tree ``node``: arrays taken from ``arrays`` by
    name (each name is added to ``used``, and may be used once)."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {_MAX_DEPTH} levels.")
    if type(node) is int and not -(2**63) <= node < 2**63:
        raise ValueError(f"{where}: an integer outside the signed 64-bit range.")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict):
        raise ValueError(f"{where} is a JSON {type(node).__name__}, not a value.")
    if len(node) == 1:
        ((key, value),) = node.items()
        if key.startswith("$"):
            return _decode_tag(key, value, where, arrays, used, depth)
    out = {}
    for key, value in node.items():
        if key.startswith("$"):
            raise ValueError(f"{where}: unknown tag {key!r} among other keys.")
        out[key] = decode(value, f"{where}/{key}", arrays, used, depth + 1)
    return out


def _decode_tag(tag: str, value, where: str, arrays: dict, used: set, depth: int):
    if tag == "$array":
        if not isinstance(value, str) or value not in arrays:
            raise ValueError(f"{where} refers to {value!r}, not in the array table.")
        if value in used:
            raise ValueError(f"{where}: array {value!r} is referenced twice.")
        used.add(value)
        return arrays[value]
    if tag == "$float":
        if value not in _FLOATS:
            raise ValueError(f"{where}: $float must be one of {list(_FLOATS)}.")
        return _FLOATS[value]
    if tag == "$strings":
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError(f"{where}: $strings must be a list of strings.")
        out = np.empty(len(value), dtype=object)
        out[:] = value
        return out
    if tag == "$memory":
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: $memory must be a string or null.")
        return value
    if tag == "$random_state":
        fields = decode(value, where, arrays, used, depth + 1)
        return _random_state(fields, where)
    raise ValueError(f"{where}: unknown tag {tag!r}.")


def _random_state(fields, where: str) -> np.random.RandomState:
    keys = ("key", "pos", "has_gauss", "gauss")
    if not isinstance(fields, dict) or set(fields) != set(keys):
        raise ValueError(f"{where}: $random_state must hold exactly {keys}.")
    key, pos, has_gauss, gauss = (fields[k] for k in keys)
    if not (
        isinstance(key, np.ndarray)
        and key.dtype == np.uint32
        and key.shape == (624,)
        and _is_int(pos)
        and 0 <= pos <= 624
        and has_gauss in (0, 1)
        and _is_int(has_gauss)
        and type(gauss) is float
    ):
        raise ValueError(
            f"{where}: not an MT19937 state (key: 624 uint32, 0 <= pos <= 624, "
            "has_gauss: 0 or 1, gauss: a float)."
        )
    random_state = np.random.RandomState()
    random_state.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": key, "pos": pos},
            "has_gauss": has_gauss,
            "gauss": gauss,
        }
    )
    return random_state


# -- writing ---------------------------------------------------------------


def write_file(path: str, header: dict, arrays: list) -> None:
    """Write ``header`` (without its ``arrays`` table) and ``arrays``, a list
    of ``(name, little-endian C-contiguous array)``, atomically to ``path``."""
    crcs = [zlib.crc32(_bytes_of(array)) for _, array in arrays]
    # The offsets are in the header and depend on its length: grow the data
    # offset until the header that records it fits before it.
    data_start = 0
    while True:
        offset, table = data_start, []
        for (name, array), crc in zip(arrays, crcs, strict=True):
            table.append(
                {
                    "name": name,
                    "dtype": array.dtype.str,
                    "shape": list(array.shape),
                    "offset": offset,
                    "nbytes": array.nbytes,
                    "crc32": crc,
                }
            )
            offset = _align(offset + array.nbytes)
        text = json.dumps({**header, "arrays": table}, allow_nan=False)
        raw = text.encode("ascii")
        needed = _align(_PREAMBLE_SIZE + len(raw))
        if needed == data_start:
            break
        data_start = needed
    fields = _PREAMBLE.pack(MAGIC, FILE_FORMAT_VERSION, len(raw), zlib.crc32(raw))
    preamble = fields + struct.pack("<I", zlib.crc32(fields))
    _atomic_write(path, preamble + raw, arrays, _PREAMBLE_SIZE + len(raw))


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array, as a 1-d uint8 view."""
    return array.reshape(-1).view(np.uint8)


def _write_arrays(f, arrays: list, position: int) -> None:
    """Write each array at the next multiple of 64 after ``position``."""
    for _, array in arrays:
        start = _align(position)
        f.write(bytes(start - position))
        f.write(_bytes_of(array))
        position = start + array.nbytes


def _atomic_write(path: str, head: bytes, arrays: list, position: int) -> None:
    directory, name = os.path.split(os.path.abspath(path))
    _remove_stale_temporaries(directory, name)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}{_TEMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with open(fd, "wb") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            f.write(head)
            _write_arrays(f, arrays, position)
            f.flush()
            os.fsync(f.fileno())
            # The new file gets the permissions of the file it replaces, or
            # the usual 0o644 (os.open made it readable by its owner only).
            mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
            os.chmod(tmp, mode)
            if fcntl is not None:
                os.replace(tmp, path)  # still locked: no clean-up can take it
        if fcntl is None:
            os.replace(tmp, path)  # Windows renames closed files only
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Delete the temporary files that saves to ``name``, killed mid-write,
    left in ``directory``."""
    pattern = re.compile(
        re.escape(f".{name}.") + "[0-9a-f]{16}" + re.escape(_TEMP_SUFFIX)
    )
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    _remove_if_abandoned(entry.path)


def _remove_if_abandoned(path: str) -> None:
    # A save locks its temporary file (flock) right after creating it and
    # keeps the lock until the file is renamed, and the kernel drops the lock
    # when the process dies, even by SIGKILL: so a temporary file that we can
    # lock and that nobody modified for _STALE_SECONDS (longer than the gap
    # between creating and locking) belongs to no live save. On Windows, where
    # an open file cannot be deleted, the age alone decides.
    if time.time() - os.stat(path).st_mtime < _STALE_SECONDS:
        return
    if fcntl is None:
        os.unlink(path)
        return
    fd = os.open(path, os.O_RDWR)  # NFS grants exclusive locks to writers only
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    finally:
        os.close(fd)


# -- reading ---------------------------------------------------------------


def read_file(path: str, *, mmap_mode=None, verify: bool = True):
    """``(header, arrays)`` of the annlearn file at ``path``.

    ``header`` is the checked JSON header (its keys and types, not the
    meaning of ``params`` and ``state``); ``arrays`` maps each name of the
    table to its array: read into memory, or views of one memory map of the
    file with ``mmap_mode`` ("r" or "c"). Checksums are verified for the
    preamble, the header and the arrays of at most ``ALWAYS_VERIFIED_BYTES``
    always, for all arrays if ``verify``; the zero padding always.

    Raises ValueError, saying what is wrong (the caller adds the path).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_PREAMBLE_SIZE)
        version, header_size, header_crc = _check_preamble(head, size)
        header_end = _PREAMBLE_SIZE + header_size
        raw = f.read(header_size)
        if len(raw) != header_size:
            raise ValueError("the file is truncated (it ends inside the header).")
        if zlib.crc32(raw) != header_crc:
            raise ValueError("the header is damaged (its CRC-32 does not match).")
        header = _parse_header(raw, version)
        table = _check_table(header["arrays"], _align(header_end), size, header_end)
        if mmap_mode is None:
            arrays = _read_arrays(f, table, header_end, verify)
        else:
            arrays = _map_arrays(f, table, header_end, size, mmap_mode, verify)
    return header, arrays


def _check_preamble(head: bytes, size: int) -> tuple[int, int, int]:
    """(format version, header length, header CRC-32) from the first bytes."""
    if not head:
        raise ValueError("the file is empty.")
    if not head.startswith(MAGIC[: len(head)]):
        for pattern, what in _FOREIGN_MAGICS:
            if pattern.match(head):
                raise ValueError(
                    f"this is {what}, not an annlearn file. annlearn.load never "
                    "unpickles, because unpickling runs whatever code the file "
                    "names. If the file comes from a source you trust, convert "
                    "it once: annlearn.save(joblib.load(old_path), new_path)."
                )
        raise ValueError(f"not an annlearn file (it does not start with {MAGIC!r}).")
    if len(head) < _PREAMBLE_SIZE:
        raise ValueError(
            f"the file is truncated ({size} bytes, shorter than the "
            f"{_PREAMBLE_SIZE}-byte preamble)."
        )
    fields, (crc,) = head[:-4], struct.unpack("<I", head[-4:])
    if zlib.crc32(fields) != crc:
        raise ValueError("the preamble is damaged (its CRC-32 does not match).")
    _, version, header_size, header_crc = _PREAMBLE.unpack(fields)
    if version > FILE_FORMAT_VERSION:
        raise ValueError(
            f"written in file format version {version} by a newer annlearn; "
            f"this annlearn reads versions up to {FILE_FORMAT_VERSION}. Upgrade "
            "annlearn to load it."
        )
    if version < 1:
        raise ValueError(f"unknown file format version {version}.")
    if header_size > min(size - _PREAMBLE_SIZE, _MAX_HEADER_BYTES):
        raise ValueError(
            f"the file is truncated or damaged: its header would take "
            f"{header_size} bytes, the file has {size}."
        )
    return version, header_size, header_crc


def _unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the header repeats a key among {keys}.")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"the header holds {name}, which JSON does not allow.")


def _parse_header(raw: bytes, version: int) -> dict:
    try:
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
        )
    except RecursionError:
        raise ValueError("the header is nested too deeply.") from None
    except ValueError as exc:
        raise ValueError(f"the header is not valid JSON ({exc}).") from None
    if not isinstance(header, dict) or set(header) != set(_HEADER_KEYS):
        found = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise ValueError(
            f"the header must be a JSON object with the keys {list(_HEADER_KEYS)}, "
            f"got {found}."
        )
    if header["format_version"] != version or not _is_int(header["format_version"]):
        raise ValueError(
            f"the header says format version {header['format_version']!r}, the "
            f"preamble {version}."
        )
    versions = header["versions"]
    if (
        not isinstance(versions, dict)
        or set(versions) != set(_VERSION_KEYS)
        or not all(isinstance(v, str) for v in versions.values())
    ):
        raise ValueError(
            f"the header's versions must map {list(_VERSION_KEYS)} to strings."
        )
    for key in ("params", "state"):
        if not isinstance(header[key], dict):
            raise ValueError(f"the header's {key} must be a JSON object.")
    if not isinstance(header["estimator"], str):
        raise ValueError("the header's estimator must be a string.")
    return header


def _check_table(table, data_start: int, size: int, header_end: int) -> list:
    """The array table as (name, dtype, shape, offset, nbytes, crc) tuples,
    checked against the canonical layout and the file size before anything
    is allocated."""
    if not isinstance(table, list):
        raise ValueError("the header's arrays must be a list.")
    out, names, offset = [], set(), data_start
    end = header_end
    for i, entry in enumerate(table):
        where = f"arrays[{i}]"
        if not isinstance(entry, dict) or set(entry) != set(_TABLE_KEYS):
            raise ValueError(f"{where} must hold exactly the keys {list(_TABLE_KEYS)}.")
        name, dtype, shape, start, nbytes, crc = (entry[k] for k in _TABLE_KEYS)
        if not isinstance(name, str) or name in names:
            raise ValueError(f"{where}: the name {name!r} is not a new string.")
        names.add(name)
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ValueError(
                f"{where} ({name}): dtype {dtype!r} is not one of {list(_DTYPES)}."
            )
        dtype = _DTYPES[dtype]
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_NDIM
            or not all(_is_int(s) and s >= 0 for s in shape)
        ):
            raise ValueError(
                f"{where} ({name}): the shape {shape!r} is not a list of at most "
                f"{_MAX_NDIM} integers >= 0."
            )
        if start != offset or not _is_int(start):
            raise ValueError(
                f"{where} ({name}): offset {start!r}, expected {offset} (each "
                "array starts at the first multiple of 64 after the previous)."
            )
        if nbytes != math.prod(shape) * dtype.itemsize or not _is_int(nbytes):
            raise ValueError(
                f"{where} ({name}): {nbytes!r} bytes for shape {shape} of {dtype.str}."
            )
        if start + nbytes > size:
            raise ValueError(
                f"the file is truncated: {name} would end at byte "
                f"{start + nbytes}, the file has {size} bytes."
            )
        if not _is_int(crc) or not 0 <= crc < 2**32:
            raise ValueError(f"{where} ({name}): crc32 {crc!r} is not a uint32.")
        out.append((name, dtype, tuple(shape), start, nbytes, crc))
        end = start + nbytes
        offset = _align(end)
    if size != end:
        raise ValueError(
            f"the file is truncated or damaged: it has {size} bytes, its header "
            f"describes {end}."
        )
    return out


def _checked(name: str, data, crc: int) -> None:
    if zlib.crc32(data) != crc:
        raise ValueError(f"array {name} is damaged (its CRC-32 does not match).")


def _check_padding(padding, where: int) -> None:
    if bytes(padding).strip(b"\0"):
        raise ValueError(f"the zero padding at byte {where} is damaged.")


def _read_arrays(f, table: list, position: int, verify: bool) -> dict:
    arrays = {}
    for name, dtype, shape, start, nbytes, crc in table:
        _check_padding(f.read(start - position), position)
        array = np.empty(shape, dtype=dtype)
        data = _bytes_of(array)
        if f.readinto(data) != nbytes:
            raise ValueError(f"the file is truncated (it ends inside {name}).")
        if verify or nbytes <= ALWAYS_VERIFIED_BYTES:
            _checked(name, data, crc)
        arrays[name] = _native(array)
        position = start + nbytes
    return arrays


def _map_arrays(f, table, position: int, size: int, mmap_mode, verify: bool):
    # One map of the whole file, from the descriptor already checked: every
    # array is a view of it (64-byte aligned, as the offsets are).
    whole = np.memmap(f, dtype=np.uint8, mode=mmap_mode, shape=(size,))
    arrays = {}
    for name, dtype, shape, start, nbytes, crc in table:
        _check_padding(whole[position:start], position)
        data = whole[start : start + nbytes]
        if verify or nbytes <= ALWAYS_VERIFIED_BYTES:
            _checked(name, data, crc)
        arrays[name] = _native(data.view(dtype).reshape(shape))
        position = start + nbytes
    return arrays


def _native(array: np.ndarray) -> np.ndarray:
    # The kernels read native byte order: a big-endian machine gets a copy.
    if array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))
