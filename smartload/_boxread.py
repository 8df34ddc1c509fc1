"""Reading a box of a tensor from its file: only the bytes the box holds.

A sharded load reads, on each rank, the part of each checkpoint tensor its shard needs. A tensor
is stored as one or more C-ordered pieces (one for a torch or safetensors file, one per saving
rank's chunk in a DCP directory). The intersection of a box with a piece is a list of
:class:`Run` s: byte ranges contiguous both in the file and in the box, one per index of the
dimensions before the last one either of them cuts.

Two ways to use them:

- :meth:`BoxReader.read`: ``pread`` the runs into a new tensor (values that are computed on:
  slices, casts, conversions);
- :meth:`BoxReader.runs` + :func:`all_finite` + :func:`copy_runs`: a same-dtype copy never
  holds its values in memory of its own. The runs are read and checked a few MB at a time
  before any rank writes, then copied from the page cache (through the file's memory map) into
  the shard once the ranks agree: a rank holds no copy of its share, and the storage is read
  once.

``bytes_read`` counts the bytes of the runs read either way.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ._formats import Source
from ._init import Box
from ._records import DTYPE_ITEMSIZE, ChunkedRecord, TensorRecord
from ._tensors import Materializer, torch_dtype
from .errors import CheckpointFormatError

__all__ = ["BoxReader", "Run", "all_finite", "copy_runs", "full_box"]


def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


class Run(NamedTuple):
    """``nbytes`` at byte ``offset`` of ``file``: the bytes at byte ``at`` of a box (C order)."""

    file: str
    offset: int
    nbytes: int
    at: int


class _Piece(NamedTuple):
    """A C-ordered block of a tensor: its first global index and size per dimension, and where
    its bytes are (found only for the blocks a box reads: a DCP chunk's item is parsed then)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    source: Callable[[], Source]


class BoxReader:
    """Reads boxes of a checkpoint's tensors; counts the bytes it reads (``bytes_read``).

    Tensors that are not stored C-ordered (a view with strides of its own, a numpy array pickled
    inline, a tensor in memory) are read whole through ``materializer`` and cut; their stored
    bytes are counted once.
    """

    def __init__(
        self, sources: Mapping[str, Source], materializer: Materializer, *, whole: bool = False
    ) -> None:
        self._sources = sources
        self._materializer = materializer
        self._whole_only = whole  # every tensor read whole, through the materializer
        self._files: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._whole: set[int] = set()  # leaves read whole (counted once)
        self.bytes_read = 0

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def runs(self, leaf: Any, box: Box) -> list[Run] | None:
        """The runs of ``box`` (global coordinates) of ``leaf``, counted as read; None when
        ``leaf`` is not stored C-ordered."""
        pieces = self._pieces(leaf)
        if pieces is None:
            return None
        itemsize = DTYPE_ITEMSIZE[leaf.dtype]
        out = []
        for piece in pieces:
            out.extend(self._piece_runs(piece, box, itemsize))
        self.bytes_read += sum(run.nbytes for run in out)
        return out

    def read(self, leaf: Any, box: Box) -> torch.Tensor:
        """The values of ``box`` (global coordinates) of the tensor ``leaf``, as a new tensor."""
        runs = self.runs(leaf, box)
        if runs is None:
            return self._cut_whole(leaf, box)
        out = torch.empty([b - a for a, b in box], dtype=torch_dtype(leaf.dtype))
        if out.numel():
            buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy().data)
            for run in runs:
                fd = self.fd(run.file)
                _pread_exactly(fd, buffer[run.at : run.at + run.nbytes], run.offset, run.file)
        return out

    def read_rows(self, leaf: Any, box: Box, dim: int, rows: list[int]) -> torch.Tensor:
        """``box`` with dimension ``dim`` replaced by the rows ``rows`` (in that order): one read
        per run of consecutive rows."""
        wanted = sorted(set(rows))
        spans: list[tuple[int, int]] = []
        for row in wanted:
            if spans and spans[-1][1] == row:
                spans[-1] = (spans[-1][0], row + 1)
            else:
                spans.append((row, row + 1))
        parts = [self.read(leaf, (*box[:dim], span, *box[dim + 1 :])) for span in spans]
        got = torch.cat(parts, dim) if len(parts) != 1 else parts[0]
        position = {row: i for i, row in enumerate(wanted)}
        return got.index_select(dim, torch.tensor([position[r] for r in rows], dtype=torch.long))

    def file_bytes(self, path: str) -> torch.Tensor:
        """The file's bytes, memory-mapped (one private map per file, shared with the
        materializer)."""
        return self._materializer.file_bytes(path)

    # ----------------------------------------------------------------------------------------------

    def map_files(self, runs: Sequence[Run]) -> None:
        """Map the files of ``runs`` now (before the ranks agree), and check each map is of the
        file read so far: one replaced since (a trainer rewriting its checkpoint) is refused
        here, not copied from after the agreement."""
        for path in {run.file for run in runs}:
            self.file_bytes(path)
            now, read = os.stat(path), os.fstat(self.fd(path))
            if (now.st_dev, now.st_ino) != (read.st_dev, read.st_ino):
                raise CheckpointFormatError(
                    path,
                    "the file was replaced while it was being read",
                    "Nothing was loaded. Load it again once it is written",
                )

    def _pieces(self, leaf: Any) -> list[_Piece] | None:
        if self._whole_only:
            return None
        if isinstance(leaf, ChunkedRecord):
            from ._dcp import chunk_source

            dtype = leaf.dtype
            return [
                _Piece(c.offsets, c.sizes, functools.partial(chunk_source, c, dtype))
                for c in leaf.chunks
            ]
        if isinstance(leaf, TensorRecord) and leaf.is_contiguous():
            storage = self._sources.get(leaf.storage.key)
            if storage is None:
                return None
            itemsize = DTYPE_ITEMSIZE[leaf.dtype]
            start = storage.offset + leaf.offset * itemsize
            nbytes = leaf.numel * itemsize
            if leaf.offset < 0 or leaf.offset * itemsize + nbytes > storage.nbytes:
                raise CheckpointFormatError(
                    storage.file, f"a tensor reaches past its storage {leaf.storage.key!r}"
                )
            source = Source(storage.file, start, nbytes)
            return [_Piece((0,) * len(leaf.shape), leaf.shape, lambda: source)]
        return None

    def _piece_runs(self, piece: _Piece, box: Box, itemsize: int) -> list[Run]:
        lo = [max(a, o) for (a, _), o in zip(box, piece.offsets, strict=True)]
        hi = [min(b, o + s) for (_, b), o, s in zip(box, piece.offsets, piece.sizes, strict=True)]
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            return []
        source = piece.source()
        sizes = piece.sizes
        if math.prod(sizes) * itemsize != source.nbytes:
            raise CheckpointFormatError(
                source.file, f"a stored block of {source.nbytes} bytes for {list(sizes)}"
            )
        self._check_inside(source)
        if not sizes:  # a 0-d tensor
            return [Run(source.file, source.offset, itemsize, 0)]
        extents = [b - a for a, b in box]
        strides = [math.prod(sizes[d + 1 :]) for d in range(len(sizes))]
        box_strides = [math.prod(extents[d + 1 :]) for d in range(len(extents))]
        # the last dimension cut by the piece or by the box: from there on, runs are contiguous
        # in both
        split = max(
            (
                d
                for d in range(len(sizes))
                if (lo[d], hi[d]) != (piece.offsets[d], piece.offsets[d] + sizes[d])
                or (lo[d], hi[d]) != box[d]
            ),
            default=0,
        )
        nbytes = (hi[split] - lo[split]) * strides[split] * itemsize
        runs = []
        leading = (range(a, b) for a, b in zip(lo[:split], hi[:split], strict=True))
        for index in itertools.product(*leading):
            first = (*index, lo[split])  # the run's first element, in its first split+1 dims
            element = sum(
                (i - o) * s for i, o, s in zip(first, piece.offsets, strides, strict=False)
            )
            in_box = sum((i - a) * s for i, (a, _), s in zip(first, box, box_strides, strict=False))
            runs.append(
                Run(source.file, source.offset + element * itemsize, nbytes, in_box * itemsize)
            )
        return runs

    def _cut_whole(self, leaf: Any, box: Box) -> torch.Tensor:
        whole = self._materializer.tensor(leaf)
        if id(leaf) not in self._whole:
            self._whole.add(id(leaf))
            self.bytes_read += int(getattr(leaf, "nbytes", whole.numel() * whole.element_size()))
        return whole[tuple(slice(a, b) for a, b in box)]

    def fd(self, path: str) -> int:
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
            self._sizes[path] = os.fstat(fd).st_size
        return fd

    def _check_inside(self, source: Source) -> None:
        self.fd(source.file)
        if source.offset + source.nbytes > self._sizes[source.file]:
            raise CheckpointFormatError(
                source.file, "truncated: a tensor's bytes reach past its end"
            )


