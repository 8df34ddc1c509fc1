"""Apply a plan, all or nothing: read and check everything first, then copy into the model."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from ._load_hooks import compute
from ._plan import model_tensors
from ._records import DTYPE_ITEMSIZE
from ._report import LoadPlan, PlanEntry
from ._tensors import Materializer
from .errors import CheckpointFormatError, IncompatibleCheckpointError, InvalidArgumentError

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
    device: str | torch.device | None = None,
) -> None:
    """Load ``plan`` into ``model``. On any error the model is left exactly as it was.

    Phase 1 views every source tensor (memory-mapped), checks its shape and values and builds the
    new head rows; nothing in the model changes. Phase 2 copies under ``no_grad`` into the existing
    tensors (``copy_``), so parameter identity, dtype and device are kept. ``targets`` is the
    model's state dict (``keep_vars=True``) when the caller already has it. A model on the meta
    device gets new tensors on ``device`` (default cpu); every one of its keys then needs a value.
    """
    if on_nonfinite not in NONFINITE_CHOICES:
        raise InvalidArgumentError(
            f"on_nonfinite must be one of {', '.join(NONFINITE_CHOICES)}, not {on_nonfinite!r}"
        )
    if targets is None:
        targets = model_tensors(model)
    on_meta = _check_meta(model, plan, targets)
    _log_size(plan)
    materializer = Materializer(plan.sources, verify_crc=verify_checksums)
    values: dict[str, torch.Tensor] = {}
    checked: dict[str, tuple[torch.Tensor, str]] = {}  # checkpoint key → (tensor read, dtype)
    computed: dict[str, dict[str, torch.Tensor]] = {}  # pre-hooked subtree → values it made
    buffers: dict[str, torch.Tensor] = {}  # checkpoint key → the model buffer it goes into
    for entry in plan.entries:
        if entry.action == "skip":
            continue
        target = targets.get(entry.key)
        if target is None or target.shape != entry.model_shape:
            raise InvalidArgumentError(
                f"the model changed after the plan was made (key {entry.key!r}); plan again"
            )
        source = None
        if plan.hooked is not None and entry.key in plan.hooked.computed:
            source = _computed(model, plan, entry.key, materializer, computed)
            checked[entry.key] = (source, entry.ckpt_dtype or "")
        elif entry.action in ("copy", "slice"):
            assert entry.source is not None
            source = materializer.tensor(plan.tensors[entry.source])
            if source.shape != entry.ckpt_shape:
                raise CheckpointFormatError(
                    plan.checkpoint, f"tensor {entry.source!r} changed shape"
                )
            checked[entry.source] = (source, entry.ckpt_dtype or "")
            if not isinstance(target, torch.nn.Parameter):
                buffers[entry.source] = target
            if entry.key in plan.transforms:  # an adapter's conversion
                source = plan.transforms[entry.key](source)
                if source.shape != entry.model_shape:
                    raise InvalidArgumentError(
                        f"{entry.transform} gave shape {list(source.shape)} for {entry.key!r}, "
                        f"not {list(entry.model_shape)}; this is a bug in the {plan.adapter} adapter"
                    )
        values[entry.key] = _value(entry, source, target)
    if on_nonfinite == "error" and (nonfinite := _nonfinite(checked, buffers)):
        raise CheckpointFormatError(
            plan.checkpoint,
            f"non-finite values in {len(nonfinite)} tensor(s): {', '.join(nonfinite[:10])}"
            + (" ..." if len(nonfinite) > 10 else ""),
            "Nothing was loaded. The weights are broken (diverged training?); pass "
            "on_nonfinite='allow' to load them anyway, or policies={key: 'reinit-normal'}",
        )
    if on_meta:
        _materialise(model, targets, values, torch.device(device or "cpu"))
    else:
        _commit(model, targets, values)


def _check_meta(
    model: torch.nn.Module, plan: LoadPlan, targets: Mapping[str, torch.Tensor]
) -> bool:
    """Whether the model has tensors on the meta device (then every one needs a value)."""
    meta = {id(t) for t in targets.values() if t.is_meta}
    if not meta:
        return False
    given = {id(targets[e.key]) for e in plan.entries if e.action != "skip"}  # tied: one value
    empty = [
        (e.key, e.ckpt_shape, e.model_shape)
        for e in plan.entries
        if id(targets[e.key]) in meta and id(targets[e.key]) not in given
    ]
    empty += [
        (name, None, tuple(b.shape))
        for name, b in model.named_buffers()
        if b.is_meta and name not in targets  # non-persistent: no checkpoint has them
    ]
    if empty:
        raise IncompatibleCheckpointError(
            empty,
            "The model is on the meta device and nothing can give these keys a value (absent "
            "from the checkpoint, or skipped). Nothing was loaded. Pass "
            "policies={key: 'reinit-normal'} for the learned ones, or build the model with "
            "model.to_empty(device=...) and initialise it before loading",
            plan.checkpoint,
        )
    return True


def _materialise(
    model: torch.nn.Module,
    targets: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
    device: torch.device,
) -> None:
    """Give a model on the meta device new tensors (``load_state_dict(assign=True)`` semantics:
    parameter type and ``requires_grad`` kept), in the model's dtypes, on ``device``. Tensors
    shared under several names stay shared. Tensors not on meta are copied into as usual."""
    made: dict[int, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in values.items():
            target = targets[key]
            if not target.is_meta:
                plain[key] = value
                continue
            new = made.get(id(target))
            if new is None:
                data = torch.empty(target.shape, dtype=target.dtype, device=device).copy_(value)
                if isinstance(target, torch.nn.Parameter):
                    data = torch.nn.Parameter(data, requires_grad=target.requires_grad)
                new = made[id(target)] = data
        for module in model.modules():
            for slots in (module._parameters, module._buffers):
                _replace_in(slots, made)
    _commit(model, targets, plain)


def _replace_in(slots: dict[str, Any], made: Mapping[int, torch.Tensor]) -> None:
    for name, tensor in slots.items():
        if tensor is not None and id(tensor) in made:
            slots[name] = made[id(tensor)]


def _computed(
    model: torch.nn.Module,
    plan: LoadPlan,
    key: str,
    materializer: Materializer,
    done: dict[str, dict[str, torch.Tensor]],
) -> torch.Tensor:
    """The value a load pre-hook computes for ``key``, from the real tensors (once per subtree)."""
    root = plan.hooked.computed[key].root
    if root not in done:
        read = materializer.tensor_of(plan.tensors)
        done[root] = compute(model, root, plan.hooked.roots[root], read)
    return done[root][key]


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


def _nonfinite(
    tensors: Mapping[str, tuple[torch.Tensor, str]], buffers: Mapping[str, torch.Tensor]
) -> list[str]:
    """``"key (3 NaN, 1 Inf)"`` for each floating tensor holding NaN or Inf, except infinities by
    design: a buffer (not a learned parameter) whose ±Inf stand where the model's own value is
    non-finite too (clip bounds, masks), or whose model value is not known yet (meta device).

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
        if not nan and key in buffers and _inf_by_design(t, buffers[key]):
            continue
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


def _inf_by_design(value: torch.Tensor, model_value: torch.Tensor) -> bool:
    if model_value.is_meta:
        return True
    if value.shape != model_value.shape or not (
        model_value.is_floating_point() or model_value.is_complex()
    ):
        return False
    return not bool((torch.isinf(value) & torch.isfinite(model_value).to(value.device)).any())


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
    """Modules whose loading must go through their own ``_load_from_state_dict``, and those with
    extra state (a copy into what ``get_extra_state`` returned would be lost). Load pre-hooks
    are not run here: the plan already ran them (``_load_hooks``).

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
    }
