"""Checkpoint against checkpoint, key by key: presence, shape, dtype and values (``diff A B``).

Shapes and dtypes come from the structure (:func:`smartload.inspect`); values are read only for
the keys alike in both, memory-mapped, one chunk at a time, so memory stays bounded whatever the
tensors' size. What is compared is priced by the bytes the files store (:class:`ReadBudget`):
dimensions both tensors repeat (stride 0) are compared once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._inspect import CheckpointInfo, inspect
from ._plan import open_checkpoint
from ._rename_hint import RenameHint, rename_hint
from ._tensors import Materializer, ReadBudget, reducible, stored_bytes

__all__ = ["CheckpointComparison", "ValueDifference", "compare_checkpoints"]

CHUNK = 1 << 22  # elements compared at a time: two float64 chunks hold 64 MB


@dataclass(frozen=True)
class ValueDifference:
    """A key of equal shape and dtype in both checkpoints whose values differ."""

    elements: int  # how many elements differ (NaN meeting NaN is no difference)
    numel: int
    max_abs: float  # the largest |a - b|; nan where a NaN meets a number

    def to_dict(self) -> dict[str, Any]:
        finite = math.isfinite(self.max_abs)
        return {
            "elements": self.elements,
            "numel": self.numel,
            "max_abs_diff": self.max_abs if finite else str(self.max_abs),
        }


@dataclass(frozen=True)
class CheckpointComparison:
    """What differs between two checkpoints' state dicts (keys in the first file's order)."""

    a: CheckpointInfo
    b: CheckpointInfo
    same: tuple[str, ...]  # equal in shape, dtype and every value
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    shape_differs: tuple[str, ...]
    dtype_differs: tuple[str, ...]
    value_differs: Mapping[str, ValueDifference]
    rename_hint: RenameHint | None = None  # the first's keys only it has, renamed into the second's

    @property
    def identical(self) -> bool:
        return not (
            self.only_in_a
            or self.only_in_b
            or self.shape_differs
            or self.dtype_differs
            or self.value_differs
        )

    def to_dict(self) -> dict[str, Any]:
        a, b = self.a.tensors, self.b.tensors
        return {
            "a": self.a.path,
            "b": self.b.path,
            "identical": self.identical,
            "same": len(self.same),
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "shape_differs": {k: [list(a[k].shape), list(b[k].shape)] for k in self.shape_differs},
            "dtype_differs": {k: [a[k].dtype, b[k].dtype] for k in self.dtype_differs},
            "value_differs": {k: v.to_dict() for k, v in self.value_differs.items()},
            "rename_hint": self.rename_hint.to_dict() if self.rename_hint else None,
        }


def compare_checkpoints(a: str, b: str, *, ema: bool = False) -> CheckpointComparison:
    """Compare the state dicts of two checkpoint files; values only where shape and dtype agree."""
    info_a, info_b = inspect(a, ema=ema), inspect(b, ema=ema)
    ta, tb = info_a.tensors, info_b.tensors
    both = [k for k in ta if k in tb]
    shape = tuple(k for k in both if ta[k].shape != tb[k].shape)
    dtype = tuple(k for k in both if ta[k].shape == tb[k].shape and ta[k].dtype != tb[k].dtype)
    alike = [k for k in both if ta[k].shape == tb[k].shape and ta[k].dtype == tb[k].dtype]
    values = _value_differences(info_a, info_b, alike) if alike else {}
    hint = rename_hint(
        {k: tuple(t.shape) for k, t in tb.items() if k not in ta},
        {k: tuple(t.shape) for k, t in ta.items() if k not in tb},
        {k: k for k in both},  # a rule must leave the keys both have as they are
    )
    return CheckpointComparison(
        a=info_a,
        b=info_b,
        same=tuple(k for k in alike if k not in values),
        only_in_a=tuple(sorted(set(ta) - set(tb))),
        only_in_b=tuple(sorted(set(tb) - set(ta))),
        shape_differs=shape,
        dtype_differs=dtype,
        value_differs=values,
        rename_hint=hint,
    )


def _value_differences(
    a: CheckpointInfo, b: CheckpointInfo, keys: Iterable[str]
) -> dict[str, ValueDifference]:
    """Read both files' tensors of ``keys`` (the state dicts ``inspect`` chose) and compare."""
    opened = [open_checkpoint(i.path, state_dict_path=i.state_dict_path) for i in (a, b)]
    read_a, read_b = (Materializer(c.sources).tensor_of(c.tensors) for c in opened)
    stored = sum(stored_bytes(c.tensors, c.sources) for c in opened)
    budget = ReadBudget(a.path, stored, "comparing")
    out = {}
    for key in keys:
        found = _compare_tensors(read_a(key), read_b(key), key, budget)
        if found is not None:
            out[key] = found
    return out


def _compare_tensors(
    a: torch.Tensor, b: torch.Tensor, key: str, budget: ReadBudget
) -> ValueDifference | None:
    """None when equal (NaN where both are NaN), else how they differ; chunk by chunk."""
    numel = a.numel()
    a, b, repeats = _without_common_repeats(a, b)
    budget.charge(key, a.numel() * (a.element_size() + b.element_size()))
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    elements, largest = 0, 0.0
    for start in range(0, flat_a.numel(), CHUNK):
        chunk_a, chunk_b = flat_a[start : start + CHUNK], flat_b[start : start + CHUNK]
        chunk_a, chunk_b = reducible(chunk_a), reducible(chunk_b)  # float8, complex32
        if torch.equal(chunk_a, chunk_b):
            continue
        count, chunk_max = _chunk_difference(chunk_a, chunk_b)
        elements += count
        largest = chunk_max if math.isnan(chunk_max) or chunk_max > largest else largest
    return ValueDifference(elements * repeats, numel, largest) if elements else None


def _without_common_repeats(
    a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``a`` and ``b`` without the dimensions along which both repeat one value (stride 0 in
    both, or size 1), and how many elements each one left stands for: comparing those compares
    ``a`` and ``b`` exactly (a (2**40, 8) broadcast of one float against another: one pair)."""
    if a.numel() == 0 or (a.is_contiguous() and b.is_contiguous()):
        return a, b, 1
    keep = [d for d in range(a.dim()) if a.shape[d] > 1 and (a.stride(d) or b.stride(d))]
    sizes = [a.shape[d] for d in keep]
    repeats = a.numel() // math.prod(sizes)
    strided = [t.as_strided(sizes, [t.stride(d) for d in keep]) for t in (a, b)]
    return strided[0], strided[1], repeats


def _chunk_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """How many elements differ, and the largest |a - b| among them (in float64/complex128)."""
    differ = a != b
    if a.is_floating_point() or a.is_complex():
        differ &= ~(a.isnan() & b.isnan())
    if not bool(differ.any()):
        return 0, 0.0
    wide = torch.complex128 if a.is_complex() else torch.float64
    gap = (a[differ].to(wide) - b[differ].to(wide)).abs()
    return int(differ.sum()), float(gap.max())
