"""Apply a plan, all or nothing: read and check everything first, then copy into the model."""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._init import Box, default_seed, normal_box
from ._load_hooks import compute
from ._plan import dtype_refusal, model_tensors
from ._records import DTYPE_ITEMSIZE
from ._report import LoadPlan, PlanEntry
from ._tensors import Materializer, stored_values
from .errors import CheckpointFormatError, IncompatibleCheckpointError, InvalidArgumentError

__all__ = [
    "apply_plan",
    "check_nonfinite_choice",
    "choose_seed",
    "check_writable",
    "needs_seed",
    "new_value",
    "nonfinite_keys",
    "nonfinite_refusal",
    "slice_pairs",
    "source_for",
]

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
    seed: int = 0,
) -> None:
    """Load ``plan`` into ``model``. On any error the model is left exactly as it was.

    Phase 1 views every source tensor (memory-mapped), checks its shape and values and builds the
    new head rows; nothing in the model changes. Phase 2 copies under ``no_grad`` into the existing
    tensors (``copy_``), so parameter identity, dtype and device are kept. ``targets`` is the
    model's state dict (``keep_vars=True``) when the caller already has it. A model on the meta
    device gets new tensors on ``device`` (default cpu); every one of its keys then needs a value.
    New values are drawn with ``seed`` (:func:`normal_box`).
    """
    check_nonfinite_choice(on_nonfinite)
    if targets is None:
        targets = model_tensors(model)
    on_meta = _check_meta(model, plan, targets)
    if device is not None and not on_meta:
        raise InvalidArgumentError(
            f"device={str(device)!r} is where a model on the meta device gets its tensors; this "
            "model has none on meta. Move it with model.to(device) instead"
        )
    _log_size(plan)
    materializer = Materializer(plan.sources, verify_crc=verify_checksums)
    values: dict[str, torch.Tensor] = {}
    checked: dict[str, tuple[torch.Tensor, str]] = {}  # checkpoint key → (tensor read, dtype)
    computed: dict[str, dict[str, torch.Tensor]] = {}  # pre-hooked subtree → values it made
    buffers: dict[str, torch.Tensor] = {}  # checkpoint key → the model buffer it goes into
    misfits: list[tuple[PlanEntry, str]] = []  # values the model's dtype cannot hold
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
            checked[entry.source] = (source, entry.ckpt_dtype or "")
            if not isinstance(target, torch.nn.Parameter):
                buffers[entry.source] = target
        if source is not None and source.shape != entry.ckpt_shape:
            raise CheckpointFormatError(plan.checkpoint, f"tensor {entry.source!r} changed shape")
        if source is not None and entry.key in plan.transforms:  # a conversion the plan chose
            source = plan.transforms[entry.key](source)
        if source is not None:
            source = source_for(entry, source)
        values[entry.key], misfit = new_value(entry, target.dtype, seed, source=source)
        if values[entry.key].shape != target.shape:  # writing must not be able to fail
            raise InvalidArgumentError(
                f"{entry.transform or entry.action} gave shape {list(values[entry.key].shape)} "
                f"for {entry.key!r}, not {list(target.shape)}; this is a bug in smartload or in "
                f"the {plan.adapter} adapter. Nothing was loaded"
            )
        if misfit is not None:
            misfits.append((entry, misfit))
    if on_nonfinite == "error" and (nonfinite := nonfinite_keys(checked, buffers)):
        raise nonfinite_refusal(plan.checkpoint, nonfinite)
    if misfits:
        raise dtype_refusal("values that the model's dtype cannot hold", misfits, plan.checkpoint)
    if plan.format == "mapping":  # tensors in memory: the model's own, or on another device
        _take_apart(values, targets)
    check_writable(targets, values)
    meta_device = torch.device(device or "cpu") if on_meta else None
    _write(model, plan.loaders, targets, values, meta_device)


def check_nonfinite_choice(on_nonfinite: str) -> None:
    if on_nonfinite not in NONFINITE_CHOICES:
        raise InvalidArgumentError(
            f"on_nonfinite must be one of {', '.join(NONFINITE_CHOICES)}, not {on_nonfinite!r}"
        )


