"""The diff: checkpoint keys and shapes vs a model's state dict → a :class:`LoadPlan`. Pure.

Defaults (design.md, "Policies"): equal shapes → copy; missing from the checkpoint → skip; a
class-count head whose class dimension differs → slice with a class map, else reinit-normal; any
other mismatch → :class:`IncompatibleCheckpointError`, unless the adapter says the key keeps the
model's own initialisation (``Adapter.keep_initialised``: a YOLO class branch whose width follows
the class count), and then the rest of that key's head does too. User policies (globs) override.
"""

from __future__ import annotations

import fnmatch
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ._formats import RawCheckpoint, read
from ._heads import HeadRule, class_map_by_names, resolve_class_map, source_rows
from ._load_hooks import HookedKeys, module_roles, translate
from ._module_tree import ModuleTree
from ._normalize import choose_state_dict, describe_extras, leaf_dtype, leaf_shape, match_keys
from ._rename_hint import rename_hint
from ._replaced import module_notes
from ._report import ACTIONS, HeadChange, LoadPlan, PlanEntry
from ._tensors import Materializer
from ._unpickler import inert_globals
from .adapters import Adapter, Conversion, select_adapter
from .errors import CheckpointFormatError, IncompatibleCheckpointError, InvalidArgumentError

__all__ = ["dtype_refusal", "make_plan", "model_tensors"]

_FLOAT8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
_EXACT_CASTS = {
    "float16": {"float32", "float64", "complex32", "complex64", "complex128"},
    "bfloat16": {"float32", "float64", "complex64", "complex128"},
    "float32": {"float64", "complex64", "complex128"},
    "float64": {"complex128"},
    "complex32": {"complex64", "complex128"},
    "complex64": {"complex128"},
    **dict.fromkeys(_FLOAT8, {"float16", "bfloat16", "float32", "float64"}),
    "float8_e8m0fnu": {"bfloat16", "float32", "float64"},
    "int8": {"int16", "int32", "int64", "float16", "float32", "float64"},
    "uint8": {"uint16", "uint32", "uint64", "int16", "int32", "int64", "float16", "float32",
              "float64"},
    "int16": {"int32", "int64", "float32", "float64"},
    "uint16": {"uint32", "uint64", "int32", "int64", "float32", "float64"},
    "int32": {"int64", "float64"},
    "uint32": {"uint64", "int64", "float64"},
    "bool": {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
             "float16", "bfloat16", "float32", "float64"},
}  # fmt: skip
# dtypes torch has no conversion for (its copy_ kernels refuse them): only equal dtypes load
_NO_CONVERSION = frozenset({"bits8", "bits16", "bits1x8", "bits2x4", "bits4x2", "float4_e2m1fn_x2"})


def cast_kind(src: str, dst: str) -> str | None:
    """None when the dtypes are equal, else ``"exact"`` (every value survives) or ``"lossy"``
    (values may round, or be truncated to integers). Whether a lossy cast's values fit the
    model's dtype at all is checked when loading, before anything is written."""
    if src == dst:
        return None
    return "exact" if dst in _EXACT_CASTS.get(src, ()) else "lossy"


def cast_refusal(src: str, dst: str) -> str | None:
    """Why a checkpoint tensor of dtype ``src`` is not cast into a model tensor of ``dst``, or
    None. A complex → real cast is refused unless a policy names the key (``copy``/``slice``):
    ``load_state_dict`` keeps the real part and only warns, and a complex checkpoint for a real
    model is far more often the wrong file than a wish to drop the imaginary part."""
    if src == dst:
        return None
    if src in _NO_CONVERSION or dst in _NO_CONVERSION:
        return f"torch has no conversion from {src} to {dst}"
    if src.startswith("complex") and not dst.startswith("complex"):
        return _COMPLEX_TO_REAL
    return None


_COMPLEX_TO_REAL = "a complex → real cast discards the imaginary part"


_SCALAR = Conversion("one element → 0-d (as load_state_dict)", lambda t: t.reshape(()))


@dataclass(frozen=True)
class _Checkpoint:
    path: str
    format: str
    state_dict_path: tuple[str, ...]
    tensors: Mapping[str, Any]
    sources: Mapping[str, Any]
    ema: bool
    others: tuple[tuple[str, ...], ...]
    extras: Mapping[str, str]
    inert: tuple[str, ...]
    module: ModuleTree | None  # a whole-model pickle's modules (inert records)


