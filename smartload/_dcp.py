"""Reading ``torch.distributed.checkpoint`` (DCP) directories: no torch, nothing run, no data read.

A DCP directory holds ``.metadata``, a pickle of DCP's ``Metadata`` (torch reads it with a plain
``pickle.load``), and ``*.distcp`` files. smartload reads ``.metadata`` with an unpickler of its
own whose only globals are what DCP's metadata is made of (:data:`_ALLOWED`): record builders that
check what the pickle gives them and never import anything. The general unpickler's lists are not
widened for it: they keep refusing ``torch.distributed`` and ``torch.serialization`` names as
hostile in ordinary checkpoints. A global outside this list is refused before anything is built:
a hostile one (``os.system``) as :class:`UnsafeCheckpointError`, any other as
:class:`UnknownGlobalsError` (verdict UNKNOWN).

:func:`read_dcp` nests the tree as the saved state dict did (``planner_data`` maps each flattened
key to its path: ``"model.fc.weight"`` → ``("model", "fc.weight")``). Tensors become
:class:`ChunkedRecord` s whose chunks must tile them exactly; the other values (BYTE_IO items:
``epoch``, optimizer ``param_groups`` ...) become :class:`BytesItem` s: pickles that ``dcp.load``
would run, never unpickled here, but pre-scanned for the globals they name (``_dcp_items.py``):
a hostile one refuses the directory, unknown ones make it UNKNOWN, as in any file. So are the
tensor items' ``data.pkl`` (below). Every item is found and scanned before a problem with the
metadata is raised, so a hostile pickle is reported first, whatever else is wrong. What the
metadata makes smartload do besides unpickling it is priced by its size (:class:`_Work`).

Where a chunk's bytes lie (:func:`chunk_source`):

- default layout: each item is a whole ``torch.save`` archive of the chunk. With the directory,
  each item's ``data.pkl`` (at most 64 KiB, a few hundred bytes in practice) is pre-scanned for
  the globals it names, like the bytes items (``_dcp_items.py``): a hostile one refuses the
  directory up front, an unknown one makes it UNKNOWN. Its zip directory and ``data.pkl`` are
  read when the chunk is first read, with ``_formats.py``'s readers and the restricted
  unpickler, and checked against the metadata;
- ``SerializationFormat.SAFETENSORS``: each ``.distcp`` file ends with one safetensors blob that
  holds its rank's chunks by key, and the metadata gives every chunk the blob's offset only. The
  blob's header is read with the directory (once per file) and each chunk records where its own
  bytes are: its ``length`` is then exactly its data's.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import math
import mmap
import os
import pickle
import stat
import struct
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, NoReturn, TypeGuard

from ._dcp_items import (
    MAX_TENSOR_PICKLE,
    TOO_LARGE_HINT,
    BytesItem,
    ChunkItem,
    ItemRef,
    UnscannedItem,
    item_pickle,
    pickle_key,
    scan_items,
    too_large,
)
from ._formats import (
    _SAFETENSORS_MAX_HEADER,
    DCP_METADATA,
    RawCheckpoint,
    Source,
    _member_bytes,
    _no_duplicates,
    _realpath,
    _safetensors_entry,
    storage_ref,
    storage_source,
)
from ._records import (
    DTYPE_ITEMSIZE,
    MAX_NDIM,
    MAX_NUMEL,
    Chunk,
    ChunkedRecord,
    Refused,
    StorageRef,
    TensorRecord,
    brief,
)
from ._unpickler import hostile_names, unpickle, walk_names
from .errors import CheckpointFormatError, UnsafeCheckpointError

__all__ = [
    "METADATA",
    "BytesItem",
    "UnknownGlobalsError",
    "UnscannedItem",
    "chunk_source",
    "read_dcp",
    "unscanned_items",
]

METADATA = DCP_METADATA
_MAX_METADATA = 1 << 30  # bytes of .metadata read at most (a 1,000-rank save has a few MB)
_MAX_PATH = 64  # parts of a state-dict path (planner_data), of a PosixPath
_HINT = "The directory is incomplete or was altered after DCP wrote it; do not trust it"


class UnknownGlobalsError(CheckpointFormatError):
    """A DCP ``.metadata`` names globals that DCP never writes there and that are not known to be
    hostile: refused before anything was built (verdict UNKNOWN). ``globals`` lists them."""

    def __init__(self, path: str, globals: Sequence[str]) -> None:
        self.globals = list(globals)
        n = len(self.globals)
        shown = ", ".join(self.globals[:8]) + (f", ... {n - 8} more" if n > 8 else "")
        super().__init__(
            path,
            f"names {n} global{'s' if n > 1 else ''} a DCP .metadata never holds ({shown}); "
            "nothing was run",
            "smartload reads .metadata files written by torch.distributed.checkpoint.save; "
            "dcp.load would import these names, so load it that way only if you trust it",
        )


# --------------------------------------------------------------------------------------------------
# what the .metadata pickle may name: records, builders and dtypes


class _Record:
    """An object of one of DCP's metadata dataclasses: NEWOBJ without arguments, then at most one
    BUILD with a dict of its fields (a copy is kept: ``state``). Calling the class is refused."""

    __slots__ = ("state",)
    qualname: ClassVar[str] = "?"
    fields: ClassVar[frozenset[str]] = frozenset()
    state: dict[str, Any] | None

    def __new__(cls, *args: Any) -> Any:
        if args:
            raise Refused(f"{cls.qualname} made with {len(args)} argument(s); DCP gives none")
        obj = object.__new__(cls)
        obj.state = None
        return obj

    def __init__(self, *args: Any) -> None:  # REDUCE; NEWOBJ calls __new__ alone
        raise Refused(f"the pickle calls {self.qualname}; DCP metadata never does")

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise Refused(f"a second BUILD of a {self.qualname}")
        if (
            type(state) is not dict
            or len(state) > len(self.fields)
            or not all(type(k) is str for k in state)
            or not self.fields.issuperset(state)
        ):
            shown = (
                ", ".join(sorted(brief(k) for k in state)[:6])
                if type(state) is dict
                else brief(state)
            )
            raise Refused(f"a {self.qualname} built with {shown}")
        self.state = dict(state)


def _record(name: str, qualname: str, fields: str) -> type[_Record]:
    attrs = {"__slots__": (), "qualname": qualname, "fields": frozenset(fields.split())}
    return type(name, (_Record,), attrs)


_MD = "torch.distributed.checkpoint.metadata"
_Metadata = _record(
    "_Metadata",
    f"{_MD}.Metadata",
    "state_dict_metadata planner_data storage_data storage_meta version",
)
_TensorStorage = _record("_TensorStorage", f"{_MD}.TensorStorageMetadata", "properties size chunks")
_ChunkStorage = _record("_ChunkStorage", f"{_MD}.ChunkStorageMetadata", "offsets sizes")
_BytesStorage = _record("_BytesStorage", f"{_MD}.BytesStorageMetadata", "")
_MetadataIndex = _record("_MetadataIndex", f"{_MD}.MetadataIndex", "fqn offset index")
_StorageMeta = _record(
    "_StorageMeta", f"{_MD}.StorageMeta", "checkpoint_id save_id load_id modules"
)
_StorageInfo = _record(
    "_StorageInfo",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "relative_path offset length transform_descriptors",
)


class _Global:
    """A global that is only data, or a function: BUILD on it is refused."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __setstate__(self, state: Any) -> None:
        raise Refused(f"BUILD applied to the global {self.qualname}")


