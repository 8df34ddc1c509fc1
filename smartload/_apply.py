"""Apply a plan, all or nothing: read and check everything first, then copy into the model."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from ._plan import model_tensors
from ._records import DTYPE_ITEMSIZE
from ._report import LoadPlan, PlanEntry
from ._tensors import Materializer
from .errors import CheckpointFormatError, InvalidArgumentError

__all__ = ["apply_plan"]

NONFINITE_CHOICES = ("error", "allow")
_LOG_ABOVE = 256 * 1024**2
logger = logging.getLogger("smartload")


def apply_plan(
    model: torch.nn.Module,
    plan: LoadPlan,
    *,
    on_nonfinite: str = "error",
    verify_checksums: bool = False,
    targets: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Load ``plan`` into ``model``. On any error the model is left exactly as it was.

    Phase 1 views every source tensor (memory-mapped), checks its shape and values and builds the
    new head rows; nothing in the model changes. Phase 2 copies under ``no_grad`` into the existing
    tensors (``copy_``), so parameter identity, dtype and device are kept. ``targets`` is the
    model's state dict (``keep_vars=True``) when the caller already has it.
    """
    if on_nonfinite not in NONFINITE_CHOICES:
        raise InvalidArgumentError(
            f"on_nonfinite must be one of {', '.join(NONFINITE_CHOICES)}, not {on_nonfinite!r}"
        )
    if targets is None:
        targets = model_tensors(model)
    _log_size(plan)
    materializer = Materializer(plan.sources, verify_crc=verify_checksums)
    values: dict[str, torch.Tensor] = {}
    checked: dict[str, tuple[torch.Tensor, str]] = {}  # checkpoint key → (tensor read, dtype)
    for entry in plan.entries:
        if entry.action == "skip":
            continue
        target = targets.get(entry.key)
        if target is None or target.shape != entry.model_shape:
            raise InvalidArgumentError(
                f"the model changed after the plan was made (key {entry.key!r}); plan again"
            )
        source = None
        if entry.action in ("copy", "slice"):
            assert entry.source is not None
            source = materializer.tensor(plan.tensors[entry.source])
            if source.shape != entry.ckpt_shape:
                raise CheckpointFormatError(
                    plan.checkpoint, f"tensor {entry.source!r} changed shape"
                )
            checked[entry.source] = (source, entry.ckpt_dtype or "")
            if entry.transform is not None:
                source = plan.transforms[entry.key](source)
                if source.shape != entry.model_shape:
                    raise InvalidArgumentError(
                        f"{entry.transform} gave shape {list(source.shape)} for {entry.key!r}, "
                        f"not {list(entry.model_shape)}; this is a bug in the {plan.adapter} adapter"
                    )
        values[entry.key] = _value(entry, source, target)
    if on_nonfinite == "error" and (nonfinite := _nonfinite(checked)):
        raise CheckpointFormatError(
            plan.checkpoint,
            f"non-finite values in {len(nonfinite)} tensor(s): {', '.join(nonfinite[:10])}"
            + (" ..." if len(nonfinite) > 10 else ""),
            "Nothing was loaded. The weights are broken (diverged training?); pass "
            "on_nonfinite='allow' to load them anyway, or policies={key: 'reinit-normal'}",
        )
    _commit(model, targets, values)


def _log_size(plan: LoadPlan) -> None:
    """Say what is about to be read when it takes noticeable time (more than ~0.1 s)."""
    reads = [e for e in plan.entries if e.action in ("copy", "slice")]
    nbytes = sum(
        math.prod(e.ckpt_shape or ()) * DTYPE_ITEMSIZE.get(e.ckpt_dtype or "", 4) for e in reads
    )
    if nbytes >= _LOG_ABOVE:
        logger.info(
            "reading and checking %d tensors (%.2f GB) from %s",
            len(reads),
            nbytes / 1024**3,
            plan.checkpoint,
        )


_BATCH_BELOW = 1 << 16  # elements: smaller tensors are checked together, one call per dtype
_CHUNK = 1 << 24  # elements upcast at a time for dtypes torch cannot reduce (float8)