def open_checkpoint(
    checkpoint: Any,
    *,
    ema: bool = False,
    state_dict_path: Sequence[str] | None = None,
    allow_globals: Sequence[str] = (),
) -> _Checkpoint:
    """read + choose the state dict. ``checkpoint`` is a path or an in-memory mapping."""
    if isinstance(checkpoint, Mapping):
        raw = RawCheckpoint("<mapping>", "mapping", checkpoint)
    elif isinstance(checkpoint, str | os.PathLike):
        raw = read(checkpoint, allow_globals=allow_globals)
    else:
        raise InvalidArgumentError(
            f"checkpoint must be a path or a mapping of names to tensors, not {type(checkpoint).__name__}"
        )
    choice = choose_state_dict(raw.path, raw.tree, ema=ema, state_dict_path=state_dict_path)
    extras = describe_extras(raw.tree, (choice.path, *choice.others))
    return _Checkpoint(
        raw.path,
        raw.format,
        choice.path,
        choice.tensors,
        raw.sources,
        choice.ema,
        choice.others,
        extras,
        () if raw.format == "dcp" else tuple(inert_globals(raw.globals)),  # DCP: builders only
        choice.module,
    )


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as the tensors themselves (parameters and buffers, not copies).

    Walks the modules directly, as ``state_dict`` does but without its per-module hook machinery
    (twice as fast at 10,000 modules); any module that customises its state dict (an override of
    ``state_dict``/``_save_to_state_dict``/``get_extra_state``, or state-dict hooks) sends the
    whole model through ``state_dict(keep_vars=True)`` instead.
    """
    out: dict[str, torch.Tensor] = {}
    if _collect_tensors(model, "", out):
        return out
    return {
        k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)
    }


_BASE = torch.nn.Module
_R = TypeVar("_R", PlanEntry, HeadChange)


def _collect_tensors(module: torch.nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> bool:
    cls = type(module)
    if (
        cls._save_to_state_dict is not _BASE._save_to_state_dict
        or cls.state_dict is not _BASE.state_dict
        or cls.get_extra_state is not _BASE.get_extra_state
        or module._state_dict_hooks
        or module._state_dict_pre_hooks
        or "state_dict" in module.__dict__  # overridden on the instance
        or "_save_to_state_dict" in module.__dict__
    ):
        return False
    for name, param in module._parameters.items():
        if param is not None:
            out[prefix + name] = param
    skip = module._non_persistent_buffers_set
    for name, buf in module._buffers.items():
        if buf is not None and name not in skip:
            out[prefix + name] = buf
    return all(
        _collect_tensors(child, f"{prefix}{name}.", out)
        for name, child in module._modules.items()
        if child is not None
    )


def _first_policy(compiled: list[tuple[str, str]], key: str) -> tuple[str, str] | None:
    return next(((p, a) for p, a in compiled if fnmatch.fnmatchcase(key, p)), None)


@functools.cache  # once per dtype, not once per key
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compile_policies(policies: Mapping[str, str] | None) -> list[tuple[str, str]]:
    if not policies:
        return []
    out = []
    for pattern, action in policies.items():
        if action not in ACTIONS:
            raise InvalidArgumentError(
                f"policy {pattern!r}: unknown action {action!r}; use one of {', '.join(ACTIONS)}"
            )
        out.append((pattern, action))
    return out


@dataclass
class _Context:
    """What every key's decision needs besides the key itself."""

    model: torch.nn.Module
    adapter: Adapter
    class_map: Any
    source_classes: Sequence[str] | None
    unmatched: tuple[str, ...]
    heads: dict[str, HeadChange] = field(default_factory=dict)
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)