class _Dtype(_Global):
    """``torch.<dtype>``: data, never called."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        super().__init__(f"torch.{name}")
        self.name = name

    def __call__(self, *args: Any) -> NoReturn:
        raise Refused(f"the pickle calls {self.qualname}, which is only data")


class _Builder(_Global):
    """An allowlisted function: checks its arguments and makes a value of ours."""

    __slots__ = ("fn",)

    def __init__(self, qualname: str, fn: Any) -> None:
        super().__init__(qualname)
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _Marker(NamedTuple):
    """What a builder makes that is only a tag: a layout, a memory format, a path."""

    kind: str
    value: Any


_STRIDED = _Marker("layout", "torch.strided")
_MEM_FORMATS = tuple(_Marker("memory format", code) for code in range(3))
_INTS = frozenset({int})


class _TensorProperties(_Record):
    """``TensorProperties``: BUILD with ``(dtype, layout, requires_grad, memory format code,
    pin_memory)``, as its ``__getstate__`` writes it. Keeps ``{"dtype": name}``."""

    __slots__ = ()
    qualname = f"{_MD}.TensorProperties"

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise Refused(f"a second BUILD of a {self.qualname}")
        if type(state) is not tuple or len(state) != 5:
            raise Refused(f"a TensorProperties built with {brief(state)}")
        dtype, layout, requires_grad, memory_format, pin_memory = state
        if type(dtype) is not _Dtype:
            raise Refused(f"a TensorProperties with the dtype {brief(dtype)}")
        if layout is not _STRIDED:
            raise Refused(f"a TensorProperties with the layout {brief(layout)}")
        if type(requires_grad) is not bool or type(pin_memory) is not bool:
            raise Refused("a TensorProperties whose flags are not booleans")
        if not any(memory_format is m for m in _MEM_FORMATS):
            raise Refused(f"a TensorProperties with the memory format {brief(memory_format)}")
        self.state = {"dtype": dtype.name}


def _size(value: Any, *rest: Any) -> tuple[int, ...]:
    """``torch.Size(tuple of ints)``: the tuple itself."""
    if rest or type(value) is not tuple:
        raise Refused("torch.Size called with something other than one tuple")
    if not _is_index(value):
        raise Refused(f"torch.Size of {brief(value)}: not up to {MAX_NDIM} sizes")
    return value


def _is_index(value: Any) -> TypeGuard[tuple[int, ...]]:
    """A tuple of up to MAX_NDIM ints in [0, MAX_NUMEL]: a shape or an offset. Checked in C."""
    return (
        type(value) is tuple
        and len(value) <= MAX_NDIM
        and (
            not value
            or (_INTS.issuperset(map(type, value)) and min(value) >= 0 and max(value) <= MAX_NUMEL)
        )
    )


def _layout(name: Any, *rest: Any) -> _Marker:
    if rest or name != "torch.strided":
        raise Refused(
            f"a tensor of layout {brief(name)}; smartload reads dense (strided) tensors only",
            hint="Save tensor.to_dense() in its place",
        )
    return _STRIDED


def _memory_format(code: Any, *rest: Any) -> _Marker:
    if rest or type(code) is not int or not 0 <= code < len(_MEM_FORMATS):
        raise Refused(f"_MEM_FORMAT_ENCODING({brief(code)})")
    return _MEM_FORMATS[code]


def _posix_path(*parts: Any) -> _Marker:
    """``pathlib.PosixPath(*parts)`` (StorageMeta.checkpoint_id): the parts, unused."""
    if len(parts) > _MAX_PATH or not {str}.issuperset(map(type, parts)):
        raise Refused(f"pathlib.PosixPath called with {len(parts)} argument(s) not all str")
    return _Marker("path", parts)


_ALLOWED: dict[str, Any] = {
    cls.qualname: cls
    for cls in (
        _Metadata,
        _TensorStorage,
        _ChunkStorage,
        _BytesStorage,
        _MetadataIndex,
        _StorageMeta,
        _StorageInfo,
        _TensorProperties,
    )
}
_ALLOWED.update(
    {
        f"{_MD}._MEM_FORMAT_ENCODING": _Builder(f"{_MD}._MEM_FORMAT_ENCODING", _memory_format),
        "torch.Size": _Builder("torch.Size", _size),
        "torch.serialization._get_layout": _Builder("torch.serialization._get_layout", _layout),
        "pathlib.PosixPath": _Builder("pathlib.PosixPath", _posix_path),
        # Python 3.13 names the class by the module that defines it
        "pathlib._local.PosixPath": _Builder("pathlib._local.PosixPath", _posix_path),
        **{f"torch.{name}": _Dtype(name) for name in DTYPE_ITEMSIZE},
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), fix_imports=False)
        self.persistent_load = _no_persistent_ids  # type: ignore[method-assign]

    def find_class(self, module: str, name: str) -> Any:
        # the pre-scan refused every other name already; this guards what it could not see
        found = _ALLOWED.get(f"{module}.{name}")
        if found is None:
            raise Refused(f"the global {brief(f'{module}.{name}', 120)} in a DCP .metadata")
        return found


def _no_persistent_ids(pid: Any) -> NoReturn:
    raise Refused("a persistent id in a DCP .metadata")


def _load_metadata(path: str, data: bytes, allow: frozenset[str]) -> tuple[Any, list[str]]:
    """The pickle's object and the globals it names. Every global is judged from the pre-scan
    first: hostile ones are reported whatever else is wrong; unknown ones are refused."""
    named: list[tuple[str, str]] = []
    problem = None
    try:
        end = walk_names(data, 0, named)
        if end != len(data):
            problem = f"{len(data) - end} unexpected byte(s) after the pickle's end"
    except (Refused, ValueError) as exc:
        problem = str(exc)
    others = [(m, n) for m, n in named if f"{m}.{n}" not in _ALLOWED]
    hostile = hostile_names(others, allow)
    if hostile:
        detail = "; ".join(f"{name}: {reason}" for name, reason in hostile)
        raise UnsafeCheckpointError(
            path,
            [name for name, _ in hostile],
            detail=detail + (f"; besides, {problem}" if problem else ""),
        )
    if others:
        raise UnknownGlobalsError(path, list(dict.fromkeys(f"{m}.{n}" for m, n in others)))
    if problem is not None:
        raise CheckpointFormatError(path, f"malformed pickle ({problem})", _HINT)
    try:
        obj = _MetadataUnpickler(data).load()
    except Refused as exc:
        raise CheckpointFormatError(path, str(exc), exc.hint or _HINT) from None
    except RecursionError:
        raise CheckpointFormatError(path, "the pickle nests too deeply", _HINT) from None
    except Exception as exc:  # the pickle machine reports malformed input with many types
        raise CheckpointFormatError(
            path, f"malformed pickle ({type(exc).__name__}: {brief(str(exc), 200)})", _HINT
        ) from None
    return obj, list(dict.fromkeys(f"{m}.{n}" for m, n in named))


# --------------------------------------------------------------------------------------------------
# the directory


def read_dcp(directory: str, allow: frozenset[str] = frozenset()) -> RawCheckpoint:
    """Read a DCP directory's structure: ``.metadata`` only, and for the safetensors layout each
    ``.distcp`` file's header. See the module docstring."""
    path = os.path.join(directory, METADATA)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > _MAX_METADATA:
                raise CheckpointFormatError(
                    path, f"a .metadata of {size:,} bytes (more than {_MAX_METADATA:,})", _HINT
                )
            data = f.read()
    except OSError as exc:
        raise CheckpointFormatError(path, f"cannot read: {exc.strerror}") from None
    metadata, globals_ = _load_metadata(path, data, allow)
    reader = _Directory(directory, _Work(directory, len(data)), allow)
    tree, version = reader.tree(metadata)
    info = {"dcp_version": version} if version is not None else {}
    globals_.extend(g for g in reader.item_globals if g not in globals_)
    return RawCheckpoint(directory, "dcp", tree, {}, globals_, info)


