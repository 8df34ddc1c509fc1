"""Whole-model pickles: a state dict from a tree of inert module stand-ins. No torch import.

``torch.save(model)`` (and every YOLO ``.pt``) pickles an ``nn.Module`` as ``NEWOBJ(cls)`` followed by
``BUILD(module.__dict__)``. The restricted unpickler turns that into a :class:`StandIn` of the class
(never imported) whose recorded state holds ``_parameters`` and ``_buffers`` (tensor records) and
``_modules`` (more stand-ins). :func:`extract` walks that tree the way ``nn.Module.state_dict`` walks
a live model (parameters, persistent buffers, then children, depth first) and returns the same
dotted keys (``model.22.cv3.0.2.weight``), plus a :class:`ModuleTree` summary for ``inspect``.

Inside the parts it reads, only what torch writes is accepted: modules restored from their state
(one ``BUILD``, never called), tensors or None in the parameter and buffer slots, sets of names for
the non-persistent buffers. Anything else is refused with :class:`ModuleTreeError`, naming the key
and, for a call, the global. The modules' other attributes (``args``, ``yaml``, ``names`` ...) stay
inert records: described, never built into anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from ._records import Describer, StandIn, TensorRecord, brief, is_module

__all__ = ["Budget", "ModuleTree", "ModuleTreeError", "extract"]

_MAX_DEPTH = 200  # nn.Module.state_dict recurses in Python: real models are far shallower
MAX_ENTRIES = 1_000_000  # per file: slot entries checked plus keys written (repeats included)
_MAX_KEY_CHARS = 100_000_000  # all keys together: sharing must not multiply them without bound
_SETS = ("builtins.set", "builtins.frozenset")
_ONLY_TENSORS = "not a tensor; smartload builds only tensors inside a module tree"


class ModuleTreeError(Exception):
    """A module tree smartload will not extract. ``global_name``: the callable a call in it names
    (a crafted file); ``limit``: the tree is larger than smartload extracts."""

    def __init__(self, message: str, global_name: str | None = None, limit: bool = False) -> None:
        super().__init__(message)
        self.global_name = global_name
        self.limit = limit


@dataclass(frozen=True)
class ModuleNode:
    qualname: str
    children: tuple[tuple[str, ModuleNode], ...]


@dataclass(frozen=True)
class ModuleTree:
    """What a pickled module holds, for ``inspect`` and the report. Nothing in it was executed."""

    root: ModuleNode
    modules: int  # distinct module objects
    classes: Mapping[str, int]  # class qualname → modules of that class, most common first
    attributes: Mapping[str, str]  # the root module's other attributes, described
    class_names: tuple[str, ...] | None  # the root's ``names`` (YOLO), when it is a clean list
    hooked: tuple[str, ...] = ()  # modules with state-dict hooks: torch's keys may differ

    def outline(self, depth: int = 2, width: int = 12) -> list[str]:
        """The tree's first ``depth`` levels, a line per module that has children."""
        lines: list[str] = []

        def visit(name: str, node: ModuleNode, level: int) -> None:
            shown = [f"{n} {_short(c.qualname)}" for n, c in node.children[:width]]
            more = len(node.children) - width
            label = f"{name}: " if name else ""
            lines.append(
                "  " * level
                + f"{label}{_short(node.qualname)}"
                + (
                    f" [{', '.join(shown)}{f', ... {more} more' if more > 0 else ''}]"
                    if shown
                    else ""
                )
            )
            if level + 1 < depth:
                for n, child in node.children:
                    if child.children:
                        visit(n, child, level + 1)

        visit("", self.root, 0)
        return lines

    def to_dict(self) -> dict[str, Any]:
        def node(n: ModuleNode, level: int) -> dict[str, Any]:
            out: dict[str, Any] = {"class": n.qualname}
            if n.children and level < 3:
                out["children"] = {name: node(c, level + 1) for name, c in n.children}
            elif n.children:
                out["num_children"] = len(n.children)
            return out

        return {
            "executed": False,
            "root": node(self.root, 0),
            "modules": self.modules,
            "classes": dict(self.classes),
            "attributes": dict(self.attributes),
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "modules_with_state_dict_hooks": list(self.hooked),
        }


def _short(qualname: str) -> str:
    return qualname.rpartition(".")[2]


