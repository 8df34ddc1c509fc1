"""Loading into a model sharded across processes (DTensor: FSDP2, tensor parallel, HSDP), all or
nothing across ranks.

Every rank of the group calls :func:`smartload.load` with the same arguments. The plan is made in
global coordinates (a DTensor's shape is the global one) on every rank, and the ranks check that
they made the same plan. Then each rank reads and checks only the box of each tensor its shard
holds (:class:`BoxReader`), builds its values, and the ranks agree: if any rank failed, every rank
raises the same error naming the failing ranks, and nothing is written anywhere. Only then does
each rank copy into its local shards.

::

    plan (every rank) ─ agree ─ read + check own boxes ─ agree ─ write own shards
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from . import errors
from ._apply import (
    check_nonfinite_choice,
    check_writable,
    choose_seed,
    new_value,
    nonfinite_keys,
    nonfinite_refusal,
    slice_pairs,
    source_for,
)
from ._boxread import BoxReader, Run, all_finite, copy_runs, full_box
from ._init import Box
from ._load_hooks import compute
from ._plan import dtype_refusal
from ._report import LoadPlan, PlanEntry
from ._tensors import Materializer, stored_bytes
from .errors import InvalidArgumentError, SmartloadError

__all__ = ["Distributed", "collective_group", "load_collective"]

_T = TypeVar("_T")


def _dtensor_type() -> type | None:
    """DTensor, if anything has imported it (a model can hold none otherwise): importing it
    costs half a second, more than a whole load of a small model."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    return itertools.chain(model.parameters(), model.buffers())


def collective_group(model: torch.nn.Module, process_group: Any) -> Any:
    """The process group a load is collective over: ``process_group`` if given, the default
    group when the model holds DTensors, else None (a one-process load)."""
    dtensor = _dtensor_type()
    sharded = dtensor is not None and any(isinstance(t, dtensor) for t in _tensors(model))
    if process_group is None and not sharded:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgumentError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (or leave process_group out)"
        )
    return process_group if process_group is not None else dist.group.WORLD


@dataclass(frozen=True)
class Distributed:
    """How a collective load was spread: the report's ``distributed`` section."""

    world_size: int
    checkpoint_bytes: int
    bytes_read: tuple[int, ...]  # per rank
    sharded_keys: int  # model keys held as shards (the rest: whole on every rank)

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "checkpoint_bytes": self.checkpoint_bytes,
            "ranks": [{"rank": r, "bytes_read": b} for r, b in enumerate(self.bytes_read)],
        }

    def describe(self) -> str:
        share = (
            max(self.bytes_read, default=0) / self.checkpoint_bytes if self.checkpoint_bytes else 0
        )
        return (
            f"sharded over {self.world_size} ranks ({self.sharded_keys} keys held as shards): "
            f"each rank read at most {share:.0%} of the checkpoint's "
            f"{self.checkpoint_bytes:,} bytes"
        )


@dataclass
class _RankOutcome:
    """What one rank reports at an agreement: its failure, or what the others need to know."""

    failure: tuple[str, str, dict[str, Any]] | None = None  # error class, message, attributes
    digest: str = ""
    seed: int = 0
    bytes_read: int = 0