def unscanned_items(tree: Any) -> list[str]:
    """The keys (dotted paths) of the bytes items of a DCP tree whose pickles were not walked
    to their end: what they name is unknown."""
    out: list[str] = []
    todo: list[tuple[Any, tuple[str, ...]]] = [(tree, ())]
    while todo:
        node, path = todo.pop()
        for key, value in node.items():
            if type(value) is dict:
                todo.append((value, (*path, str(key))))
            elif isinstance(value, UnscannedItem):
                out.append(".".join((*path, str(key))))
    return sorted(out)


class _Work:
    """What a ``.metadata`` may make smartload do besides unpickling it, in proportion to its
    size: chunks walked and compared, containers made for deep state-dict paths, path parts
    resolved. DCP writes ~100 bytes per chunk and per key; a small file that shares one list of
    chunks among many tensors, or nests each key 64 deep, is refused instead of obeyed."""

    __slots__ = ("left", "limit", "where")

    def __init__(self, where: str, metadata_bytes: int) -> None:
        self.where = where
        self.left = self.limit = metadata_bytes // _BYTES_PER_STEP + _WORK_FLOOR

    def charge(self, steps: int, key: str) -> None:
        self.left -= steps
        if self.left < 0:
            raise CheckpointFormatError(
                self.where,
                f"checking its chunks and paths would take more than {self.limit:,} steps (one "
                f"per {_BYTES_PER_STEP} bytes of .metadata + {_WORK_FLOOR:,}), reached at "
                f"{_key(key)}: the metadata repeats the same chunks, or nests keys deep, again and "
                "again",
                "DCP writes each chunk once and nests keys as the state dict did; do not trust "
                "this directory",
            )