class Budget:
    """What extracting module trees may cost, for one file (every tree in it shares it): a small
    crafted file must not make the walk take minutes or gigabytes."""

    def __init__(self) -> None:
        self.entries = 0  # slot entries checked (None included) and keys written
        self.key_chars = 0

    def spend(self, entries: int, key_chars: int = 0) -> None:
        self.entries += entries
        self.key_chars += key_chars
        if self.entries > MAX_ENTRIES:
            raise ModuleTreeError(
                f"the module tree has more than {MAX_ENTRIES:,} entries (tensors, modules, "
                "repeats of shared modules)",
                limit=True,
            )
        if self.key_chars > _MAX_KEY_CHARS:
            raise ModuleTreeError("the module tree's keys exceed 100 MB of text", limit=True)


@dataclass
class _Checked:
    """One distinct module, checked once: its own tensors and its children, in state-dict order."""

    node: ModuleNode | None
    tensors: list[tuple[str, TensorRecord]]
    children: list[tuple[str, StandIn]]


def extract(
    root: StandIn, budget: Budget | None = None
) -> tuple[dict[str, TensorRecord], ModuleTree]:
    """The state dict of a pickled module tree (keys as ``root.state_dict()`` would have them).

    Each distinct module is checked once; a module shared under several names (as torch's
    ``state_dict`` lists it) only repeats its keys. Raises :class:`ModuleTreeError`.
    """
    budget = budget or Budget()
    out: dict[str, TensorRecord] = {}
    checked: dict[int, _Checked] = {}
    classes: Counter[str] = Counter()
    hooked: list[str] = []

    def walk(module: StandIn, prefix: str, ancestors: tuple[int, ...]) -> ModuleNode:
        # ancestors: the modules from the root down to this one, itself included
        if len(ancestors) > _MAX_DEPTH + 1:
            raise ModuleTreeError(
                f"modules nested more than {_MAX_DEPTH} deep (at {brief(prefix, 80)})", limit=True
            )
        done = checked.get(id(module))
        if done is None:
            done = checked[id(module)] = _check(module, prefix, budget)
            classes[module.qualname] += 1
            if _has_hooks(module.state):
                hooked.append(prefix.removesuffix(".") or "(top)")
        budget.spend(1 + len(done.tensors), sum(len(prefix) + len(n) for n, _ in done.tensors))
        for name, tensor in done.tensors:
            key = prefix + name
            if key in out:
                raise ModuleTreeError(f"two tensors of the module tree are named {brief(key, 80)}")
            out[key] = tensor
        nodes = []
        for name, child in done.children:
            if id(child) in ancestors:
                where = brief(prefix + name, 80)
                raise ModuleTreeError(f"the module at {where} contains itself (a cycle)")
            nodes.append((name, walk(child, f"{prefix}{name}.", (*ancestors, id(child)))))
        if done.node is None:
            done.node = ModuleNode(module.qualname, tuple(nodes))
        return done.node

    tree = walk(root, "", (id(root),))
    root_state = root.state
    assert isinstance(root_state, dict)  # checked by walk
    return out, ModuleTree(
        root=tree,
        modules=len(checked),
        classes=dict(classes.most_common()),
        attributes=_attributes(root_state),
        class_names=_class_names(root_state.get("names")),
        hooked=tuple(hooked),
    )


def _check(module: StandIn, prefix: str, budget: Budget) -> _Checked:
    state = _checked_state(module, prefix)
    skip = _names_set(state.get("_non_persistent_buffers_set"), prefix)
    tensors: list[tuple[str, TensorRecord]] = []
    for slot in ("_parameters", "_buffers"):
        entries = _slot(state, slot, prefix)
        budget.spend(len(entries))
        for name, value in entries.items():
            if value is None or (slot == "_buffers" and name in skip):
                continue
            if not isinstance(value, TensorRecord):
                kind = "parameter" if slot == "_parameters" else "buffer"
                _refuse(f"the {kind} {prefix + name!r}", value, _ONLY_TENSORS)
            tensors.append((name, value))
    children = []
    modules = _slot(state, "_modules", prefix)
    budget.spend(len(modules))
    for name, child in modules.items():
        if child is None:
            continue
        if not is_module(child):
            _refuse(
                f"the submodule {prefix + name!r}", child, "not a module restored from its state"
            )
        children.append((name, child))
    return _Checked(None, tensors, children)