def make_plan(
    model: torch.nn.Module,
    checkpoint: Any,
    *,
    num_classes: int | None = None,
    class_map: Any = None,
    policies: Mapping[str, str] | None = None,
    ema: bool = False,
    rename: Any = None,
    state_dict_path: Sequence[str] | None = None,
    source_classes: Sequence[str] | str | None = None,
    target_classes: Sequence[str] | None = None,
    adapter: Adapter | None = None,
    allow_globals: Sequence[str] = (),
) -> LoadPlan:
    ckpt = open_checkpoint(
        checkpoint, ema=ema, state_dict_path=state_dict_path, allow_globals=allow_globals
    )
    model_sd = model_tensors(model)  # kept in the plan: apply copies into these same tensors
    if lazy := [k for k, t in model_sd.items() if torch.nn.parameter.is_lazy(t)]:
        raise InvalidArgumentError(
            f"the model has uninitialized (lazy) parameters: {', '.join(lazy[:5])}"
            + (" ..." if len(lazy) > 5 else "")
            + "; run one forward pass with a sample input so that they get their shapes, "
            "then load"
        )
    if num_classes is None and target_classes is not None:
        num_classes = len(target_classes)  # the names say how many classes the model has
    chosen = select_adapter(model, adapter)
    # A framework adapter knows its heads; the generic guess (the last Linear) needs num_classes.
    rules = chosen.head_rules(model) if num_classes is not None or chosen.knows_heads else []
    if num_classes is not None:
        _check_num_classes(model, chosen, num_classes)
    notes = list(chosen.notes)
    if ckpt.module is not None:
        notes.append(
            f"weights extracted from a pickled {ckpt.module.root.qualname} ({ckpt.module.modules} "
            "modules): no class of it was imported and nothing in the file was executed"
        )
        if ckpt.module.hooked:
            notes.append(_hooks_note(ckpt.module.hooked))
    if isinstance(source_classes, str):
        source_classes = _label_set(chosen, source_classes)
    elif source_classes is None and _names_needed(class_map, target_classes):
        source_classes = ckpt.module.class_names if ckpt.module is not None else None
        if source_classes is not None:
            notes.append(
                f"checkpoint class names ({len(source_classes)}) read from the pickled model's "
                "names attribute"
            )
    unmatched: tuple[str, ...] = ()
    if class_map is None and source_classes is not None and target_classes is not None:
        class_map = class_map_by_names(source_classes, target_classes)
        unmatched = tuple(n for n, c in zip(target_classes, class_map, strict=True) if c is None)
    compiled = _compile_policies(policies)
    ctx = _Context(model, chosen, class_map, source_classes, unmatched)
    tensors: Mapping[str, Any] = ckpt.tensors
    originals: Mapping[str, str] = {}  # prepared key → the key in the file
    prepared = _prepare(chosen, model, tensors, ckpt)
    if prepared is not None:
        tensors, originals = prepared

    matched = match_keys(tensors, model_sd, rename)
    roles = module_roles(model)
    read = Materializer(ckpt.sources).tensor_of(tensors)
    hooked = translate(roles.hooked, matched, tensors, read, in_file=originals)
    feeds: dict[str, str] = {}  # model key → checkpoint key
    unused: list[str] = []
    for ckpt_key, model_key in matched.items():
        if hooked is not None:
            if ckpt_key in hooked.hooks and ckpt_key not in hooked.renamed:
                continue  # taken by a pre-hook into a value it computed
            model_key = hooked.renamed.get(ckpt_key, model_key)
        if model_key in model_sd and model_key not in feeds:
            feeds[model_key] = ckpt_key
        else:
            unused.append(ckpt_key)

    entries: list[PlanEntry] = []
    abandoned: dict[str, str] = {}  # head → why one of its keys keeps the model's values
    mismatches: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]] = []
    for key, param in model_sd.items():
        source = feeds.get(key)
        leaf = tensors[source] if source is not None else None
        made = hooked.computed.get(key) if hooked is not None else None
        if made is not None:
            source, leaf = (made.inputs[0] if made.inputs else None), made.value
        policy = _first_policy(compiled, key) if compiled else None
        rule = next((r for r in rules if r.matches(key)), None) if rules else None
        model_shape = tuple(param.shape)
        ckpt_shape = leaf_shape(leaf) if leaf is not None else None
        if (
            rule is None
            and num_classes is not None
            and ckpt_shape is not None
            and _differs_in_dim0_only(ckpt_shape, model_shape)
            and model_shape[0] == num_classes
        ):
            rule = HeadRule(name=key.rpartition(".")[0], keys=(key,))
        entry = _decide(ctx, key, param, model_shape, source, leaf, ckpt_shape, policy, rule)
        if entry is None and policy is None and ckpt_shape is not None:
            entry = _keep_initialised(ctx, key, param, model_shape, source, ckpt_shape, leaf)
            if entry is not None and rule is not None:
                abandoned[rule.name] = entry.reason
        if entry is not None and hooked is not None:
            entry = _hooked_entry(entry, hooked, made)
        if entry is not None and source is not None and source in originals:
            entry = _replace(entry, source=originals[source])
        if entry is None:
            mismatches.append((key, ckpt_shape, model_shape))
        else:
            entries.append(entry)
    if mismatches:
        raise IncompatibleCheckpointError(mismatches, _mismatch_hint(num_classes), ckpt.path)
    if abandoned:
        entries = _abandon_heads(ctx, entries, abandoned, compiled)
    entries = _check_casts(entries, compiled, ckpt.path)
    notes.extend(_unused_class_map(ctx))
    if num_classes is not None and not ctx.heads and chosen.num_classes(model) is None:
        notes.append(
            f"num_classes={num_classes} not checked: no class head of this model was found"
        )
    if on_meta := sum(t.is_meta for t in model_sd.values()):
        notes.append(
            f"{on_meta} model tensor(s) on the meta device: load() gives them new tensors "
            "(device=..., default cpu)"
        )
    entries = _note_tied(model_sd, entries)
    hint = rename_hint(
        {e.key: e.model_shape for e in entries if e.action == "skip" and e.reason == "missing"},
        {k: leaf_shape(tensors[k]) for k in unused},
        {ckpt_key: model_key for model_key, ckpt_key in feeds.items()},
    )
    if hint is not None:  # said first: it explains the rest
        notes.insert(0, hint.note())
    unused_keys = tuple(sorted(originals.get(k, k) for k in unused))
    notes.extend(module_notes(model, entries, unused_keys, ckpt.module))
    return LoadPlan(
        checkpoint=ckpt.path,
        format=ckpt.format,
        state_dict_path=ckpt.state_dict_path,
        entries=tuple(entries),
        unused=unused_keys,
        heads=tuple(ctx.heads.values()),
        ema=ckpt.ema,
        other_state_dicts=ckpt.others,
        extras=dict(ckpt.extras),
        inert_globals=ckpt.inert,
        adapter=chosen.name,
        notes=tuple(notes),
        rename_hint=hint,
        tensors={originals.get(k, k): v for k, v in tensors.items()},
        sources=ckpt.sources,
        transforms=ctx.transforms,
        targets=model_sd,
        hooked=hooked,
        loaders=roles.loaders,
    )