def nonfinite_refusal(checkpoint: str, nonfinite: list[str]) -> CheckpointFormatError:
    return CheckpointFormatError(
        checkpoint,
        f"non-finite values in {len(nonfinite)} tensor(s): {', '.join(nonfinite[:10])}"
        + (" ..." if len(nonfinite) > 10 else ""),
        "Nothing was loaded. The weights are broken (diverged training?); pass "
        "on_nonfinite='allow' to load them anyway, or policies={key: 'reinit-normal'}",
    )


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
    custom = plan.loaders
    owned = sorted({o for k, t in targets.items() if id(t) in meta and (o := _owner(k)) in custom})
    if owned:
        raise InvalidArgumentError(
            f"module(s) {', '.join(owned[:5])} load through their own _load_from_state_dict and "
            "are on the meta device: smartload cannot run that loader while it creates their "
            "tensors. Nothing was loaded. Call model.to_empty(device=...) first, then load"
        )
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


def _write(
    model: torch.nn.Module,
    loaders: Mapping[str, torch.nn.Module],
    targets: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
    meta_device: torch.device | None,
) -> None:
    """Phase 2: every value already has its target's shape, and its dtype or one the copy
    casts into it exactly (no value can be lost, nothing can fail). Warnings are recorded and
    logged afterwards, so that a ``-W error`` filter cannot raise one half-way through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if meta_device is not None:
            _materialise(model, loaders, targets, values, meta_device)
        else:
            _commit(loaders, targets, values)
    for warning in caught:
        logger.warning("while loading: %s: %s", warning.category.__name__, warning.message)


def _materialise(
    model: torch.nn.Module,
    loaders: Mapping[str, torch.nn.Module],
    targets: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
    device: torch.device,
) -> None:
    """Give a model on the meta device new tensors (like ``load_state_dict(assign=True)``:
    parameter type and ``requires_grad`` kept), in the model's dtypes, on ``device``. Tensors
    shared under several names stay shared. Tensors not on meta are copied into as usual, first:
    a module's own loader may refuse, and the meta tensors are replaced only after that."""
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
    _commit(loaders, targets, plain)
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            _replace_in(slots, made)


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


