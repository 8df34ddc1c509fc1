"""The public verbs: :func:`load` and :func:`diff`. torch is imported on first use, not on import."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._gc import gc_paused
from ._report import JsonFile, LoadPlan, LoadReport
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

    from .adapters import Adapter

__all__ = ["diff", "load"]

logger = logging.getLogger("smartload")


def diff(
    model: torch.nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    num_classes: int | None = None,
    class_map: Sequence[int | str | None] | Mapping[int, int | str | None] | None = None,
    policies: Mapping[str, str] | None = None,
    ema: bool = False,
    rename: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    state_dict_path: Sequence[str] | None = None,
    source_classes: Sequence[str] | str | None = None,
    target_classes: Sequence[str] | None = None,
    adapter: Adapter | None = None,
    allow_globals: Sequence[str] = (),
) -> LoadPlan:
    """The plan :func:`load` would follow: one entry per model key. Touches nothing (modules the
    adapter would rebuild, as :func:`load` does, are put in place to plan and then put back).

    Raises :class:`IncompatibleCheckpointError` listing every key no policy can place.
    """
    from .adapters import select_adapter

    chosen = select_adapter(model, adapter)

    def make() -> LoadPlan:
        return _plan(
            model,
            checkpoint,
            chosen,
            num_classes=num_classes,
            class_map=class_map,
            policies=policies,
            ema=ema,
            rename=rename,
            state_dict_path=state_dict_path,
            source_classes=source_classes,
            target_classes=target_classes,
            allow_globals=allow_globals,
        )

    with gc_paused():
        return _plan_and_apply(model, chosen, make, lambda plan: None, dry_run=True)


def _plan(
    model: torch.nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    adapter: Adapter,
    *,
    num_classes: int | None,
    class_map: Sequence[int | str | None] | Mapping[int, int | str | None] | None,
    policies: Mapping[str, str] | None,
    ema: bool,
    rename: Mapping[str, str] | Sequence[tuple[str, str]] | None,
    state_dict_path: Sequence[str] | None,
    source_classes: Sequence[str] | str | None,
    target_classes: Sequence[str] | None,
    allow_globals: Sequence[str],
) -> LoadPlan:
    """One plan for the model as it is (its modules not rebuilt)."""
    from ._plan import make_plan
    from .adapters import default_classes

    # class names the framework records (transformers: config.json's and model.config's id2label)
    source_classes, target_classes, said = default_classes(
        adapter, model, checkpoint, source_classes, target_classes, class_map
    )
    with gc_paused():
        plan = make_plan(
            model,
            checkpoint,
            num_classes=num_classes,
            class_map=class_map,
            policies=policies,
            ema=ema,
            rename=rename,
            state_dict_path=state_dict_path,
            source_classes=source_classes,
            target_classes=target_classes,
            adapter=adapter,
            allow_globals=allow_globals,
        )
    return replace(plan, notes=(*said, *plan.notes)) if said else plan


def load(
    model: torch.nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    num_classes: int | None = None,
    class_map: Sequence[int | str | None] | Mapping[int, int | str | None] | None = None,
    policies: Mapping[str, str] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    ema: bool = False,
    rename: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    state_dict_path: Sequence[str] | None = None,
    source_classes: Sequence[str] | str | None = None,
    target_classes: Sequence[str] | None = None,
    adapter: Adapter | None = None,
    on_nonfinite: str = "error",
    verify_checksums: bool = False,
    allow_globals: Sequence[str] = (),
    device: str | torch.device | None = None,
    init_seed: int | None = None,
    process_group: Any = None,
) -> LoadReport:
    """Load ``checkpoint`` into ``model``, key by key, and report what was done.

    - ``num_classes``: the model's class count; class-count heads that differ from the
      checkpoint's are sliced (with ``class_map``) or re-initialised.
    - ``class_map``: for each new class, the checkpoint class (index, or name with
      ``source_classes``) whose rows it takes, or None. ``source_classes`` + ``target_classes``
      derive one by name; ``source_classes`` may name a label set the adapter knows
      (``"imagenet-1k"`` for timm models). The transformers adapter takes both by default from
      the checkpoint folder's ``config.json`` and ``model.config`` (their ``id2label``).
    - ``policies``: ``{glob over model keys: "copy" | "slice" | "reinit-normal" | "skip"}``.
    - ``ema``: load the EMA weights (``state_dict_ema``, ``model_ema`` ...) instead of the raw ones.
    - ``rename``: ``{regex: replacement}`` applied to checkpoint keys first.
    - ``on_nonfinite``: ``"error"`` (default) refuses NaN/Inf in floating tensors; ``"allow"``.
    - ``verify_checksums``: also check the zip CRC of every tensor read (the pickle's CRC is
      always checked; this costs a second pass over the data, about 0.4 s per GB).
    - ``allow_globals``: hostile-listed globals you accept outside the state dict (kept inert).
    - ``device``: where a model built on the meta device gets its tensors (default cpu). Every
      key then needs a value from the checkpoint or a ``reinit-normal`` policy; parameters keep
      their type and ``requires_grad`` (like ``load_state_dict(assign=True)``, in the
      model's dtypes).
    - ``init_seed``: new values (re-initialised keys, new head rows) depend only on
      ``(init_seed, key, position)``; None takes one number from torch's default generator, so
      ``torch.manual_seed(s)`` before the call reproduces the load.
    - ``process_group``: the group a sharded load is collective over (default: the default
      group when the model holds DTensors). Given for a model that is not sharded (DDP), it
      makes the load all or nothing across its ranks too.

    A model whose parameters are DTensors (FSDP2, tensor parallel, HSDP) is loaded
    collectively: every rank of the group calls ``load`` with the same arguments, each reads only
    what its shards need, and if any rank fails every rank raises, naming the ranks, with
    nothing loaded anywhere. The report is the same on every rank (``report.distributed``);
    rank 0 writes ``report_path``.

    All or nothing: on any error the model is unchanged. With ``dry_run`` nothing is read beyond
    the structure and the model is not touched. ``report_path`` receives the JSON report.
    """
    from .adapters import select_adapter

    chosen = select_adapter(model, adapter)

    def make() -> LoadPlan:
        return _plan(
            model,
            checkpoint,
            chosen,
            num_classes=num_classes,
            class_map=class_map,
            policies=policies,
            ema=ema,
            rename=rename,
            state_dict_path=state_dict_path,
            source_classes=source_classes,
            target_classes=target_classes,
            allow_globals=allow_globals,
        )

    if device is not None:
        _check_device(device)
    from ._sharded import collective_group

    group = collective_group(model, process_group)
    if group is not None:
        return _load_collective(
            model,
            group,
            _without_rebuilds(model, chosen, make),
            report_path=report_path,
            dry_run=dry_run,
            on_nonfinite=on_nonfinite,
            verify_checksums=verify_checksums,
            init_seed=init_seed,
            device=device,
        )
    # an unwritable report_path fails here, before the model is touched
    destination = _report_file(report_path) if report_path is not None else None

    def apply(plan: LoadPlan) -> None:
        if destination is not None:  # written now; only renamed into place once loaded
            destination.prepare(LoadReport.from_plan(plan, dry_run=dry_run).to_dict())
        if not dry_run:
            from ._apply import apply_plan, choose_seed

            seed = choose_seed(plan, init_seed)
            apply_plan(
                model,
                plan,
                on_nonfinite=on_nonfinite,
                verify_checksums=verify_checksums,
                targets=plan.targets,  # the model's tensors, as the plan found them
                device=device,
                seed=seed,
            )

    try:
        with gc_paused():
            done = _plan_and_apply(model, chosen, make, apply, dry_run)
    except BaseException:
        if destination is not None:
            destination.discard()
        raise
    report = LoadReport.from_plan(done, dry_run=dry_run)
    if destination is not None:
        destination.commit()
    logger.info("%s%s", "dry run: " if dry_run else "", report.summary_line())
    return report


def _load_collective(
    model: torch.nn.Module,
    group: Any,
    make: Callable[[], LoadPlan],
    *,
    report_path: str | os.PathLike[str] | None,
    dry_run: bool,
    on_nonfinite: str,
    verify_checksums: bool,
    init_seed: int | None,
    device: str | torch.device | None,
) -> LoadReport:
    """:func:`load` across the ranks of ``group`` (see ``_sharded``); rank 0 writes the report."""
    import torch.distributed as dist

    from ._sharded import load_collective

    if device is not None:
        raise InvalidArgumentError(
            "device= is for models on the meta device; a sharded model's shards stay where "
            "they are. Call model.to_empty(device=...) after sharding, then load"
        )
    destination: list[JsonFile] = []  # rank 0's, made while planning: a failure is agreed on

    def plan() -> LoadPlan:
        if report_path is not None and dist.get_rank(group) == 0 and not destination:
            destination.append(_report_file(report_path))
        return make()

    try:
        with gc_paused():
            done, spread = load_collective(
                model,
                group,
                plan,
                dry_run=dry_run,
                on_nonfinite=on_nonfinite,
                verify_checksums=verify_checksums,
                init_seed=init_seed,
            )
    except BaseException:
        for file in destination:
            file.discard()
        raise
    report = replace(LoadReport.from_plan(done, dry_run=dry_run), distributed=spread)
    for file in destination:  # every rank has loaded: a report that cannot be written is said
        try:
            file.write(report.to_dict())
        except OSError as exc:
            logger.error(
                "loaded on every rank, but the report could not be written to %s: %s",
                report_path,
                exc.strerror or exc,
            )
    logger.info("%s%s", "dry run: " if dry_run else "", report.summary_line())
    return report


def _without_rebuilds(
    model: torch.nn.Module, adapter: Adapter, make: Callable[[], LoadPlan]
) -> Callable[[], LoadPlan]:
    """``make``, refusing a plan for which the adapter would rebuild modules (a sharded model's
    modules cannot be swapped for unsharded ones)."""

    def checked() -> LoadPlan:
        plan = make()
        rebuilt = adapter.rebuild_modules(model, plan)
        if rebuilt:
            raise InvalidArgumentError(
                f"the {adapter.name} adapter would rebuild {', '.join(sorted(rebuilt)[:4])} at the "
                "checkpoint's shapes, which a sharded model cannot take. Nothing was loaded on "
                "any rank. Load the unsharded model, then shard it"
            )
        return plan

    return checked


def _plan_and_apply(
    model: torch.nn.Module,
    adapter: Adapter,
    make: Callable[[], LoadPlan],
    apply: Callable[[LoadPlan], None],
    dry_run: bool,
) -> LoadPlan:
    """Plan, let the adapter rebuild modules its framework's loading would replace (then plan
    again with them in place), and apply. On any error, and on a dry run, the model keeps its
    own modules."""
    first = make()
    rebuilt = adapter.rebuild_modules(model, first)
    if not rebuilt:
        apply(first)
        return first
    previous: dict[str, torch.nn.Module] = {}
    try:
        _swap_modules(model, rebuilt, previous)  # filled as it goes: undone on any error
        again = make()
        again = replace(again, notes=(*again.notes, _rebuilt_note(adapter, rebuilt, dry_run)))
        apply(again)
    except BaseException:
        _swap_modules(model, previous)
        raise
    if dry_run:
        _swap_modules(model, previous)
    return again


def _check_device(device: str | torch.device) -> None:
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"device={device!r} cannot hold tensors here ({exc})") from None


def _report_file(path: str | os.PathLike[str]) -> JsonFile:
    try:
        return JsonFile(path)
    except OSError as exc:
        raise InvalidArgumentError(
            f"report_path {os.fspath(path)!r} cannot be written ({exc.strerror or exc}); "
            "nothing was loaded"
        ) from None


def _swap_modules(
    model: torch.nn.Module,
    modules: Mapping[str, torch.nn.Module],
    previous: dict[str, torch.nn.Module] | None = None,
) -> dict[str, torch.nn.Module]:
    """Put ``modules`` in place by dotted name; returns the ones they replaced (in ``previous``
    as they are replaced, so that a failure half-way can be undone)."""
    previous = {} if previous is None else previous
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        previous[name] = owner.get_submodule(child)
        setattr(owner, child, module)
    return previous


def _rebuilt_note(adapter: Adapter, rebuilt: Mapping[str, Any], dry_run: bool) -> str:
    done = "would be rebuilt (dry run)" if dry_run else "rebuilt"
    return (
        f"{len(rebuilt)} module(s) {done} at the checkpoint's shapes by the {adapter.name} "
        "adapter, as the framework's own loading does: new objects, so build the optimizer "
        f"after loading ({', '.join(sorted(rebuilt)[:4])}{' ...' if len(rebuilt) > 4 else ''})"
    )