def _prepare(
    adapter: Adapter, model: torch.nn.Module, tensors: Mapping[str, Any], ckpt: _Checkpoint
) -> tuple[Mapping[str, Any], Mapping[str, str]] | None:
    """The adapter's renaming; its refusals of the file (raised without a path) name the file."""
    try:
        return adapter.prepare_checkpoint(model, tensors, ckpt.extras)
    except CheckpointFormatError as exc:
        if exc.path:
            raise
        raise CheckpointFormatError(ckpt.path, exc.problem, exc.hint) from exc


def _unused_class_map(ctx: _Context) -> list[str]:
    """A class map that no head followed is said, never dropped without a word."""
    if ctx.class_map is None or any(h.class_map is not None for h in ctx.heads.values()):
        return []
    changed = [h.name for h in ctx.heads.values()]
    why = (
        f"the heads that changed ({', '.join(changed)}) do not hold one row per class"
        if changed
        else f"no class head of this model was found by the {ctx.adapter.name} adapter"
    )
    return [f"class_map not used: {why}"]


def _hooked_entry(entry: PlanEntry, hooked: HookedKeys, made: Any) -> PlanEntry:
    """Say what a load pre-hook did to the key (renamed it, or computed its value)."""
    if made is not None:
        if entry.action != "copy":
            return entry
        inputs = ", ".join(made.inputs) or "the checkpoint"
        return _replace(
            entry, reason=f"computed by {made.hooks} from {inputs}", transform="load pre-hook"
        )
    if entry.source is not None and entry.source in hooked.renamed:
        return _replace(
            entry,
            reason=f"{entry.reason}; renamed from {entry.source} by {hooked.hooks[entry.source]}",
            transform="load pre-hook",
        )
    return entry