def nonfinite_keys(
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

    A large tensor is checked through :func:`stored_values`: a view that claims 2**43 elements
    over one stored float costs one read, not 2**43 (NaN and Inf are then counted among the
    values stored). Small ones cost little whatever they claim.
    """
    suspects: list[str] = []
    small: dict[str, tuple[list[str], list[torch.Tensor]]] = {}
    for key, (t, dtype) in tensors.items():
        kind = _FLOAT_KINDS.get(dtype)
        numel = t.numel()
        if kind is None or numel == 0:
            continue
        if numel >= _BATCH_BELOW:
            t = stored_values(t)
        if kind == "upcast":  # float8, complex32: no sum, no norm, no isfinite
            if not _finite_by_chunks(t):
                suspects.append(key)
        elif kind == "real" and t.is_cpu and numel < _BATCH_BELOW:
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
        t, dtype = tensors[key]
        stored = _comparable(stored_values(t), dtype)
        nan = int(torch.isnan(stored).sum())
        inf = int(torch.isinf(stored).sum())
        if not nan and key in buffers and _inf_by_design(t, dtype, buffers[key]):
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


def _inf_by_design(value: torch.Tensor, dtype: str, model_value: torch.Tensor) -> bool:
    """Whether ``value``'s infinities all stand where the model's own value is infinite too.
    Read element by element only when it has the model tensor's shape (so its size)."""
    if model_value.is_meta:
        return True
    if value.shape != model_value.shape or not (
        model_value.is_floating_point() or model_value.is_complex()
    ):
        return False
    value = _comparable(value, dtype)
    return not bool((torch.isinf(value) & torch.isfinite(model_value).to(value.device)).any())


def _comparable(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t`` in a dtype that ``isnan``/``isinf`` accept (float8 and complex32 upcast)."""
    return t.to(_upcast_dtype(t)) if _FLOAT_KINDS[dtype] == "upcast" else t


def _upcast_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.complex64 if t.is_complex() else torch.float32


def _finite_by_chunks(t: torch.Tensor) -> bool:
    flat, dtype = t.reshape(-1), _upcast_dtype(t)
    return all(
        bool(torch.isfinite(flat[i : i + _CHUNK].to(dtype).sum()))
        for i in range(0, len(flat), _CHUNK)
    )


def new_value(
    entry: PlanEntry,
    target_dtype: torch.dtype,
    seed: int,
    *,
    box: Box | None = None,
    source: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str | None]:
    """The value ``entry`` writes into ``box`` of its key (default: all of it), in the target's
    dtype (or the checkpoint's, where the copy casts exactly); or what keeps the checkpoint's
    values from fitting (then nothing is written). ``source`` is, for a copy, the checkpoint's
    box; for a slice, the checkpoint rows of :func:`slice_pairs` in their order (``box`` across
    the other dimensions). New values come from :func:`normal_box` with ``seed``."""
    box = box if box is not None else tuple((0, n) for n in entry.model_shape)
    if entry.action == "copy":
        assert source is not None
        if source.dtype == target_dtype or entry.cast == "exact":
            return source, None  # an exact cast (fp16 → fp32) is made by the copy itself
        return _fit(source, target_dtype)
    exact = target_dtype.is_floating_point or target_dtype.is_complex
    dtype = target_dtype if exact else torch.float32
    if entry.fill is not None:
        new = torch.full([b - a for a, b in box], entry.fill, dtype=dtype)
    else:
        new = normal_box(entry.key, entry.model_shape, box, entry.std, seed, dtype)
    pairs = slice_pairs(entry, box)
    if pairs and source is not None:
        rows, misfit = _fit(source, dtype)
        if misfit is not None:
            return new, misfit
        new.index_copy_(entry.dim, torch.tensor([i for i, _ in pairs]), rows)
    return (new, None) if exact else _fit(new, target_dtype)


def slice_pairs(entry: PlanEntry, box: Box) -> list[tuple[int, int]]:
    """For a slice, ``(row in box, checkpoint row)`` for each row of ``box`` (along the entry's
    dimension) that takes a checkpoint row."""
    if entry.action != "slice" or entry.rows is None:
        return []
    first, last = box[entry.dim]
    return [(i - first, r) for i, r in enumerate(entry.rows[first:last], first) if r is not None]


def source_for(
    entry: PlanEntry, whole: torch.Tensor, box: Box | None = None
) -> torch.Tensor | None:
    """What :func:`new_value` takes for ``box`` (default: all of the key) from the whole
    checkpoint tensor: its box for a copy, the rows a slice keeps (None if it keeps none)."""
    box = box if box is not None else tuple((0, n) for n in entry.model_shape)
    if entry.action != "slice":
        return whole[tuple(slice(a, b) for a, b in box)]
    pairs = slice_pairs(entry, box)
    if not pairs:
        return None
    rows = whole.index_select(entry.dim, torch.tensor([r for _, r in pairs], dtype=torch.long))
    across = (slice(None) if d == entry.dim else slice(a, b) for d, (a, b) in enumerate(box))
    return rows[tuple(across)]


def choose_seed(plan: LoadPlan, init_seed: int | None) -> int:
    """``init_seed``, or one number drawn from torch's default generator when the plan draws
    new values (0 when it draws none: the generator is left alone)."""
    if init_seed is not None:
        return init_seed
    return default_seed() if needs_seed(plan) else 0


def needs_seed(plan: LoadPlan) -> bool:
    """Whether applying ``plan`` draws new values (then it needs a seed)."""
    return any(
        e.fill is None
        and (e.action == "reinit-normal" or (e.action == "slice" and None in (e.rows or (None,))))
        for e in plan.entries
    )


def _commit(
    custom: Mapping[str, torch.nn.Module],
    targets: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
) -> None:
    """Copy ``values`` (already in their targets' dtypes and shapes) into the model. Modules with
    their own loading go first, one snapshot each: when one refuses, the ones before it are put
    back and the refusal raised with the model as it was (``custom``: those modules, by name,
    as the plan found them). The rest cannot fail: one copy."""
    routed: dict[str, dict[str, torch.Tensor]] = {}
    plain: Mapping[str, torch.Tensor] = values
    if custom:
        rest: dict[str, torch.Tensor] = {}
        for key, value in values.items():
            owner = _owner(key)
            if owner in custom:
                routed.setdefault(owner, {})[key] = value
            else:
                rest[key] = value
        plain = rest
    destinations = [targets[key] for key in plain]
    sources = list(plain.values())
    with torch.no_grad():
        _load_custom(custom, routed)
        if destinations and all(d.is_cpu for d in destinations):  # one call, not one per key
            torch._foreach_copy_(destinations, sources)
        else:  # a model on an accelerator: copy_ moves each tensor there
            for destination, source in zip(destinations, sources, strict=True):
                destination.copy_(source)


def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def _load_custom(
    custom: Mapping[str, torch.nn.Module], routed: Mapping[str, dict[str, torch.Tensor]]
) -> None:
    """Run each module's own ``_load_from_state_dict`` over its keys. A refusal (an error it
    reports, or an exception) puts back every module loaded so far, itself included."""
    loaded: list[_Snapshot] = []
    for owner, state in routed.items():
        module = custom[owner]
        try:
            loaded.append(_snapshot(module))
            problem = _run_loader(module, owner, state)
        except Exception as exc:  # a module's own code: anything may come out of it
            problem = f"failed: {type(exc).__name__}: {exc}"
        if problem is not None:
            for snapshot in reversed(loaded):
                _restore(snapshot)
            raise CheckpointFormatError(
                "<model>",
                f"module {owner!r} {problem}",
                "Nothing was loaded (modules loaded before it were put back)",
            )


def _run_loader(module: torch.nn.Module, owner: str, state: dict[str, torch.Tensor]) -> str | None:
    errors: list[str] = []
    prefix = owner + "." if owner else ""
    # Versioned loaders (FrozenBatchNorm ...) see the module's own version, as state_dict()
    # would record it: the values are loaded as if this code had saved them.
    local = {"version": module._version}
    module._load_from_state_dict(state, prefix, local, False, [], [], errors)
    return f"refused: {errors[0]}" if errors else None


@dataclass(frozen=True)
class _Snapshot:
    """A module as its own loader found it: its parameter and buffer slots, each tensor with an
    alias of what it was (``.data``: storage, offset, shape, strides) and a copy of its values,
    and its extra state when it has some (as ``get_extra_state`` returned it)."""

    module: torch.nn.Module
    parameters: dict[str, Any]
    buffers: dict[str, Any]
    tensors: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]
    extra: tuple[Any, ...]


def _snapshot(module: torch.nn.Module) -> _Snapshot:
    slots = [*module._parameters.values(), *module._buffers.values()]
    tensors = tuple((t, t.data, t.detach().clone()) for t in slots if t is not None)
    custom_extra = type(module).set_extra_state is not torch.nn.Module.set_extra_state
    extra = (module.get_extra_state(),) if custom_extra else ()
    return _Snapshot(module, dict(module._parameters), dict(module._buffers), tensors, extra)


def _restore(snapshot: _Snapshot) -> None:
    module = snapshot.module
    for slots, saved in (
        (module._parameters, snapshot.parameters),
        (module._buffers, snapshot.buffers),
    ):
        slots.clear()
        slots.update(saved)
    for tensor, alias, values in snapshot.tensors:
        tensor.data = alias  # shape, strides, storage as they were (a loader may resize)
        alias.copy_(values)
    if snapshot.extra:
        try:
            module.set_extra_state(snapshot.extra[0])
        except Exception as exc:  # the refusal being raised says more than this
            logger.warning(
                "could not put back the extra state of %s: %s", type(module).__name__, exc
            )


# --------------------------------------------------------------------------------------------------
# lossy casts, made in phase 1: writing is then a copy that cannot lose a value or fail
# (exact casts, fp16 → fp32, are left to the copy: a phase-1 copy would double the memory)


def _fit(value: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, str | None]:
    """``value`` cast to ``dtype``, or what keeps its values from fitting: numbers beyond the
    dtype's range (torch would wrap, saturate or overflow to Inf) or NaN/Inf into integers. The
    plan has refused the casts torch cannot make, and complex → real ones no policy asked for."""
    if value.is_complex() and not dtype.is_complex:
        value = value.real  # a policy asked for it: the real part, as load_state_dict keeps
    misfit = _misfit(value, dtype)
    if misfit is not None:
        return value, misfit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental" and the like
        return value.to(dtype), None


def _misfit(value: torch.Tensor, dtype: torch.dtype) -> str | None:
    if dtype is torch.bool or value.numel() == 0:  # anything is True or False
        return None
    into_int = not (dtype.is_floating_point or dtype.is_complex)
    from_float = value.is_floating_point() or value.is_complex()
    (low, high), (src_low, src_high) = _limits(dtype), _limits(value.dtype)
    if low <= src_low and src_high <= high and not (into_int and from_float):
        return None  # every value of the source dtype fits
    lo, hi = _bounds(value, finite=not into_int)
    name = str(dtype).removeprefix("torch.")
    if into_int and not (math.isfinite(lo) and math.isfinite(hi)):
        return f"NaN or Inf cannot be stored in {name}"
    if from_float and into_int:  # truncated toward zero: 127.9 still fits int8
        fits = low - 1 < lo and hi < high + 1
    else:
        fits = low <= lo and hi <= high
    if fits:
        return None
    return f"values from {lo:g} to {hi:g}, beyond {name}'s range [{low:g}, {high:g}]"


@functools.cache
def _limits(dtype: torch.dtype) -> tuple[float, float]:
    """The smallest and largest value ``dtype`` holds (a complex one: per part)."""
    if dtype is torch.bool:
        return (0, 1)
    if dtype.is_floating_point or dtype.is_complex:
        info = torch.finfo(dtype)
        return (float(info.min), float(info.max))
    iinfo = torch.iinfo(dtype)
    return (iinfo.min, iinfo.max)


# dtypes torch.aminmax takes; the others are read in chunks through a wider dtype
_REDUCIBLE = frozenset(
    (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8)
    + (torch.int8, torch.int16, torch.int32, torch.int64)
)
_BOUNDS_CHUNK = 1 << 24  # elements upcast at a time


def _bounds(t: torch.Tensor, *, finite: bool) -> tuple[float, float]:
    """The smallest and largest value in ``t`` (NaN when it holds a NaN); only of its finite
    values when ``finite`` (NaN and Inf are then the non-finite check's business)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype is torch.uint64:  # read as int64: values from 2**63 on come out negative
        lo, hi = _bounds(t.view(torch.int64), finite=finite)
        return (0, 2**64 - 1) if lo < 0 else (lo, hi)
    if t.dtype in _REDUCIBLE:
        parts = [_reduce(t, finite)]
    else:
        wider = torch.float32 if t.is_floating_point() else torch.int64
        flat = t.reshape(-1)
        parts = [
            _reduce(flat[i : i + _BOUNDS_CHUNK].to(wider), finite)
            for i in range(0, flat.numel(), _BOUNDS_CHUNK)
        ]
    found = [p for p in parts if p is not None]
    if not found:  # no finite value at all
        return (0, 0)
    if any(math.isnan(lo) or math.isnan(hi) for lo, hi in found):
        return (math.nan, math.nan)
    return min(lo for lo, _ in found), max(hi for _, hi in found)


def _reduce(t: torch.Tensor, finite: bool) -> tuple[float, float] | None:
    low, high = torch.aminmax(t)
    lo, hi = low.item(), high.item()
    if finite and not (math.isfinite(lo) and math.isfinite(hi)):
        kept = t[torch.isfinite(t)]  # only with NaN or Inf in the checkpoint, allowed
        return _reduce(kept, False) if kept.numel() else None
    return lo, hi


def _take_apart(values: dict[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> None:
    """Make every value of an in-memory checkpoint a plain source for its copy: moved to the cpu
    for a cpu target, and cloned where it views the model's own memory (a shuffled state dict of
    the model: one copy would change what another reads, or torch refuses it half-way)."""
    memory = {t.untyped_storage().data_ptr() for t in targets.values() if _has_memory(t)}
    for key, value in values.items():
        target = targets[key]
        if target.is_cpu and not value.is_cpu:
            values[key] = value.cpu()
        elif _has_memory(value) and value.untyped_storage().data_ptr() in memory:
            same = (value.data_ptr(), value.stride()) == (target.data_ptr(), target.stride())
            if not same:
                values[key] = value.clone()


def _has_memory(t: torch.Tensor) -> bool:
    return not t.is_meta and t.numel() > 0


def check_writable(targets: Mapping[str, torch.Tensor], keys: Iterable[str]) -> None:
    """Refuse, before writing, model tensors a copy into would fail on half-way through."""
    inference = torch.is_inference_mode_enabled()
    bad = []
    for key in keys:
        t = targets[key]
        if t.is_meta:
            continue
        if t.is_inference() and not inference:
            bad.append(f"{key} (an inference tensor: the model was built under inference_mode)")
        elif torch._debug_has_internal_overlap(t) == 1:
            bad.append(f"{key} (its elements share memory, as an expanded tensor's do)")
    if bad:
        raise InvalidArgumentError(
            f"cannot write into {len(bad)} model tensor(s): {'; '.join(bad[:10])}"
            + (" ..." if len(bad) > 10 else "")
            + ". Nothing was loaded. Build the model outside torch.inference_mode(), with "
            "tensors of their own (clone() expanded buffers), then load"
        )