_BYTES_PER_STEP = 8
_WORK_FLOOR = 1 << 18


class _Blob(NamedTuple):
    """The safetensors blob that ends a ``.distcp`` file of the safetensors layout: key →
    (dtype, shape, absolute data offset), and the chunk offsets its metadata records."""

    tensors: dict[str, tuple[str, tuple[int, ...], int]]
    offsets: dict[str, Any]


class _Directory:
    """Builds the tree of one DCP directory from its metadata, checking it against the files."""

    def __init__(self, directory: str, work: _Work, allow: frozenset[str]) -> None:
        self.directory = directory
        self.real = _realpath(directory)
        self.work = work
        self.allow = allow
        self.item_globals: list[str] = []  # what the items' pickles name
        self.chunk_items: list[ChunkItem] = []  # the tensor items of the default layout
        self.files: dict[str, tuple[str, int]] = {}  # relative path → (real path, size)
        self.blobs: dict[tuple[str, int], _Blob] = {}

    def fail(self, problem: str, hint: str = _HINT) -> NoReturn:
        raise CheckpointFormatError(self.directory, problem, hint)

    def tree(self, metadata: Any) -> tuple[dict[Any, Any], str | None]:
        if type(metadata) is not _Metadata or metadata.state is None:
            self.fail(f".metadata holds {brief(metadata)}, not DCP Metadata")
        state = metadata.state
        items, planner = state.get("state_dict_metadata"), state.get("planner_data")
        if type(items) is not dict:
            self.fail(".metadata without its state_dict_metadata")
        index = self._index(state.get("storage_data"))
        # every item is found and scanned before a problem with the metadata is raised: a
        # hostile pickle in one is reported whatever else is wrong with the directory
        refs, problem = self._bytes_refs(items, index)
        values: dict[Any, Any] = {}
        for fqn, item in items.items():
            try:
                if type(fqn) is not str:
                    self.fail(f"a state dict key {brief(fqn)} that is not a str")
                if type(item) is _TensorStorage:
                    values[fqn] = self._tensor(fqn, item, index)
                elif type(item) is not _BytesStorage:
                    self.fail(
                        f"key {_key(fqn)}: {brief(item)} where DCP writes tensor or bytes metadata"
                    )
            except CheckpointFormatError as exc:
                problem = problem or exc
        described, self.item_globals = scan_items(
            self.directory, refs, self.allow, problem, self.chunk_items
        )
        values.update(described)
        tree: dict[Any, Any] = {}
        for fqn in items:
            self._place(tree, self._path(fqn, planner), values[fqn], fqn)
        version = state.get("version")
        return tree, version if type(version) is str else None

    # -- the metadata's parts --------------------------------------------------------------------

    def _index(self, storage: Any) -> dict[tuple[str, Any], dict[str, Any]]:
        """``storage_data``: (key, chunk offsets or None) → the item's fields."""
        if type(storage) is not dict:
            self.fail(".metadata without its storage_data")
        index: dict[tuple[str, Any], dict[str, Any]] = {}
        for key, info in storage.items():
            if type(key) is not _MetadataIndex or key.state is None:
                self.fail(f"a storage_data key {brief(key)}, not a MetadataIndex")
            fqn, offset = key.state.get("fqn"), key.state.get("offset")
            if type(fqn) is not str or not (offset is None or _is_index(offset)):
                self.fail(f"a MetadataIndex of {brief(fqn)} at {brief(offset)}")
            if type(info) is not _StorageInfo or info.state is None:
                self.fail(f"key {_key(fqn)}: storage entry {brief(info)}, not a _StorageInfo")
            if (fqn, offset) in index:
                self.fail(f"key {_key(fqn)}: two storage entries for its chunk at {_show(offset)}")
            index[(fqn, offset)] = info.state
        return index

    def _path(self, fqn: str, planner: Any) -> tuple[Any, ...]:
        """Where ``fqn`` sits in the saved state dict (``planner_data``; flat without one)."""
        path = planner.get(fqn) if type(planner) is dict else None
        if path is None:
            return (fqn,)
        if not (
            type(path) in (tuple, list)
            and 1 <= len(path) <= _MAX_PATH
            and {str, int}.issuperset(map(type, path))
        ):
            self.fail(f"key {_key(fqn)}: planner_data path {brief(path)} is not up to 64 names")
        return tuple(path)

    def _place(self, tree: dict[Any, Any], path: tuple[Any, ...], value: Any, fqn: str) -> None:
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                self.work.charge(1, fqn)  # a new container: what a deep path costs
                child = node[part] = {}
            elif type(child) is not dict:
                self.fail(f"key {_key(fqn)} sits under {brief(part)}, which holds a value itself")
            node = child
        if path[-1] in node:
            self.fail(f"key {_key(fqn)}: its path {_show(path)} is taken by another key")
        node[path[-1]] = value

    def _tensor(
        self, fqn: str, item: _Record, index: dict[tuple[str, Any], dict[str, Any]]
    ) -> ChunkedRecord:
        state = item.state or {}
        properties, shape, chunks = (state.get(k) for k in ("properties", "size", "chunks"))
        if type(properties) is not _TensorProperties or properties.state is None:
            self.fail(f"tensor {_key(fqn)} without its properties (dtype)")
        dtype = properties.state["dtype"]
        if not _is_index(shape) or math.prod(shape) > MAX_NUMEL:
            self.fail(f"tensor {_key(fqn)}: shape {brief(shape)} is not up to {MAX_NDIM} sizes")
        if type(chunks) is not list:
            self.fail(f"tensor {_key(fqn)} without its list of chunks")
        self.work.charge(len(chunks), fqn)
        boxes = []
        for chunk in chunks:
            box = self._box(fqn, shape, chunk)
            if math.prod(box[1]):  # an empty shard (more ranks than rows) holds nothing
                boxes.append(box)
        _check_tiling(fqn, shape, boxes, self.work, self.fail)
        itemsize = DTYPE_ITEMSIZE[dtype]
        pieces = tuple(
            self._chunk(fqn, dtype, offsets, sizes, math.prod(sizes) * itemsize, index)
            for offsets, sizes in boxes
        )
        return ChunkedRecord(shape, dtype, pieces)

    def _box(
        self, fqn: str, shape: tuple[int, ...], chunk: Any
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if type(chunk) is not _ChunkStorage or chunk.state is None:
            self.fail(f"tensor {_key(fqn)}: a chunk {brief(chunk)}, not ChunkStorageMetadata")
        offsets, sizes = chunk.state.get("offsets"), chunk.state.get("sizes")
        if not (
            _is_index(offsets)
            and _is_index(sizes)
            and len(offsets) == len(sizes) == len(shape)
            and all(o + s <= n for o, s, n in zip(offsets, sizes, shape, strict=True))
        ):
            self.fail(
                f"tensor {_key(fqn)} of shape {_show(shape)}: a chunk at {_show(offsets)} of sizes "
                f"{_show(sizes)} lies outside it"
            )
        return offsets, sizes

    def _chunk(
        self,
        fqn: str,
        dtype: str,
        offsets: tuple[int, ...],
        sizes: tuple[int, ...],
        nbytes: int,
        index: dict[tuple[str, Any], dict[str, Any]],
    ) -> Chunk:
        what = f"tensor {_key(fqn)}, chunk at {_show(offsets)}"
        info = index.get((fqn, offsets))
        if info is None:
            self.fail(f"{what}: no storage entry")
        file, offset, length = self._item(what, info)
        if length == nbytes:  # the safetensors layout: the blob's offset, the chunk's size
            return self._blob_chunk(what, fqn, dtype, offsets, sizes, file, offset, info)
        if length < nbytes:
            self.fail(f"{what}: an item of {length:,} bytes cannot hold its {nbytes:,}")
        rel = info["relative_path"]
        self.chunk_items.append(ChunkItem(fqn, offsets, rel, file, offset, length))
        return Chunk(offsets, sizes, file, offset, length)

    def _bytes_refs(
        self, items: dict[Any, Any], index: dict[tuple[str, Any], dict[str, Any]]
    ) -> tuple[list[ItemRef], CheckpointFormatError | None]:
        """The bytes items, each checked against its file, and the first problem found."""
        refs: list[ItemRef] = []
        problem: CheckpointFormatError | None = None  # the first, raised once all are scanned
        for fqn, item in items.items():
            if type(fqn) is not str or type(item) is not _BytesStorage:
                continue
            try:
                info = index.get((fqn, None))
                if info is None:
                    self.fail(f"bytes item {_key(fqn)}: no storage entry")
                file, offset, length = self._item(f"bytes item {_key(fqn)}", info)
            except CheckpointFormatError as exc:
                problem = problem or exc
                continue
            refs.append(ItemRef(fqn, info["relative_path"], file, offset, length))
        return refs, problem

    def _item(self, what: str, info: dict[str, Any]) -> tuple[str, int, int]:
        """The real path, offset and length of an item, checked against its file."""
        rel, offset, length = (info.get(k) for k in ("relative_path", "offset", "length"))
        transforms = info.get("transform_descriptors")
        if transforms:
            self.fail(
                f"{what}: stored through DCP extensions ({brief(transforms)}), compressed or "
                "transformed",
                "smartload reads items that DCP's FileSystemWriter stores as they are; save "
                "without storage-writer extensions",
            )
        if not (
            type(rel) is str
            and type(offset) is int
            and type(length) is int
            and 0 <= offset < 2**62
            and 0 <= length < 2**62
        ):
            self.fail(f"{what}: a malformed storage entry ({brief(rel)}, {brief(offset)})")
        file, size = self._file(what, rel)
        if offset + length > size:
            self.fail(
                f"{what}: its item spans bytes {offset:,} to {offset + length:,} of {rel} "
                f"but the file has {size:,} (truncated)",
                "Copy or download the checkpoint directory again",
            )
        return file, offset, length

    def _file(self, what: str, rel: str) -> tuple[str, int]:
        found = self.files.get(rel)
        if found is not None:
            return found
        parts = rel.replace("\\", "/").split("/") if len(rel) <= 4096 else [".."]
        self.work.charge(len(parts), what)  # resolving it looks at each part
        if not rel or "\0" in rel or os.path.isabs(rel) or ".." in parts:
            self.fail(
                f"{what}: its file {brief(rel, 80)} lies outside the directory",
                "The metadata was tampered with; DCP names files inside its directory",
            )
        real = _realpath(os.path.join(self.real, rel))
        if not real.startswith(os.path.join(self.real, "")):
            self.fail(
                f"{what}: its file {brief(rel, 80)} leads outside the directory (a symbolic link)",
                "Copy the files themselves into the checkpoint directory",
            )
        try:
            st = os.stat(real)
        except OSError as exc:
            self.fail(f"{what}: its file {brief(rel, 80)} cannot be read: {exc.strerror}")
        if not stat.S_ISREG(st.st_mode):
            self.fail(f"{what}: its file {brief(rel, 80)} is not a regular file")
        found = self.files[rel] = (real, st.st_size)
        return found

    # -- the safetensors layout ------------------------------------------------------------------

    def _blob_chunk(
        self,
        what: str,
        fqn: str,
        dtype: str,
        offsets: tuple[int, ...],
        sizes: tuple[int, ...],
        file: str,
        offset: int,
        info: dict[str, Any],
    ) -> Chunk:
        rel = info["relative_path"]
        blob = self.blobs.get((file, offset))
        if blob is None:
            blob = self.blobs[(file, offset)] = self._blob(rel, file, offset)
        entry = blob.tensors.get(fqn)
        if entry is None:
            self.fail(f"{what}: not in the safetensors data of {rel} at byte {offset:,}")
        found_dtype, found_shape, data = entry
        if (found_dtype, found_shape) != (dtype, sizes):
            self.fail(
                f"{what}: {rel} holds it as {found_dtype} {_show(found_shape)}; the metadata "
                f"says {dtype} {_show(sizes)}"
            )
        saved = blob.offsets.get(fqn, {})
        if isinstance(saved, dict) and saved.get("saved_offsets", list(offsets)) != list(offsets):
            self.fail(f"{what}: {rel} holds the chunk at {brief(saved['saved_offsets'])}")
        return Chunk(offsets, sizes, file, data, math.prod(sizes) * DTYPE_ITEMSIZE[dtype])

    def _blob(self, rel: str, file: str, offset: int) -> _Blob:
        where = f"{rel} at byte {offset:,}"
        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(offset)
                head = f.read(8)
                (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
                if not 0 < n <= _SAFETENSORS_MAX_HEADER or offset + 8 + n > size:
                    self.fail(f"{where}: no safetensors header (a length of {brief(n)})")
                text = f.read(n)
        except OSError as exc:
            self.fail(f"{where}: cannot read: {exc.strerror}")
        try:
            header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
            metadata = header.pop("__metadata__", {})
            sharding = json.loads(metadata.get("DCP_SHARDING_INFO", "{}"))
            if not isinstance(sharding, dict):
                raise ValueError("DCP_SHARDING_INFO is not a JSON object")
        except (ValueError, RecursionError, AttributeError, TypeError) as exc:
            self.fail(f"{where}: a safetensors header that is not valid ({brief(str(exc), 80)})")
        base = offset + 8 + n
        tensors = {}
        for name, entry in header.items():
            try:
                dtype, shape, begin, end = _safetensors_entry(file, name, entry)
            except CheckpointFormatError as exc:
                self.fail(f"{where}: {exc.problem}")
            if end - begin != math.prod(shape) * DTYPE_ITEMSIZE[dtype] or base + end > size:
                self.fail(
                    f"{where}: tensor {_key(name)} at bytes {begin:,} to {end:,} is malformed"
                )
            tensors[name] = (dtype, shape, base + begin)
        return _Blob(tensors, sharding)


def _check_tiling(
    fqn: str,
    shape: tuple[int, ...],
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]],
    work: _Work,
    fail: Any,
) -> None:
    """Refuse chunks (non-empty, inside ``shape``) that overlap or leave a gap."""
    if not _is_grid(shape, boxes):
        _check_disjoint(fqn, shape, boxes, work, fail)
    total = math.prod(shape)
    covered = sum(math.prod(sizes) for _, sizes in boxes)
    if covered != total:  # disjoint chunks inside the shape: fewer elements, a gap
        fail(
            f"tensor {_key(fqn)} of shape {_show(shape)}: its chunks cover {covered:,} of its "
            f"{total:,} elements (a gap)"
        )