def _hooks_note(hooked: Sequence[str]) -> str:
    shown = ", ".join(hooked[:5]) + (f" and {len(hooked) - 5} more" if len(hooked) > 5 else "")
    return (
        f"modules with state-dict hooks, not run: {shown}; their keys are the raw parameters "
        "and buffers, which the model's own state_dict() may rename or add to"
    )


def _names_needed(class_map: Any, target_classes: Sequence[str] | None) -> bool:
    """Whether the plan needs the checkpoint's class names (target names, or a map by name)."""
    if target_classes is not None:
        return True
    if class_map is None:
        return False
    listed = class_map.values() if isinstance(class_map, Mapping) else class_map
    return any(isinstance(old, str) for old in listed)


def _label_set(adapter: Adapter, label_set: str) -> list[str]:
    names = adapter.class_names(label_set)
    if names is None:
        raise InvalidArgumentError(
            f"source_classes={label_set!r} is not a label set the {adapter.name} adapter knows; "
            "pass the checkpoint's class names as a list"
        )
    return names


def _differs_in_dim0_only(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) >= 1 and a[0] != b[0] and a[1:] == b[1:]


def _check_num_classes(model: torch.nn.Module, adapter: Adapter, num_classes: int) -> None:
    if type(num_classes) is not int or num_classes < 0:
        raise InvalidArgumentError(
            f"num_classes must be an int >= 0 (0: no classifier, as timm), not {num_classes!r}"
        )
    actual = adapter.num_classes(model)
    if actual is not None and actual != num_classes:
        raise IncompatibleCheckpointError(
            [],
            f"num_classes={num_classes}, but the model's head has {actual} classes "
            f"({adapter.name} adapter). Build the model with {num_classes} classes "
            f"(e.g. timm.create_model(name, num_classes={num_classes})) before loading, "
            "or drop num_classes to keep the model as it is",
        )


def _mismatch_hint(num_classes: int | None) -> str:
    choose = "pass policies={'<key or glob>': 'reinit-normal' | 'skip' | 'slice'}"
    if num_classes is None:
        return (
            "Nothing was loaded. If these are the classifier head, pass num_classes=<the model's "
            f"class count>; to choose per key, {choose}"
        )
    return f"Nothing was loaded. To choose per key, {choose}"


