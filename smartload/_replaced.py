"""Modules that keep their initialisation because the checkpoint has another module there (or
none): one line each for the report. Pure: reads the plan's entries, never tensor data.

A model module is *fresh* when every tensor under it is missing from the checkpoint, and it is
reported at the highest such level (``model.8.m``, not each of its 11 tensors). When checkpoint
tensors under the same name went unused, the module was *replaced* (YOLOv5's C3 → C3TR swaps a
stack of bottlenecks for a transformer block); otherwise it is *new* (a pose head's keypoint
branch, loaded from a detection checkpoint). Checkpoint modules with no place in the model at all
(that keypoint branch, the other way round) are said too. Class names come from the model and,
for a whole-model pickle, from its module tree (recorded, never imported).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ._module_tree import ModuleNode, ModuleTree
    from ._report import PlanEntry

__all__ = ["module_notes"]

_LISTED = 4  # more fresh modules than this are said in one line


def module_notes(
    model: torch.nn.Module,
    entries: Sequence[PlanEntry],
    unused: Iterable[str],
    tree: ModuleTree | None = None,
) -> list[str]:
    """One line per replaced module, one for the new ones, one per checkpoint module unused.

    Linear in the keys but for sorting: keys under a module are counted by bisecting sorted
    keys, never by scanning them once per module (40,000 unused keys took 24 s that way)."""
    missing = {e.key for e in entries if e.action == "skip" and e.reason == "missing"}
    unused = sorted(unused)
    if not missing and not unused:
        return []
    size = {e.key: math.prod(e.model_shape) for e in entries}
    model_keys = sorted(size)
    fresh = _whole_modules(list(size), missing)
    from_file = [e.source for e in entries if e.source is not None]
    dropped = _whole_modules([*from_file, *unused], set(unused))
    root = tree.root if tree is not None else None
    notes: list[str] = []
    new: list[str] = []
    replaced: list[str] = []
    for name in fresh:
        keys = _under(name, model_keys)
        elements = sum(size[k] for k in keys)
        ours = f"{_model_class(model, name)}, {_tensors(len(keys))}, {elements:,} parameters"
        theirs = _count_under(name, unused, itself=False)
        if not theirs:
            new.append(f"{name} ({ours})")
            continue
        replaced.append(name)
        cls = _node_class(root, name)
        notes.append(
            f"{_where(model, root, name)}{name} ({ours}) keeps its initialisation; the "
            f"checkpoint's {name} ({f'{cls}, ' if cls else ''}{_tensors(theirs)}) is unused"
        )
    dropped = _outside(dropped, replaced)
    if len(new) == 1:
        notes.append(f"{new[0]} is not in the checkpoint: kept as initialised")
    elif new:
        more = f", ... {len(new) - _LISTED} more" if len(new) > _LISTED else ""
        notes.append(
            f"{len(new)} modules not in the checkpoint, kept as initialised: "
            f"{', '.join(new[:_LISTED])}{more}"
        )
    for name in dropped[:_LISTED]:
        cls = _node_class(root, name)
        count = _count_under(name, unused, itself=True)
        notes.append(
            f"the checkpoint's {name} ({f'{cls}, ' if cls else ''}{_tensors(count)}) has no "
            "place in the model: unused"
        )
    if len(dropped) > _LISTED:
        notes.append(f"... and {len(dropped) - _LISTED} more checkpoint modules unused")
    return notes


def _tensors(n: int) -> str:
    return f"{n} tensor{'s' if n != 1 else ''}"


def _span(name: str, ordered: Sequence[str]) -> tuple[int, int]:
    """Where the keys under module ``name`` (``name.…``) lie in ``ordered`` (sorted): after
    ``name.`` and before ``name/``, ``/`` being the character after ``.``."""
    return bisect_left(ordered, f"{name}."), bisect_left(ordered, f"{name}/")


def _count_under(name: str, ordered: Sequence[str], *, itself: bool) -> int:
    """How many keys of ``ordered`` (sorted) lie under module ``name``; with ``itself``, the key
    ``name`` counts too (a lone tensor is said as its own module)."""
    start, stop = _span(name, ordered)
    found = stop - start
    if itself:
        at = bisect_left(ordered, name)
        found += at < len(ordered) and ordered[at] == name
    return found


def _under(name: str, ordered: Sequence[str]) -> Sequence[str]:
    start, stop = _span(name, ordered)
    return ordered[start:stop] or [name]


def _outside(names: list[str], modules: Sequence[str]) -> list[str]:
    """``names`` (in their order) less those that are, or lie under, one of ``modules``."""
    ordered = sorted(names)
    inside: set[str] = set()
    for module in modules:
        start, stop = _span(module, ordered)
        inside.update(ordered[start:stop])
        inside.add(module)
    return [n for n in names if n not in inside]


def _whole_modules(keys: Sequence[str], chosen: set[str]) -> list[str]:
    """The highest module names all of whose keys are in ``chosen`` (and at least one is), in
    key order; a key alone when its module holds other keys too."""
    total: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    for key in keys:
        for prefix in _prefixes(key):
            total[prefix] += 1
            hits[prefix] += key in chosen
    out: dict[str, None] = {}  # ordered, and a lookup in constant time
    for key in keys:
        if key not in chosen:
            continue
        top = next((p for p in _prefixes(key) if hits[p] == total[p]), key)
        out.setdefault(top)
    return [name for name in out if name.rpartition(".")[0] not in out]


_MAX_DEPTH = 64  # module nesting beyond this is no model's: such a key counts as its own module


def _prefixes(key: str) -> list[str]:
    """A key's module names, outermost first (``a.b.w`` → ``a``, ``a.b``); none for a key nested
    deeper than :data:`_MAX_DEPTH` (a file's key of 160,000 ``model.`` prefixes would make
    160,000 strings of its own length)."""
    if key.count(".") >= _MAX_DEPTH:
        return []
    parts = key.split(".")[:-1]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _model_class(model: torch.nn.Module, name: str) -> str:
    try:
        return type(model.get_submodule(name)).__name__
    except AttributeError:
        return "tensor"


def _node(root: ModuleNode | None, name: str) -> ModuleNode | None:
    node = root
    for part in name.split("."):
        if node is None:
            return None
        node = dict(node.children).get(part)
    return node


def _node_class(root: ModuleNode | None, name: str) -> str:
    node = _node(root, name)
    return "" if node is None else _describe(node)


def _describe(node: ModuleNode) -> str:
    """``Bottleneck``; a container by what it holds: ``Sequential of 3 Bottleneck``."""
    short = node.qualname.rpartition(".")[2]
    if short in ("Sequential", "ModuleList") and node.children:
        kinds = Counter(c.qualname.rpartition(".")[2] for _, c in node.children)
        inside = ", ".join(f"{n} {k}" if n > 1 else k for k, n in kinds.items())
        return f"{short} of {inside}"
    return short


def _where(model: torch.nn.Module, root: ModuleNode | None, name: str) -> str:
    """``model.8 is C3TR here, C3 in the checkpoint: `` when an enclosing module's class differs."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        outer = ".".join(parts[:i])
        node = _node(root, outer)
        ours: Any = _model_class(model, outer)
        if node is not None and node.qualname.rpartition(".")[2] != ours:
            return f"{outer} is {ours} here, {_describe(node)} in the checkpoint: "
    return ""
