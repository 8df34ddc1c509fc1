"""Reading a box of a tensor from its file: only the bytes the box holds, with ``pread``.

A sharded load reads, on each rank, the part of each checkpoint tensor its shard needs. A tensor
is stored as one or more C-ordered chunks (one for a torch or safetensors file, one per saving rank
in a DCP directory); the intersection of the box with a chunk is a set of contiguous byte runs,
one per index of the dimensions before the last partial one, read straight into the result (no
memory map, so the bytes a rank reads are the bytes it asked for, which ``/proc/self/io`` shows).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ._formats import Source
from ._init import Box
from ._records import DTYPE_ITEMSIZE, ChunkedRecord, TensorRecord
from ._tensors import Materializer, torch_dtype
from .errors import CheckpointFormatError

__all__ = ["BoxReader", "full_box"]


def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)


class _Piece(NamedTuple):
    """A C-ordered block of a tensor: its first global index and size per dimension, and where
    its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    source: Source


class BoxReader:
    """Reads boxes of a checkpoint's tensors; counts the bytes it reads (``bytes_read``).

    Tensors that are not stored C-ordered (a view with strides of its own, a numpy array pickled
    inline, a tensor in memory) are read whole through ``materializer`` and cut; their stored
    bytes are counted once.
    """

    def __init__(self, sources: Mapping[str, Source], materializer: Materializer) -> None:
        self._sources = sources
        self._materializer = materializer
        self._files: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._whole: set[int] = set()  # leaves read whole (counted once)
        self.bytes_read = 0

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def read(self, leaf: Any, box: Box) -> torch.Tensor:
        """The values of ``box`` (global coordinates) of the tensor ``leaf``, as a new tensor."""
        pieces = self._pieces(leaf)
        if pieces is None:
            return self._cut_whole(leaf, box)
        dtype = torch_dtype(leaf.dtype)
        out = torch.empty([b - a for a, b in box], dtype=dtype)
        if out.numel() == 0:
            return out
        for piece in pieces:
            lo = [max(a, o) for (a, _), o in zip(box, piece.offsets, strict=True)]
            hi = [
                min(b, o + s) for (_, b), o, s in zip(box, piece.offsets, piece.sizes, strict=True)
            ]
            if any(h <= low for low, h in zip(lo, hi, strict=True)):
                continue
            local = [(low - o, h - o) for low, h, o in zip(lo, hi, piece.offsets, strict=True)]
            region = tuple(
                slice(low - a, h - a) for low, h, (a, _) in zip(lo, hi, box, strict=True)
            )
            target = out if out[region].is_contiguous() else torch.empty_like(out[region])
            self._read_piece(piece, local, dtype, target[region] if target is out else target)
            if target is not out:
                out[region] = target
        return out

    def read_rows(self, leaf: Any, box: Box, dim: int, rows: list[int]) -> torch.Tensor:
        """``box`` with dimension ``dim`` replaced by the rows ``rows`` (in that order): one read
        per run of consecutive rows."""
        wanted = sorted(set(rows))
        runs: list[tuple[int, int]] = []
        for row in wanted:
            if runs and runs[-1][1] == row:
                runs[-1] = (runs[-1][0], row + 1)
            else:
                runs.append((row, row + 1))
        parts = [self.read(leaf, (*box[:dim], run, *box[dim + 1 :])) for run in runs]
        got = torch.cat(parts, dim) if len(parts) != 1 else parts[0]
        position = {row: i for i, row in enumerate(wanted)}
        return got.index_select(dim, torch.tensor([position[r] for r in rows], dtype=torch.long))

    # ----------------------------------------------------------------------------------------------

    def _pieces(self, leaf: Any) -> list[_Piece] | None:
        if isinstance(leaf, ChunkedRecord):
            from ._dcp import chunk_source

            return [_Piece(c.offsets, c.sizes, chunk_source(c, leaf.dtype)) for c in leaf.chunks]
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
            return [_Piece((0,) * len(leaf.shape), leaf.shape, Source(storage.file, start, nbytes))]
        return None

    def _cut_whole(self, leaf: Any, box: Box) -> torch.Tensor:
        whole = self._materializer.tensor(leaf)
        if id(leaf) not in self._whole:
            self._whole.add(id(leaf))
            self.bytes_read += int(getattr(leaf, "nbytes", whole.numel() * whole.element_size()))
        return whole[tuple(slice(a, b) for a, b in box)]

    def _read_piece(
        self, piece: _Piece, local: list[tuple[int, int]], dtype: torch.dtype, into: torch.Tensor
    ) -> None:
        """Read the sub-box ``local`` (piece coordinates) of ``piece`` into the contiguous
        ``into``: one ``pread`` per contiguous run."""
        itemsize = dtype.itemsize
        sizes = piece.sizes
        if math.prod(sizes) * itemsize != piece.source.nbytes:
            raise CheckpointFormatError(
                piece.source.file,
                f"a stored block of {piece.source.nbytes} bytes for {list(sizes)}",
            )
        self._check_inside(piece.source)
        strides = [math.prod(sizes[d + 1 :]) for d in range(len(sizes))]
        # the last dimension the box does not take whole: runs are contiguous from there on
        split = max((d for d, (a, b) in enumerate(local) if (a, b) != (0, sizes[d])), default=0)
        run = (local[split][1] - local[split][0]) * strides[split] * itemsize if sizes else itemsize
        buffer = memoryview(into.reshape(-1).view(torch.uint8).numpy().data)
        fd = self._fd(piece.source.file)
        ranges = [range(a, b) for a, b in local[:split]]
        for at, index in enumerate(itertools.product(*ranges)):
            element = sum(i * s for i, s in zip(index, strides, strict=False))
            element += local[split][0] * strides[split] if sizes else 0
            _pread_exactly(
                fd,
                buffer[at * run : (at + 1) * run],
                piece.source.offset + element * itemsize,
                piece.source.file,
            )
            self.bytes_read += run

    def _fd(self, path: str) -> int:
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
            self._sizes[path] = os.fstat(fd).st_size
        return fd

    def _check_inside(self, source: Source) -> None:
        self._fd(source.file)
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