def _decide(
    ctx: _Context,
    key: str,
    param: torch.Tensor,
    model_shape: tuple[int, ...],
    source: str | None,
    leaf: Any,
    ckpt_shape: tuple[int, ...] | None,
    policy: tuple[str, str] | None,
    rule: HeadRule | None,
) -> PlanEntry | None:
    """The entry for one model key, or None when no policy can place it (a mismatch)."""
    model_dtype = _dtype_name(param.dtype)
    numel = param.numel()
    ckpt_dtype = leaf_dtype(leaf) if leaf is not None else None
    if policy is None and rule is None and ckpt_dtype is not None and ckpt_shape == model_shape:
        # the common case (all but the heads), spelled out: this runs once per key
        return PlanEntry(
            key,
            "copy",
            source,
            ckpt_shape,
            model_shape,
            "same shape",
            ckpt_dtype,
            model_dtype,
            cast_kind(ckpt_dtype, model_dtype),
            numel,
            fill=0.0 if key.endswith("bias") else None,
        )
    std = rule.std if rule else 0.01
    fill = (rule.bias if rule else 0.0) if key.endswith("bias") else None
    base: dict[str, Any] = {
        "key": key,
        "source": source,
        "ckpt_shape": ckpt_shape,
        "model_shape": model_shape,
        "ckpt_dtype": ckpt_dtype,
        "model_dtype": model_dtype,
        "head": rule.name if rule else None,
        "std": std,
        "fill": fill,
    }
    # only entries that read the checkpoint (copy, slice) have a cast
    cast = cast_kind(ckpt_dtype, model_dtype) if ckpt_dtype else None
    action = policy[1] if policy else None
    by_policy = f"policy {policy[0]!r}" if policy else ""

    if action == "skip" or (action is None and leaf is None):
        return PlanEntry(action="skip", reason=by_policy or "missing", **base)
    if action == "reinit-normal":
        return PlanEntry(action="reinit-normal", reason=by_policy, **base)
    if leaf is None:  # copy/slice asked for a key the checkpoint lacks
        return None
    assert ckpt_shape is not None
    same = ckpt_shape == model_shape
    follows_map = rule is not None and rule.label_space == "classes"
    head_change = rule is not None and (not same or (follows_map and ctx.class_map is not None))
    if action == "copy" or (action is None and not head_change):
        if same:
            return PlanEntry(
                action="copy", reason=by_policy or "same shape", reused=numel, cast=cast, **base
            )
        conversion = ctx.adapter.convert(ctx.model, key, ckpt_shape, model_shape)
        if conversion is None and ckpt_shape == (1,) and model_shape == ():
            conversion = _SCALAR  # torch loads a one-element vector into a 0-d tensor
        if conversion is None:
            return None
        ctx.transforms[key] = conversion.fn
        return PlanEntry(
            action="copy",
            reason=conversion.reason,
            reused=numel,
            transform=conversion.reason,
            cast=cast,
            **base,
        )
    # slice or reinit of a head (or an explicit slice policy)
    if rule is None:
        if not (ckpt_shape and _differs_in_dim0_only(ckpt_shape, model_shape)) and not same:
            return None
        rule = HeadRule(name=key.rpartition(".")[0], keys=(key,))
        base["head"] = rule.name
    dim = 0 if len(model_shape) == 1 else rule.dim  # a bias holds one value per row
    if dim >= len(model_shape):  # a scalar has no rows to slice
        return None
    if len(ckpt_shape) != len(model_shape) or any(
        a != b for i, (a, b) in enumerate(zip(ckpt_shape, model_shape, strict=True)) if i != dim
    ):
        return None
    old_k = rule.num_classes(ckpt_shape[dim], checkpoint=True)
    new_k = rule.num_classes(model_shape[dim])
    if old_k is None or new_k is None:
        return None
    description = f"head {rule.name}: {old_k} → {new_k} classes"
    class_map = ctx.class_map if rule.label_space == "classes" else None
    fresh_classes = action is None and class_map is None and old_k != new_k
    classless = rule.group_lead + rule.group_trail  # rows of no class in each group: kept
    if fresh_classes and not classless:
        _record_head(ctx, rule, key, old_k, new_k, None)
        return PlanEntry(
            action="reinit-normal", reason=f"{description}, no class map", dim=dim, **base
        )
    if fresh_classes:  # the class rows are new, the rest of each group (YOLOv5's boxes) kept
        mapping: list[int | None] = [None] * new_k
        how = "(no class map: the class rows are new)"
    else:
        # Same classes in another layout (a background row to drop): keep them all, by position.
        mapping = resolve_class_map(
            class_map, new_k, old_k, source_classes=ctx.source_classes, head=rule.name
        )
        how = (
            f"by {by_policy}"
            if by_policy
            else ("by class map" if class_map is not None else "by position")
        )
    rows = source_rows(rule, old_k, new_k, mapping)
    kept = sum(r is not None for r in rows)
    _record_head(ctx, rule, key, old_k, new_k, None if fresh_classes else tuple(mapping))
    return PlanEntry(
        action="slice",
        reason=f"{description}, {kept} of {len(rows)} rows kept {how}",
        reused=numel // model_shape[dim] * kept if model_shape[dim] else 0,
        rows=tuple(rows),
        dim=dim,
        cast=cast,
        **base,
    )


def _check_casts(
    entries: list[PlanEntry], policies: list[tuple[str, str]], path: str
) -> list[PlanEntry]:
    """Refuse the casts :func:`cast_refusal` names, all at once; a complex → real cast that a
    ``copy``/``slice`` policy asks for is made (real part kept, reported as lossy)."""
    refused: list[tuple[PlanEntry, str]] = []
    out = []
    for e in entries:
        why = (
            cast_refusal(e.ckpt_dtype, e.model_dtype)
            if e.ckpt_dtype is not None and e.action in ("copy", "slice")
            else None
        )
        if why == _COMPLEX_TO_REAL and _asks_for_values(policies, e.key):
            e = _replace(e, reason=f"{e.reason}; imaginary part discarded", cast="lossy")
        elif why is not None:
            refused.append((e, why))
        out.append(e)
    if refused:
        complex_only = all(why == _COMPLEX_TO_REAL for _, why in refused)
        fix = (
            f"pass policies={{{refused[0][0].key!r}: 'copy'}} to keep only the real part (what "
            "load_state_dict does, with a warning), "
            if complex_only
            else ""
        )
        raise dtype_refusal("dtypes that cannot be cast", refused, path, fix)
    return out