def _is_grid(shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether the boxes are the cells of a grid, each once (how DCP shards are laid out: one
    dimension split for FSDP or TP, two for 2-D parallelism): the distinct intervals of each
    dimension partition it, and there are as many distinct boxes as cells. Linear time."""
    cells = 1
    for d, n in enumerate(shape):
        at = 0
        intervals = sorted({(offsets[d], sizes[d]) for offsets, sizes in boxes})
        for start, size in intervals:
            if start != at:
                return False
            at += size
        if at != n:
            return False
        cells *= len(intervals)
    return cells == len(boxes) == len({offsets for offsets, _ in boxes})


def _check_disjoint(
    fqn: str,
    shape: tuple[int, ...],
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]],
    work: _Work,
    fail: Any,
) -> None:
    """A sweep along the dimension with the most distinct chunk starts: each box is compared
    with the boxes it meets along that dimension only (each comparison charged to ``work``)."""
    if len(boxes) < 2:
        return
    d = max(range(len(shape)), key=lambda i: len({o[i] for o, _ in boxes}), default=0)
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for box in sorted(boxes, key=lambda b: b[0][d] if shape else 0):
        if shape:
            active = [a for a in active if a[0][d] + a[1][d] > box[0][d]]
        work.charge(len(active) + 1, fqn)
        for other in active:
            if all(
                o1 < o2 + s2 and o2 < o1 + s1
                for o1, s1, o2, s2 in zip(box[0], box[1], other[0], other[1], strict=True)
            ):
                fail(
                    f"tensor {_key(fqn)}: its chunks at {_show(other[0])} and {_show(box[0])} overlap"
                )
        active.append(box)


def _key(name: str) -> str:
    """A key from the file in a message: quoted, and cut if it is long."""
    return brief(name, 200)


def _show(index: Any) -> str:
    if type(index) in (tuple, list) and len(index) <= MAX_NDIM:
        return "[" + ", ".join(brief(i) for i in index) + "]"
    return brief(index)


# --------------------------------------------------------------------------------------------------
# where a chunk's bytes are


def chunk_source(chunk: Chunk, dtype: str) -> Source:
    """Where ``chunk``'s values lie, C-ordered: ``nbytes`` = its elements × ``dtype``'s size.

    A chunk of the safetensors layout says so itself (its ``length`` is its data's). A ``torch.save``
    item is read here, the first time only (cached per chunk while its file is unchanged): its zip
    directory and ``data.pkl`` (at most 64 KiB, with the general restricted unpickler), checked
    against the metadata's dtype and sizes, C-contiguous. The data is 64-byte aligned inside the
    item, which does not make it aligned in the file: readers copy where the offset needs it.
    """
    nbytes = math.prod(chunk.sizes) * DTYPE_ITEMSIZE[dtype]
    if chunk.length == nbytes:
        return Source(chunk.file, chunk.offset, nbytes)
    try:
        st = os.stat(chunk.file)
    except OSError as exc:
        raise CheckpointFormatError(chunk.file, f"cannot read: {exc.strerror}") from None
    return _item_source(chunk, dtype, (st.st_ino, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=1 << 16)
def _item_source(chunk: Chunk, dtype: str, identity: tuple[int, int, int]) -> Source:
    """:func:`chunk_source` of a ``torch.save`` item, for the file as ``identity`` describes it."""
    start, stop, size = chunk.offset, chunk.offset + chunk.length, identity[1]

    def refuse(problem: str, hint: str = _HINT) -> NoReturn:
        where = f"the item at byte {start:,} ({chunk.length:,} bytes)"
        raise CheckpointFormatError(chunk.file, f"{where}: {problem}", hint)

    if stop > size:
        refuse(f"the file has {size:,} bytes (truncated)", "Copy the directory again")
    try:
        with open(chunk.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise CheckpointFormatError(chunk.file, f"cannot map: {exc}") from None
    try:
        members, prefix, member, _ = item_pickle(chunk.file, mm, start, stop)
        if member.size > MAX_TENSOR_PICKLE:
            raise CheckpointFormatError(chunk.file, too_large(member.size), TOO_LARGE_HINT)
        order = members.get(prefix + "byteorder")
        if order is not None and _member_bytes(chunk.file, mm, order, end=stop) != b"little":
            raise CheckpointFormatError(
                chunk.file, "a big-endian checkpoint", "Re-save it on x86/ARM"
            )
        pickle_bytes = _member_bytes(chunk.file, mm, member, check_crc=True, end=stop)
        tensor = _item_tensor(pickle_bytes)
        storage = (
            storage_source(chunk.file, mm, members, prefix, tensor.storage, stop)
            if type(tensor) is TensorRecord
            else None
        )
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(chunk.file, exc.globals, exc.detail, exc.calls) from None
    except CheckpointFormatError as exc:
        refuse(exc.problem, exc.hint or _HINT)
    except Refused as exc:
        refuse(str(exc))
    finally:
        mm.close()
    if storage is None:
        refuse(f"it holds {brief(tensor)}, not a tensor")
    if (tensor.dtype, tensor.shape) != (dtype, chunk.sizes):
        refuse(
            f"it holds {tensor.dtype} {_show(tensor.shape)}; the metadata says {dtype} "
            f"{_show(chunk.sizes)}"
        )
    if not tensor.is_contiguous():
        refuse(f"it holds a tensor of strides {_show(tensor.stride)}, not C-contiguous")
    nbytes = tensor.nbytes
    # the member's CRC covers the whole storage: it checks the chunk when the chunk is all of it
    crc = storage.crc if tensor.offset == 0 and nbytes == storage.nbytes else None
    return Source(chunk.file, storage.offset + tensor.offset * DTYPE_ITEMSIZE[dtype], nbytes, crc)


_TENSORS: collections.OrderedDict[tuple[bytes, int], TensorRecord] = collections.OrderedDict()
_TENSORS_KEPT = 4096  # distinct data.pkl remembered (a few hundred bytes of record each)
_TENSORS_LOCK = threading.Lock()


def _item_tensor(pickle_bytes: bytes) -> Any:
    """What an item's ``data.pkl`` (at most :data:`MAX_TENSOR_PICKLE` bytes) holds: a tensor
    record, made by the general restricted unpickler. The pickle of ``torch.save(tensor)``
    depends on the tensor's dtype and shape only, so the chunks of one tensor, or of tensors
    alike, share one reading: the last 4,096 tensor records are kept, by the pickle's digest
    and length (never its bytes); what is not a tensor is refused by the caller, never kept."""
    key = pickle_key(pickle_bytes)
    with _TENSORS_LOCK:
        found = _TENSORS.get(key)
        if found is not None:
            _TENSORS.move_to_end(key)
            return found
    storages: dict[str, StorageRef] = {}
    tree, _ = unpickle(
        io.BytesIO(pickle_bytes),
        path="data.pkl",
        symbolic=True,
        persistent_load=lambda pid: storage_ref(pid, storages),
        end=len(pickle_bytes),
    )
    if type(tree) is TensorRecord:
        with _TENSORS_LOCK:
            _TENSORS[key] = tree
            if len(_TENSORS) > _TENSORS_KEPT:
                _TENSORS.popitem(last=False)
    return tree