def load_collective(
    model: torch.nn.Module,
    group: Any,
    make: Callable[[], LoadPlan],
    *,
    dry_run: bool,
    on_nonfinite: str,
    verify_checksums: bool,
    init_seed: int | None,
) -> tuple[LoadPlan, Distributed]:
    """Plan on every rank, agree, read and check each rank's boxes, agree, write. Raises the same
    :class:`SmartloadError` class on every rank when any rank fails; then nothing is written."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def plan_step() -> tuple[tuple[LoadPlan, dict[str, Box]], _RankOutcome]:
        check_nonfinite_choice(on_nonfinite)
        plan = make()
        boxes = _boxes(plan)  # refuses placements that are not boxes, before anything is read
        on_meta = sorted(k for k, t in plan.targets.items() if t.is_meta)
        if on_meta:
            raise InvalidArgumentError(
                f"{len(on_meta)} model tensor(s) are on the meta device ({', '.join(on_meta[:5])}"
                f"{' ...' if len(on_meta) > 5 else ''}): a collective load copies into the "
                "tensors each rank has. Nothing was loaded on any rank. Call "
                "model.to_empty(device=...) (after sharding), then load"
            )
        if plan.loaders:
            raise InvalidArgumentError(
                f"module(s) {', '.join(sorted(plan.loaders)[:5])} load through their own "
                "_load_from_state_dict, which cannot be run shard by shard. Nothing was loaded. "
                "Load the unsharded model, then shard it"
            )
        if plan.format == "mapping":
            raise InvalidArgumentError(
                "a sharded load reads from a file or a DCP directory, not a state dict in "
                "memory. Nothing was loaded. Save the state dict (or pass its path)"
            )
        # every rank draws (their generators stay in step); rank 0's draw is used
        seed = choose_seed(plan, init_seed)
        options = (dry_run, on_nonfinite, verify_checksums)
        return (plan, boxes), _RankOutcome(digest=_digest(plan, options), seed=seed)

    planned, mine, own = _attempt(plan_step)
    outcomes = _agree(mine, own, group, world, "planning")
    digests = {o.digest for o in outcomes}
    if len(digests) > 1:
        differ = [r for r, o in enumerate(outcomes) if o.digest != outcomes[0].digest]
        raise InvalidArgumentError(
            f"the ranks made different plans (rank 0 and rank(s) {', '.join(map(str, differ))} "
            "differ). Nothing was loaded on any rank. Every rank must call smartload.load with "
            "the same model structure, checkpoint (the same dtypes and sizes) and arguments"
        )
    assert planned is not None
    plan, boxes = planned
    seed = outcomes[0].seed  # rank 0's, on every rank
    checkpoint_bytes = stored_bytes(plan.tensors, plan.sources)
    sharded = sum(1 for e in plan.entries if _is_dtensor(plan.targets[e.key]))
    if dry_run:
        return plan, Distributed(world, checkpoint_bytes, (0,) * world, sharded)

    # checksums are checked over whole storages: then every tensor is read whole
    materializer = Materializer(plan.sources, verify_crc=verify_checksums)
    reader = BoxReader(plan.sources, materializer, whole=verify_checksums)

    def read_step() -> tuple[dict[str, _Value], _RankOutcome]:
        values = _read_boxes(plan, boxes, model, reader, on_nonfinite, seed, rank, world)
        return values, _RankOutcome(bytes_read=reader.bytes_read)

    try:
        values, mine, own = _attempt(read_step)
        outcomes = _agree(mine, own, group, world, "reading")
        assert values is not None
        _write(plan, values, reader)
    finally:
        reader.close()
    return plan, Distributed(
        world, checkpoint_bytes, tuple(o.bytes_read for o in outcomes), sharded
    )


# --------------------------------------------------------------------------------------------------
# agreement


def _attempt(
    step: Callable[[], tuple[_T, _RankOutcome]],
) -> tuple[_T | None, _RankOutcome, Exception | None]:
    """Run ``step``; a failure becomes an outcome (the other ranks must hear of it, not hang),
    and is kept to be the cause of the error every rank raises."""
    try:
        value, outcome = step()
    except Exception as exc:  # every failure goes through the agreement; re-raised there
        return None, _RankOutcome(failure=_describe_failure(exc)), exc
    return value, outcome, None


def _describe_failure(exc: Exception) -> tuple[str, str, dict[str, Any]]:
    """The failure as it travels: the nearest public smartload error class (by name), the
    message, and the attributes that can be pickled."""
    public = [c.__name__ for c in type(exc).__mro__ if c.__name__ in errors.__all__]
    kind = public[0] if public else ""
    message = str(exc) if kind else f"{type(exc).__name__}: {exc}"
    attributes = {}
    for name, value in vars(exc).items():
        try:
            pickle.dumps(value)
        except Exception:  # an attribute that cannot travel stays behind
            continue
        attributes[name] = value
    return kind, message, attributes


def _agree(
    mine: _RankOutcome, own: Exception | None, group: Any, world: int, step: str
) -> list[_RankOutcome]:
    """Every rank's outcome; raises on every rank when any rank failed (``own``: this rank's
    failure, the cause of what it raises)."""
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, mine, group=group)
    failed = [(r, o.failure) for r, o in enumerate(outcomes) if o.failure is not None]
    if failed:
        raise _collective_error(failed, step) from own
    return outcomes


def _collective_error(
    failed: list[tuple[int, tuple[str, str, dict[str, Any]]]], step: str
) -> SmartloadError:
    """One error, the same on every rank: the class of the lowest failing rank's error (or
    :class:`SmartloadError` for an unexpected exception), naming every failing rank."""
    kind, _, attributes = failed[0][1]
    cls: type[SmartloadError] = getattr(errors, kind) if kind else SmartloadError
    messages = [m for _, (_, m, _) in failed]
    if len(set(messages)) == 1 and len(failed) > 1:
        ranks = ", ".join(str(r) for r, _ in failed)
        lines = [f"ranks {ranks}: {messages[0]}"]
    else:
        lines = [f"rank {r}: {m}" for r, (_, m, _) in failed]
    text = "\n".join(lines)
    if "Nothing was loaded on any rank" not in text:
        text += f"\nNothing was loaded on any rank (a failure while {step})."
    error = cls.__new__(cls)
    Exception.__init__(error, text)
    error.__dict__.update(attributes)
    error.ranks = [r for r, _ in failed]  # type: ignore[attr-defined]
    return error


def _digest(plan: LoadPlan, options: tuple[Any, ...]) -> str:
    """What the ranks must agree on: every entry, what the checkpoint stores, and the options
    that change what a rank does (a rank on a dry run would skip the next agreement)."""
    entries = [
        (e.key, e.action, e.source, e.ckpt_shape, e.ckpt_dtype, e.model_shape, e.model_dtype)
        + (e.rows, e.dim, e.std, e.fill)
        for e in plan.entries
    ]
    stored = stored_bytes(plan.tensors, plan.sources)
    made = json.dumps([entries, plan.format, stored, options], default=str)
    return hashlib.sha256(made.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# boxes


def _is_dtensor(t: torch.Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _boxes(plan: LoadPlan) -> dict[str, Box]:
    """The global box of this rank's shard of every model key; refuses placements that are not
    boxes (``Partial``, ``_StridedShard``) and shards on the meta device."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    out: dict[str, Box] = {}
    refused: list[str] = []
    for entry in plan.entries:
        t = plan.targets[entry.key]
        if not _is_dtensor(t):
            out[entry.key] = full_box(tuple(t.shape))
            continue
        odd = [p for p in t.placements if type(p) not in (Shard, Replicate)]
        if odd:
            refused.append(f"{entry.key} ({', '.join(map(repr, odd))})")
            continue
        if t.is_meta:
            raise InvalidArgumentError(
                f"{entry.key} is a shard on the meta device. Nothing was loaded. Call "
                "model.to_empty(device=...) after sharding, then load"
            )
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        if tuple(shape) != tuple(t._local_tensor.shape):
            raise InvalidArgumentError(
                f"{entry.key}: the local shard has shape {list(t._local_tensor.shape)}, not the "
                f"{list(shape)} its placements {t.placements} give. Nothing was loaded"
            )
        out[entry.key] = tuple((o, o + s) for o, s in zip(offset, shape, strict=True))
    if refused:
        raise InvalidArgumentError(
            f"{len(refused)} model key(s) are sharded in a way that is not a box of the global "
            f"tensor: {'; '.join(refused[:5])}. Nothing was loaded on any rank. smartload loads "
            "Shard(dim) and Replicate() placements (FSDP2, tensor parallel, HSDP); redistribute "
            "the others (or load before parallelising)"
        )
    return out


