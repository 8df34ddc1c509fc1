"""Turning records into torch tensors: memory-mapped views, read only for the keys a plan uses."""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ._dcp import chunk_source
from ._formats import Source
from ._records import ArrayRecord, Chunk, ChunkedRecord, TensorRecord
from .errors import CheckpointFormatError

__all__ = [
    "reducible",
    "Materializer",
    "ReadBudget",
    "stored_bytes",
    "stored_values",
    "torch_dtype",
]


@functools.cache  # once per dtype name, not once per tensor
def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointFormatError("?", f"dtype {name} is not supported by this torch")
    return dtype


class Materializer:
    """Opens each file once (``UntypedStorage.from_file``: a private, copy-on-write mmap) and
    views it once per dtype, so a tensor costs one ``as_strided`` call."""

    def __init__(self, sources: Mapping[str, Source], *, verify_crc: bool = False) -> None:
        self._sources = sources
        self._files: dict[str, torch.Tensor] = {}
        self._typed: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._aligned: dict[str, torch.Tensor] = {}  # storage key -> its bytes, copied once
        self._verify_crc = verify_crc
        self._checked: set[str] = set()

    def tensor(self, leaf: Any) -> torch.Tensor:
        if isinstance(leaf, TensorRecord):
            return self._from_record(leaf)
        if isinstance(leaf, ArrayRecord):
            return _from_array(leaf)
        if isinstance(leaf, ChunkedRecord):
            return self._from_chunks(leaf)
        if isinstance(leaf, torch.Tensor):
            return leaf
        if isinstance(leaf, np.ndarray):
            return torch.from_numpy(np.array(leaf, copy=True))
        raise TypeError(f"not a tensor: {type(leaf).__name__}")

    def tensor_of(self, leaves: Mapping[str, Any]) -> Callable[[str], torch.Tensor]:
        """A reader of the tensor of each key of ``leaves``."""
        return lambda key: self.tensor(leaves[key])

    def file_bytes(self, path: str) -> torch.Tensor:
        data = self._files.get(path)
        if data is None:
            size = os.path.getsize(path)
            storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
            data = torch.empty(0, dtype=torch.uint8).set_(storage)  # type: ignore[arg-type]
            self._files[path] = data
        return data

    def _typed_file(self, path: str, dtype: torch.dtype) -> torch.Tensor:
        typed = self._typed.get((path, dtype))
        if typed is None:
            data = self.file_bytes(path)
            itemsize = dtype.itemsize
            typed = data[: len(data) - len(data) % itemsize].view(dtype)
            self._typed[(path, dtype)] = typed
        return typed

    def _from_record(self, record: TensorRecord) -> torch.Tensor:
        source = self._sources[record.storage.key]
        dtype = torch_dtype(record.dtype)
        itemsize = dtype.itemsize
        if self._verify_crc or source.offset % itemsize:
            return self._from_record_slowly(record, source, dtype)
        typed = self._typed_file(source.file, dtype)
        if source.offset + source.nbytes > len(self._files[source.file]):
            raise CheckpointFormatError(source.file, f"storage {record.storage.key!r} is truncated")
        return typed.as_strided(
            record.shape, record.stride, source.offset // itemsize + record.offset
        )

    def _from_record_slowly(
        self, record: TensorRecord, source: Source, dtype: torch.dtype
    ) -> torch.Tensor:
        """Storages checked against their CRC, or not aligned to their dtype (safetensors and
        legacy files)."""
        raw = self.file_bytes(source.file)[source.offset : source.offset + source.nbytes]
        if len(raw) != source.nbytes:
            raise CheckpointFormatError(source.file, f"storage {record.storage.key!r} is truncated")
        if self._verify_crc and source.crc is not None and record.storage.key not in self._checked:
            if zlib.crc32(raw.numpy().data) != source.crc:
                raise CheckpointFormatError(
                    source.file,
                    f"CRC mismatch in storage {record.storage.key!r}",
                    "The file is corrupt",
                )
            self._checked.add(record.storage.key)
        if source.offset % dtype.itemsize:
            # safetensors and legacy torch files do not align their storages: copy each once,
            # so views of one storage (tied weights, an RNN's flat weights) stay views of one copy
            copy = self._aligned.get(record.storage.key)
            if copy is None:
                copy = self._aligned[record.storage.key] = raw.clone()
            raw = copy
        typed = raw.view(dtype)
        # as_strided's offset counts from the start of the storage, not of the view
        return typed.as_strided(record.shape, record.stride, typed.storage_offset() + record.offset)

    def _from_chunks(self, record: ChunkedRecord) -> torch.Tensor:
        """A tensor saved in chunks (DCP), assembled; a chunk that is the whole tensor is
        returned as it is read (a view of the file where its offset is aligned)."""
        dtype = torch_dtype(record.dtype)
        chunks = record.chunks
        if len(chunks) == 1 and chunks[0].sizes == record.shape:
            return self._chunk(chunks[0], record.dtype, dtype)
        out = torch.empty(record.shape, dtype=dtype)
        for chunk in chunks:
            box = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))
            out[box] = self._chunk(chunk, record.dtype, dtype)
        return out

    def _chunk(self, chunk: Chunk, name: str, dtype: torch.dtype) -> torch.Tensor:
        source = chunk_source(chunk, name)
        raw = self.file_bytes(source.file)[source.offset : source.offset + source.nbytes]
        if len(raw) != source.nbytes:
            raise CheckpointFormatError(
                source.file, f"the chunk at byte {source.offset:,} is truncated"
            )
        key = f"{source.file}@{source.offset}"
        if self._verify_crc and source.crc is not None and key not in self._checked:
            if zlib.crc32(raw.numpy().data) != source.crc:
                raise CheckpointFormatError(
                    source.file,
                    f"CRC mismatch in the chunk at byte {source.offset:,}",
                    "The file is corrupt",
                )
            self._checked.add(key)
        if source.offset % dtype.itemsize:  # aligned inside its item, not inside the file
            raw = raw.clone()
        return raw.view(dtype).reshape(chunk.sizes)