def _pread_exactly(fd: int, into: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n <= 0:
            raise CheckpointFormatError(path, "truncated: a tensor's bytes reach past its end")
        done += n


_SCRATCH = 4 << 20  # bytes read and checked at a time


def all_finite(reader: BoxReader, runs: Sequence[Run], dtype: torch.dtype) -> bool:
    """Whether every value of ``runs`` is finite: read (``pread``) a few MB at a time into one
    small buffer and summed (a finite sum proves it; a non-finite one may be an overflow,
    which the caller rechecks exactly). Nothing is kept: :func:`copy_runs` copies the same
    pages from the page cache once the ranks agree."""
    scratch = torch.empty(_SCRATCH // dtype.itemsize, dtype=dtype)
    buffer = memoryview(scratch.view(torch.uint8).numpy().data)
    wide = torch.float32 if dtype.itemsize < 4 else dtype
    for run in runs:
        fd = reader.fd(run.file)
        for start in range(0, run.nbytes, _SCRATCH):
            n = min(_SCRATCH, run.nbytes - start)
            _pread_exactly(fd, buffer[:n], run.offset + start, run.file)
            # 16-bit floats summed in float32: finite float16 values overflow a float16 sum
            # (wider ones in their own dtype: an overflow there is rechecked exactly)
            if not bool(torch.isfinite(scratch[: n // dtype.itemsize].sum(dtype=wide))):
                return False
    return True


def copy_runs(reader: BoxReader, runs: Sequence[Run], into: torch.Tensor) -> None:
    """Copy ``runs`` from the memory map into the contiguous ``into`` (its bytes, in place)."""
    flat = into.view(-1).view(torch.uint8) if into.dim() else into.view(1).view(torch.uint8)
    for run in runs:
        data = reader.file_bytes(run.file)
        flat[run.at : run.at + run.nbytes].copy_(data[run.offset : run.offset + run.nbytes])