def _partition(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s part of ``n`` rows, as ``torch.chunk`` splits them."""
    size = -(-n // world) if n else 0
    return min(n, rank * size), min(n, (rank + 1) * size)


# a rank's value for a key: a tensor, or the runs of a same-dtype copy (copied from the file's
# memory map into the shard once the ranks agree)
_Value = torch.Tensor | list[Run]


def _read_boxes(
    plan: LoadPlan,
    boxes: Mapping[str, Box],
    model: torch.nn.Module,
    reader: BoxReader,
    on_nonfinite: str,
    seed: int,
    rank: int,
    world: int,
) -> dict[str, _Value]:
    """This rank's values, every one read and checked; nothing written. Each checkpoint value
    one process would check is checked by some rank: copies by the ranks holding it, the source
    of a slice split across ranks by rows (so a dropped row is checked too)."""
    values: dict[str, _Value] = {}
    checked: dict[str, tuple[torch.Tensor, str]] = {}
    buffers: dict[str, torch.Tensor] = {}
    misfits: list[tuple[PlanEntry, str]] = []
    computed: dict[str, dict[str, torch.Tensor]] = {}
    for entry in plan.entries:
        if entry.action == "skip":
            continue
        target = plan.targets[entry.key]
        local = _local(target)
        box = boxes[entry.key]
        runs = _direct_runs(plan, entry, target, box, reader)
        if runs is not None:
            if on_nonfinite == "error":
                _check_runs(reader, runs, entry, box, checked, plan)
            values[entry.key] = runs
            continue
        source = _source_box(plan, model, entry, box, reader, computed, checked, rank, world)
        if source is not None and not isinstance(target, torch.nn.Parameter):
            buffers[entry.source or entry.key] = local
        value, misfit = new_value(entry, target.dtype, seed, box=box, source=source)
        if tuple(value.shape) != tuple(local.shape):
            raise InvalidArgumentError(
                f"{entry.transform or entry.action} gave shape {list(value.shape)} for the "
                f"shard of {entry.key!r}, not {list(local.shape)}; this is a bug in "
                "smartload. Nothing was loaded"
            )
        values[entry.key] = value
        if misfit is not None:
            misfits.append((entry, misfit))
    if on_nonfinite == "error" and (nonfinite := nonfinite_keys(checked, buffers)):
        raise nonfinite_refusal(plan.checkpoint, nonfinite)
    if misfits:
        raise dtype_refusal("values that the model's dtype cannot hold", misfits, plan.checkpoint)
    check_writable({k: _local(plan.targets[k]) for k in values}, values)
    reader.map_files([run for v in values.values() if isinstance(v, list) for run in v])
    return values


# dtypes whose values a copy takes byte for byte, checked by a sum (float8 and complex: as tensors)
_DIRECT = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
}  # fmt: skip


def _direct_runs(
    plan: LoadPlan, entry: PlanEntry, target: torch.Tensor, box: Box, reader: BoxReader
) -> list[Run] | None:
    """The runs of a copy that needs no value of its own: same dtype, no conversion, into a
    contiguous parameter shard (buffers go through tensors: their infinities may be by design)."""
    if (
        entry.action != "copy"
        or entry.key in plan.transforms
        or (plan.hooked is not None and entry.key in plan.hooked.computed)
        or not isinstance(target, torch.nn.Parameter)
        or target.dtype not in _DIRECT
        or entry.ckpt_dtype != str(target.dtype).removeprefix("torch.")
        or not _local(target).is_contiguous()
    ):
        return None
    assert entry.source is not None
    return reader.runs(plan.tensors[entry.source], box)


def _check_runs(
    reader: BoxReader,
    runs: list[Run],
    entry: PlanEntry,
    box: Box,
    checked: dict[str, tuple[torch.Tensor, str]],
    plan: LoadPlan,
) -> None:
    """Check the runs of ``entry`` for NaN and Inf; when a sum says they may hold some, read
    the box as a tensor into ``checked``, where they are counted exactly (or found to be an
    overflow of a sum of finite values)."""
    dtype = _local(plan.targets[entry.key]).dtype
    if not dtype.is_floating_point or all_finite(reader, runs, dtype):
        return
    assert entry.source is not None
    checked[entry.source] = (reader.read(plan.tensors[entry.source], box), entry.ckpt_dtype or "")


def _source_box(
    plan: LoadPlan,
    model: torch.nn.Module,
    entry: PlanEntry,
    box: Box,
    reader: BoxReader,
    computed: dict[str, dict[str, torch.Tensor]],
    checked: dict[str, tuple[torch.Tensor, str]],
    rank: int,
    world: int,
) -> torch.Tensor | None:
    """The checkpoint values ``entry`` needs for ``box`` (see :func:`new_value`), recording in
    ``checked`` what this rank checks."""
    dtype = entry.ckpt_dtype or ""
    if plan.hooked is not None and entry.key in plan.hooked.computed:
        root = plan.hooked.computed[entry.key].root
        if root not in computed:  # a pre-hook's value: made from whole tensors, then cut
            read = lambda key: reader.read(plan.tensors[key], full_box(plan.tensors[key].shape))  # noqa: E731
            computed[root] = compute(model, root, plan.hooked.roots[root], read)
        whole = computed[root][entry.key]
        checked[entry.key] = (whole, dtype)
        return source_for(entry, whole, box)
    if entry.action not in ("copy", "slice"):
        return None
    assert entry.source is not None and entry.ckpt_shape is not None
    leaf = plan.tensors[entry.source]
    if entry.key in plan.transforms:  # an adapter's conversion: of the whole tensor, then cut
        whole = reader.read(leaf, full_box(entry.ckpt_shape))
        checked[entry.source] = (whole, dtype)
        return source_for(entry, plan.transforms[entry.key](whole), box)
    if entry.action == "copy":
        got = reader.read(leaf, box)
        if entry.source not in checked:
            checked[entry.source] = (got, dtype)
        return got
    # a slice: this rank's part of the source is checked; the rows its box takes are read
    part = list(full_box(entry.ckpt_shape))
    part[entry.dim] = _partition(entry.ckpt_shape[entry.dim], rank, world)
    checked[entry.source] = (reader.read(leaf, tuple(part)), dtype)
    pairs = slice_pairs(entry, box)
    if not pairs:
        return None
    across = tuple((0, n) if d == entry.dim else box[d] for d, n in enumerate(entry.ckpt_shape))
    return reader.read_rows(leaf, across, entry.dim, [r for _, r in pairs])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if _is_dtensor(t) else t  # type: ignore[attr-defined]


def _write(plan: LoadPlan, values: Mapping[str, _Value], reader: BoxReader) -> None:
    """Copy into each local shard (``copy_`` under ``no_grad``: FSDP2's sharded storage, and
    parameter identity, are kept). Shapes and dtypes are checked and the files mapped: nothing
    here fails, short of a file being cut short under its map."""
    with torch.no_grad():
        for key, value in values.items():
            if isinstance(value, list):
                copy_runs(reader, value, _local(plan.targets[key]))
            else:
                _local(plan.targets[key]).copy_(value)