def _from_array(record: ArrayRecord) -> torch.Tensor:
    assert record.data is not None, "arrays are materialized only in materialize mode"
    array = np.frombuffer(record.data, dtype=np.dtype(record.numpy_dtype))
    array = array.reshape(record.shape, order="F" if record.fortran else "C")
    # a native-order, writable, C-ordered copy (0-d arrays stay 0-d)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), order="C", copy=True))


def stored_values(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t``'s storage holding every value ``t`` reads, and no more elements than
    lie between the first and the last of them: ``t`` itself unless ``t`` reads some stored
    values more than once.

    A view may claim far more elements than its file stores: shape (2**40, 8) with strides
    (0, 0) reads one float 2**43 times. Checks of values (NaN, Inf, all zero) go through this
    view, so they cost what the file stores, not what its shapes claim. Dimensions of stride 0
    (or size 1) are dropped, which keeps exactly the values read; if what is left still
    overlaps itself, the whole stored span is returned instead (a superset of the values read).
    """
    if t.is_contiguous() or t.numel() == 0:
        return t
    kept = [
        (size, stride)
        for size, stride in zip(t.shape, t.stride(), strict=True)
        if size > 1 and stride
    ]
    sizes = tuple(size for size, _ in kept)
    strides = tuple(stride for _, stride in kept)
    span = 1 + sum((size - 1) * stride for size, stride in kept)
    if math.prod(sizes) > span:  # overlapping rows: read the stored span once instead
        return t.as_strided((span,), (1,))
    return t.as_strided(sizes, strides)  # the same storage offset as ``t``


class ReadBudget:
    """The bytes a scan, a comparison or a conversion may still read or write: for files that
    store N bytes, :data:`PER_STORED_BYTE` · N + :data:`READ_FLOOR`. Their views may claim far
    more (strides of 0, rows that overlap, one storage under many keys), and a conversion must
    write each key in full."""

    def __init__(self, path: str, stored: int, doing: str) -> None:
        self.path = path
        self.stored = stored
        self.doing = doing
        self.limit = self.left = PER_STORED_BYTE * stored + READ_FLOOR

    def charge(self, key: str, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise CheckpointFormatError(
                self.path,
                f"{self.doing} the state dict would take more than {self.limit:,} bytes "
                f"({PER_STORED_BYTE} per byte of the {self.stored:,} stored + "
                f"{READ_FLOOR >> 20} MiB), reached at tensor {key!r}: its tensors claim far more "
                "elements than are stored (strides of 0, overlapping or shared views)",
                "Nothing was written. Re-save each tensor as a contiguous copy (.contiguous()) "
                "from code you trust",
            )


PER_STORED_BYTE = 8
READ_FLOOR = 256 << 20


def stored_bytes(leaves: Mapping[str, Any], sources: Mapping[str, Source]) -> int:
    """The bytes a checkpoint stores: its storages, its arrays pickled inline and its chunked
    (DCP) tensors, each once (chunks tile a tensor exactly: its bytes are theirs)."""
    inline = {
        id(leaf): leaf.nbytes
        for leaf in leaves.values()
        if type(leaf) is ArrayRecord or type(leaf) is ChunkedRecord
    }
    return sum(source.nbytes for source in sources.values()) + sum(inline.values())


def reducible(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy in a dtype torch can reduce and compare (float8 → float32, complex32 →
    complex64: torch has no isnan, isfinite or == for those on the CPU)."""
    if t.dtype == torch.complex32:
        return t.to(torch.complex64)
    if t.is_floating_point() and t.element_size() == 1:
        return t.float()
    return t
