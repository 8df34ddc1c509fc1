"""Checkpoint → safetensors, and a value scan: the tools behind ``smartload convert`` / ``--scan``.

Both are priced by the bytes the file stores, not by the shapes it claims: a scan reads each
tensor's stored values (:func:`stored_values`), once per distinct view, and a conversion refuses
to write more than a :class:`ReadBudget` allows, since safetensors has no views and every key is
written in full.

A DCP directory is consolidated from its chunks without ``torch.distributed``: a tensor read from
chunks (assembled, or copied where its bytes are not aligned in the file) is read when it is
checked and again when it is written, so that one such copy at a time is held.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from ._formats import _SAFETENSORS_DTYPES
from ._plan import open_checkpoint
from ._records import ArrayRecord, ChunkedRecord, TensorRecord
from ._tensors import Materializer, ReadBudget, reducible, stored_bytes, stored_values
from .errors import CheckpointFormatError

__all__ = ["TensorScan", "convert_to_safetensors", "scan"]

if TYPE_CHECKING:
    from ._plan import _Checkpoint

_CODES = {name: code for code, name in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorScan:
    key: str
    nan: int
    inf: int
    all_zero: bool


def _open(
    path: str, ema: bool, state_dict_path: Sequence[str] | None
) -> tuple[_Checkpoint, Materializer, Iterator[tuple[str, torch.Tensor]]]:
    """The checkpoint, its reader, and its state dict's tensors (memory-mapped, zip CRCs checked)
    one by one."""
    ckpt = open_checkpoint(path, ema=ema, state_dict_path=state_dict_path)
    materializer = Materializer(ckpt.sources, verify_crc=True)
    items = ((key, materializer.tensor(leaf)) for key, leaf in ckpt.tensors.items())
    return ckpt, materializer, items


def scan(
    path: str,
    *,
    ema: bool = False,
    state_dict_path: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[TensorScan]:
    """Read every tensor (checking zip CRCs) and count NaN/Inf, and note all-zero tensors.

    Each tensor is read through :func:`stored_values`: NaN and Inf are counted among the values
    the file stores (a view that repeats one NaN 1,000 times counts 1). Views alike (tied
    weights) are read once.
    """
    ckpt, _, tensors = _open(path, ema, state_dict_path)
    budget = ReadBudget(ckpt.path, stored_bytes(ckpt.tensors, ckpt.sources), "scanning")
    done: dict[Any, TensorScan] = {}  # by view: the same stored values, the same answer
    out = []
    for key, t in tensors:
        view = _view_of(ckpt.tensors[key])
        found = done.get(view) if view is not None else None
        if found is None:
            stored = stored_values(t)
            budget.charge(key, stored.numel() * stored.element_size())
            found = _scan_values(key, stored)
            if view is not None:
                done[view] = found
            if progress is not None:
                progress(stored.numel() * stored.element_size())
        out.append(TensorScan(key, found.nan, found.inf, found.all_zero))
    return out


def _view_of(leaf: Any) -> Any:
    """What identifies the values a record reads (None for a leaf that is not a record)."""
    if type(leaf) is TensorRecord:
        return (leaf.storage.key, leaf.offset, leaf.shape, leaf.stride, leaf.dtype)
    if type(leaf) is ArrayRecord:
        return id(leaf)
    if type(leaf) is ChunkedRecord:  # its chunks say where every value is
        return leaf
    return None


def _scan_values(key: str, t: torch.Tensor) -> TensorScan:
    t = reducible(t)
    nan = inf = 0
    if t.is_floating_point() or t.is_complex():
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    all_zero = t.numel() > 0 and not bool(t.any())
    return TensorScan(key, nan, inf, all_zero)


def convert_to_safetensors(
    path: str,
    out: str,
    *,
    ema: bool = False,
    state_dict_path: Sequence[str] | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Write the checkpoint's state dict to ``out`` as safetensors; returns what was written.

    Reads like :func:`smartload.load` (and refuses what it refuses, non-finite values included
    unless ``allow_nonfinite``). Every tensor is written contiguous and on its own, so views of one
    storage become separate tensors. The file appears atomically.
    """
    entries: list[tuple[str, torch.Tensor]] = []
    broken = []
    ckpt, materializer, tensors = _open(path, ema, state_dict_path)
    location = "/".join(ckpt.state_dict_path)
    budget = ReadBudget(ckpt.path, stored_bytes(ckpt.tensors, ckpt.sources), "converting")
    for key, t in tensors:
        if t.dtype not in _TORCH_CODES:
            raise CheckpointFormatError(
                path, f"tensor {key!r} has dtype {t.dtype}, which safetensors lacks"
            )
        budget.charge(key, t.numel() * t.element_size())  # what writing it takes
        if not allow_nonfinite and t.is_floating_point() and not _finite(stored_values(t)):
            broken.append(key)
        if type(ckpt.tensors[key]) is ChunkedRecord:  # maybe a copy: read again when written
            t = torch.empty(t.shape, dtype=t.dtype, device="meta")
        entries.append((key, t))
    if broken:
        raise CheckpointFormatError(
            path,
            f"non-finite values in {len(broken)} tensor(s): {', '.join(broken[:10])}",
            "Nothing was written. Pass --allow-nonfinite to convert them anyway",
        )
    metadata = {
        "format": "pt",
        "source": os.path.basename(os.path.normpath(path)),  # a DCP directory's name too
        "state_dict_path": location,
        "converted_by": f"smartload {__version__}",
    }
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, t in entries:
        nbytes = t.numel() * t.element_size()
        header[key] = {
            "dtype": _TORCH_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data area starts 8-byte aligned
    folder = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix=".smartload-", suffix=".safetensors", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for key, t in entries:
                if t.is_meta:
                    t = materializer.tensor(ckpt.tensors[key])
                if t.numel():
                    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return {"out": out, "tensors": len(entries), "bytes": offset, "metadata": metadata}


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(reducible(t)).all())


_TORCH_CODES = {getattr(torch, name): code for name, code in _CODES.items() if hasattr(torch, name)}