def _nonfinite(tensors: Mapping[str, tuple[torch.Tensor, str]]) -> list[str]:
    """``"key (3 NaN, 1 Inf)"`` for each floating tensor holding NaN or Inf.

    One read per tensor and no allocation: a NaN or Inf makes a sum non-finite, and a finite sum
    proves every value finite (a non-finite one may be an overflow: those are counted exactly).
    Small tensors go through one ``_foreach_norm(inf)`` call per dtype instead of a call each (the
    largest absolute value cannot overflow), which matters at 20,000 keys. The dtype comes from
    the checkpoint's record: asking the tensor costs a torch call per key.
    """
    suspects: list[str] = []
    small: dict[str, tuple[list[str], list[torch.Tensor]]] = {}
    for key, (t, dtype) in tensors.items():
        kind = _FLOAT_KINDS.get(dtype)
        if kind is None or t.numel() == 0:
            continue
        if kind == "upcast":  # float8, complex32: no sum, no norm, no isfinite
            if not _finite_by_chunks(t):
                suspects.append(key)
        elif kind == "real" and t.is_cpu and t.numel() < _BATCH_BELOW:
            keys, group = small.setdefault(dtype, ([], []))
            keys.append(key)
            group.append(t)
        elif not bool(torch.isfinite(t.sum())):
            suspects.append(key)
    for keys, group in small.values():
        finite = torch.isfinite(torch.stack(torch._foreach_norm(group, float("inf"))))
        if not bool(finite.all()):
            suspects.extend(k for k, ok in zip(keys, finite.tolist(), strict=True) if not ok)
    if not suspects:
        return []
    order = {key: i for i, key in enumerate(tensors)}  # report in the checkpoint's order
    out = []
    for key in sorted(suspects, key=order.__getitem__):
        t = tensors[key][0]
        if _FLOAT_KINDS[tensors[key][1]] == "upcast":
            t = t.to(_upcast_dtype(t))
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        if nan or inf:
            counts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
            out.append(f"{key} ({', '.join(counts)})")
    return out


_FLOAT_KINDS = {
    **dict.fromkeys(("float64", "float32", "float16", "bfloat16"), "real"),
    **dict.fromkeys(("complex64", "complex128"), "complex"),
    **dict.fromkeys(
        "complex32 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu".split(),
        "upcast",
    ),
}


def _upcast_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.complex64 if t.is_complex() else torch.float32


def _finite_by_chunks(t: torch.Tensor) -> bool:
    flat, dtype = t.reshape(-1), _upcast_dtype(t)
    return all(
        bool(torch.isfinite(flat[i : i + _CHUNK].to(dtype).sum()))
        for i in range(0, len(flat), _CHUNK)
    )


def _value(entry: PlanEntry, source: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    if entry.action == "copy":
        assert source is not None
        return source
    dtype = target.dtype if target.is_floating_point() else torch.float32
    new = torch.empty(entry.model_shape, dtype=dtype)
    if entry.fill is not None:
        new.fill_(entry.fill)
    else:
        new.normal_(0.0, entry.std)
    if entry.action == "slice" and source is not None and entry.rows is not None:
        pairs = [(i, r) for i, r in enumerate(entry.rows) if r is not None]
        if pairs:
            new_idx = torch.tensor([i for i, _ in pairs])
            old_idx = torch.tensor([r for _, r in pairs])
            new.index_copy_(entry.dim, new_idx, source.index_select(entry.dim, old_idx).to(dtype))
    return new


def _commit(
    model: torch.nn.Module, targets: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
) -> None:
    custom = _custom_loaders(model)
    routed: dict[str, dict[str, torch.Tensor]] = {}
    plain: Mapping[str, torch.Tensor] = values
    if custom:
        rest: dict[str, torch.Tensor] = {}
        for key, value in values.items():
            owner = key.rpartition(".")[0]
            if owner in custom:
                routed.setdefault(owner, {})[key] = value
            else:
                rest[key] = value
        plain = rest
    destinations = [targets[key] for key in plain]
    sources = list(plain.values())
    with torch.no_grad():
        # modules with their own loading first: they are the only step here that can refuse
        for owner, state in routed.items():
            errors: list[str] = []
            prefix = owner + "." if owner else ""
            # Versioned loaders (FrozenBatchNorm ...) see the module's own version, as
            # state_dict() would record it: the values are loaded as if this code had saved them.
            local = {"version": custom[owner]._version}
            custom[owner]._load_from_state_dict(state, prefix, local, False, [], [], errors)
            if errors:
                raise CheckpointFormatError("<model>", f"module {owner!r} refused: {errors[0]}")
        if destinations and all(d.is_cpu for d in destinations):  # one call, not one per key
            torch._foreach_copy_(destinations, sources)
        else:  # a model on an accelerator: copy_ moves each tensor there
            for destination, source in zip(destinations, sources, strict=True):
                destination.copy_(source)


def _custom_loaders(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules whose loading must go through their own ``_load_from_state_dict`` or hooks, and
    those with extra state (a copy into what ``get_extra_state`` returned would be lost).

    BatchNorm's override only fills in ``num_batches_tracked`` for very old checkpoints, which a
    copy by name already handles (the key is then "missing" and keeps the model's value).
    """
    base = torch.nn.Module
    norm = torch.nn.modules.batchnorm._NormBase._load_from_state_dict
    return {
        name: m
        for name, m in model.named_modules()
        if type(m)._load_from_state_dict not in (base._load_from_state_dict, norm)
        or type(m).set_extra_state is not base.set_extra_state
        or m._load_state_dict_pre_hooks
    }