def _asks_for_values(policies: list[tuple[str, str]], key: str) -> bool:
    policy = _first_policy(policies, key) if policies else None
    return policy is not None and policy[1] in ("copy", "slice")


def dtype_refusal(
    problem: str, found: list[tuple[PlanEntry, str]], path: str, fix: str = ""
) -> IncompatibleCheckpointError:
    """Keys whose values the model's dtypes cannot take (``found``: entry, why), the first ten
    shown, with what to do."""
    shown = [f"{e.key} ({e.ckpt_dtype} → {e.model_dtype}: {why})" for e, why in found[:10]]
    more = f"; and {len(found) - 10} more" if len(found) > 10 else ""
    return IncompatibleCheckpointError(
        [(e.key, e.ckpt_shape, e.model_shape) for e, _ in found],
        f"{problem}: " + "; ".join(shown) + more + ". Nothing was loaded. Build the model in "
        f"the checkpoint's dtype, {fix}or pass policies={{{found[0][0].key!r}: 'skip' | "
        "'reinit-normal'} to leave the key out",
        path,
    )


def _keep_initialised(
    ctx: _Context,
    key: str,
    param: torch.Tensor,
    model_shape: tuple[int, ...],
    source: str | None,
    ckpt_shape: tuple[int, ...],
    leaf: Any,
) -> PlanEntry | None:
    """A key no rule places that the adapter says keeps the model's own values (or None)."""
    reason = ctx.adapter.keep_initialised(ctx.model, key, ckpt_shape, model_shape)
    if reason is None:
        return None
    return PlanEntry(
        key,
        "skip",
        source,
        ckpt_shape,
        model_shape,
        reason,
        leaf_dtype(leaf),
        _dtype_name(param.dtype),
    )


def _abandon_heads(
    ctx: _Context,
    entries: list[PlanEntry],
    abandoned: Mapping[str, str],
    policies: list[tuple[str, str]],
) -> list[PlanEntry]:
    """A head is placed as one: when one of its keys keeps the model's values (its weight's
    inputs changed), so do the others (its bias), and no row comes from the checkpoint. Keys a
    user policy names keep what the policy said."""
    out = []
    for e in entries:
        reason = abandoned.get(e.head or "")
        if reason and e.action != "skip" and _first_policy(policies, e.key) is None:
            e = _replace(e, action="skip", reason=reason, reused=0, rows=None, cast=None)
        out.append(e)
    for name in abandoned:
        if name in ctx.heads:
            ctx.heads[name] = _replace(ctx.heads[name], class_map=None)
    return out


def _record_head(
    ctx: _Context,
    rule: HeadRule,
    key: str,
    old_k: int,
    new_k: int,
    mapping: tuple[int | None, ...] | None,
) -> None:
    known = ctx.heads.get(rule.name)
    keys = (*known.keys, key) if known else (key,)
    ctx.heads[rule.name] = HeadChange(rule.name, keys, old_k, new_k, mapping, ctx.unmatched)


def _note_tied(model_sd: Mapping[str, torch.Tensor], entries: list[PlanEntry]) -> list[PlanEntry]:
    """A key missing from the checkpoint but sharing storage with a loaded one is loaded through it."""
    if not any(e.action == "skip" and e.reason == "missing" for e in entries):
        return entries
    loaded: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for e in entries:
        if e.action in ("copy", "slice") and model_sd[e.key].numel():
            loaded.setdefault(_storage_id(model_sd[e.key]), e.key)
    for i, e in enumerate(entries):
        if e.action == "skip" and e.reason == "missing" and model_sd[e.key].numel():
            twin = loaded.get(_storage_id(model_sd[e.key]))
            if twin is not None:
                entries[i] = _replace(e, reason=f"missing; tied to {twin}, loaded through it")
    return entries


def _storage_id(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    if t.is_meta:  # no storage: every meta tensor's data pointer is 0
        return (id(t), 0, tuple(t.shape))
    return (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape))


def _replace(record: _R, **changes: Any) -> _R:
    from dataclasses import replace

    return replace(record, **changes)