def _has_hooks(state: dict[Any, Any]) -> bool:
    """State-dict hooks change the keys ``state_dict()`` returns: their code is not run here."""
    return any(state.get(k) for k in ("_state_dict_hooks", "_state_dict_pre_hooks"))


def _where(prefix: str) -> str:
    return f"the module at {brief(prefix.removesuffix('.'), 80)}" if prefix else "the top module"


def _checked_state(module: StandIn, prefix: str) -> dict[Any, Any]:
    state = module.state
    if not isinstance(state, dict):  # a tuple (slot state, or for a custom __setstate__)
        raise ModuleTreeError(
            f"{_where(prefix)} ({module.qualname}) carries its state in {brief(state)}, not the "
            "plain __dict__ torch pickles; restoring it would need the class's own __setstate__"
        )
    if module.called:
        raise ModuleTreeError(
            f"{_where(prefix)} ({module.qualname}) is made by calling {module.qualname}(...), "
            "not restored from its state as torch pickles modules; smartload does not run it",
            module.qualname,
        )
    if module.builds != 1:
        raise ModuleTreeError(
            f"{_where(prefix)} ({module.qualname}) is given its state {module.builds} times "
            "(BUILD); torch pickles a module with exactly one"
        )
    for key in state:
        if not isinstance(key, str):
            raise ModuleTreeError(
                f"{_where(prefix)} has an attribute named {brief(key)}, not a str"
            )
    return state


def _slot(state: Mapping[str, Any], slot: str, prefix: str) -> dict[str, Any]:
    value = state.get(slot)
    if slot == "_buffers" and value is None:  # modules pickled by torch < 1.0 lack it: none
        return {}
    if not isinstance(value, dict):
        raise ModuleTreeError(
            f"{_where(prefix)}: {slot} is {brief(value)}, not the dict torch pickles"
        )
    for name in value:
        if not isinstance(name, str) or not name or "." in name or len(name) > 1024:
            raise ModuleTreeError(
                f"{_where(prefix)}: {slot} has the entry {brief(name)}, not an attribute name"
            )
    return value


def _names_set(value: Any, prefix: str) -> frozenset[str]:
    """``_non_persistent_buffers_set``: a set, or ``set([...])`` recorded as an inert call."""
    if value is None:
        return frozenset()
    if isinstance(value, set | frozenset):
        names: Any = value
    elif (
        isinstance(value, StandIn)
        and value.qualname in _SETS
        and value.called
        and len(value.args) <= 1
        and not value.builds
        and all(isinstance(a, list | tuple) for a in value.args)
    ):
        names = value.args[0] if value.args else ()
    else:
        _refuse(f"{_where(prefix)}: _non_persistent_buffers_set", value, "not a set of names")
    if not all(isinstance(n, str) for n in names):
        raise ModuleTreeError(f"{_where(prefix)}: _non_persistent_buffers_set holds a non-name")
    return frozenset(names)


def _refuse(what: str, value: Any, expected: str) -> NoReturn:
    """``what`` holds ``value`` where torch would have written ``expected``. A call is named as
    the global it would run: torch.save never writes one inside a module tree."""
    if isinstance(value, StandIn):
        how = "made by calling" if value.called else "an object of"
        raise ModuleTreeError(
            f"{what} is {how} {value.qualname}, {expected}",
            value.qualname if value.called else None,
        )
    raise ModuleTreeError(f"{what} is {brief(value)}, {expected}")


# torch's own bookkeeping in every module's __dict__: not worth showing
_INTERNAL = frozenset({"training", "dump_patches", "call_super_init"})


def _attributes(state: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    describe = Describer()  # attributes may share one container: walked once
    for key, value in state.items():
        if key.startswith("_") or key in _INTERNAL:
            continue
        out[key] = describe(value)
        if len(out) == 30:
            break
    return out


def _class_names(value: Any) -> tuple[str, ...] | None:
    """``names`` as YOLO keeps it: ``{0: "person", ...}`` or a list of str."""
    if isinstance(value, dict) and set(value) == set(range(len(value))):
        value = [value[i] for i in range(len(value))]
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None
