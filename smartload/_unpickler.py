"""The restricted, default-deny unpickler. Imports neither torch nor numpy.

Every global a pickle names goes through :meth:`_Unpickler.find_class`, which never returns a real
function or class. It returns one of:

- an allowlisted *builder* (torch tensor rebuild functions, ``OrderedDict``, the numpy array set,
  ``_codecs.encode``, ``copyreg._reconstructor``): a callable object of ours that builds a *record*
  (:class:`TensorRecord`, :class:`ArrayRecord`) or a plain container, never a torch or numpy object;
  the rebuilders of tensors that are not dense numbers in a storage (quantized, sparse, nested,
  meta) are builders too, whose call is refused with what to save instead;
- a *marker* for names that are only data (storage types, CUDA ones included, dtypes);
- an inert *stand-in class* for everything else (``argparse.Namespace``, ``datetime.datetime``, a
  Lightning ``AttributeDict`` ...): calling it, ``NEWOBJ``, ``BUILD``, ``SETITEM`` and ``APPEND``
  only record what the pickle asked for;
- for ``builtins.getattr``, a builder judged by its call (:class:`_Getattr`): a method reference
  as protocols 0-3 write it, ``getattr(Detect, "forward")``, is a stand-in named
  ``module.Detect.forward``; any other call is hostile.

A pickled ``nn.Module`` (``torch.save(model)``, YOLO ``.pt`` files) comes out as a tree of such
stand-ins: ``NEWOBJ`` (or ``copyreg._reconstructor``) makes one without calling anything and
``BUILD`` records its ``__dict__``, whose ``_parameters``/``_buffers`` hold tensor records. The
stand-in remembers whether it was restored that way or called (``StandIn.called``) and how
many ``BUILD`` opcodes it took; ``_module_tree.py`` extracts a state dict from such a tree and
refuses any other construction inside it.

Since the pickle can only call what ``find_class`` returned, no code from the file can run. Globals
on the hostile list (``os.system``, ``builtins.eval``, ``importlib``, ``functools.partial`` ...)
are recorded and the whole file is refused, listing every one of them. What builders and
stand-ins make in proportion to what they are given (a snapshot of a list, a dict given by BUILD,
a string's bytes) is charged to a budget proportional to the pickle's size (:class:`_CopyBudget`),
and what can be shared is made once, so that a small file referencing one big object many times
stays small.

Two modes share this code: *symbolic* (``inspect``: array bytes are dropped, problems collected)
and *materialize* (``load``: array bytes kept, the first problem raises).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import math
import mmap
import pickle
import pickletools
import struct
from collections.abc import Callable, Iterable
from operator import mul
from typing import Any, BinaryIO, NoReturn

from ._hostile import hostile_reason, is_known_data, is_plain_data
from ._records import (
    DTYPE_ITEMSIZE,
    MAX_NDIM,
    MAX_NUMEL,
    NUMPY_CHAR_CODES,
    NUMPY_DTYPES,
    STORAGE_DTYPES,
    TORCH_DTYPE_ALIASES,
    ArrayRecord,
    Refused,
    StandIn,
    StorageRef,
    TensorRecord,
    brief,
)
from .errors import CheckpointFormatError, UnsafeCheckpointError

__all__ = [
    "Marker",
    "hostile_names",
    "inert_globals",
    "is_stand_in_class",
    "marker",
    "refuse_unsupported_tensor",
    "unknown_globals",
    "unpickle",
    "walk_names",
]

# --------------------------------------------------------------------------------------------------
# what find_class hands to the pickle machine


class _NoBuild:
    """Refuses BUILD on a global (the numpy/function ``__setstate__`` gadgets)."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        raise Refused(f"BUILD applied to the global {self.qualname}", hostile=self.qualname)


class _Builder(_NoBuild):
    """An allowlisted callable: builds a record or a container, never runs file code.

    Each builder is an instance of its own subclass whose ``__call__`` is the function itself, so
    the pickle machine calls it with no wrapper frame (it is called once per tensor).
    """

    def __call__(self, *args: Any) -> Any:  # replaced in each subclass
        raise NotImplementedError


def _builder(qualname: str, fn: Callable[..., Any]) -> _Builder:
    cls = type(f"_Builder_{fn.__name__}", (_Builder,), {"__call__": staticmethod(fn)})
    builder: _Builder = cls()
    builder.qualname = qualname
    return builder


class Marker(_NoBuild):
    """A global that is only data: a storage type, a dtype, ``torch.Tensor``."""

    def __init__(self, qualname: str, value: str) -> None:
        self.qualname = qualname
        self.value = value

    def __call__(self, *args: Any) -> Any:
        raise Refused(f"the pickle calls {self.qualname}, which is only data")


class _CopyBudget:
    """The bytes the builders and stand-ins may still materialise for one pickle.

    A pickle makes one object per opcode, or a few, so what a builder makes in a fixed size per
    call is bounded by the pickle's length already. What it makes in proportion to an argument
    (a snapshot of a list, a copy of a dict, the bytes of a string) is not: one big object
    memoized once and referenced by a million 5-byte calls would turn a small file into
    terabytes. Each builder that makes such an object charges its size here, and what can be
    shared instead (a string's latin1 bytes) is made once per object, not once per reference.
    Honest pickles copy what they hold once or twice; the budget is :data:`_BUDGET_PER_BYTE`
    bytes per byte of the pickle, plus :data:`_BUDGET_FLOOR` (set once the prescan has its size).
    """

    __slots__ = ("left", "limit")

    def __init__(self) -> None:
        self.left = self.limit = 0

    def allow(self, pickle_bytes: int) -> None:
        self.left = self.limit = _BUDGET_PER_BYTE * pickle_bytes + _BUDGET_FLOOR

    def charge(self, nbytes: int, what: str) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise Refused(
                f"{what} would materialise more than {self.limit:,} bytes ({_BUDGET_PER_BYTE} "
                f"per byte of the pickle + {_BUDGET_FLOOR >> 20} MiB): the same object is "
                "copied again and again"
            )


_BUDGET_PER_BYTE = 32
_BUDGET_FLOOR = 64 << 20
# what a copy costs, in bytes (CPython's sizes, rounded): a reference, a dict entry
_REF_BYTES = 8
_ENTRY_BYTES = 40


class _StateDict(dict):  # type: ignore[type-arg]
    """``OrderedDict`` as torch pickles it: items, plus ``_metadata`` set by BUILD."""

    _metadata: Any = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise Refused("BUILD on an OrderedDict with state other than _metadata")
        self._metadata = state.get("_metadata")


class _StandInType(type):
    """Metaclass of stand-in classes: calling one records the call."""

    qualname: str
    calls: list[str] | None  # for hostile globals: what the file would have run, described
    budget: _CopyBudget

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = cls.__new__(cls)  # type: ignore[call-overload]
        what = f"calls of {cls.qualname}"
        cls.budget.charge(_REF_BYTES * len(args), what)  # before walking them
        if list in map(type, args):
            # as they were at the call: the pickle may fill a list after passing it (set(L)
            # copies L)
            cls.budget.charge(_REF_BYTES * sum(len(a) for a in args if type(a) is list), what)
            args = tuple(list(a) if type(a) is list else a for a in args)
        obj.record.args = args
        obj.record.called = True
        if cls.calls is not None and len(cls.calls) < 100:
            shown = ", ".join(brief(a, limit=200) for a in args[:6])
            cls.calls.append(f"{cls.qualname}({shown})")
        return obj


def is_stand_in_class(obj: Any) -> bool:
    """A class the file named that became an inert stand-in (not a builder, marker, hostile
    global or attribute reached through getattr)."""
    return type(obj) is _StandInType and obj.calls is None


class _StandInBuild:
    """``__setstate__`` descriptor: records state on an instance, refuses BUILD on the class."""

    def __get__(self, obj: Any, objtype: Any = None) -> Callable[[Any], None]:
        if obj is None:
            qualname = objtype.qualname

            def refuse(state: Any) -> None:
                raise Refused(f"BUILD applied to the global {qualname}", hostile=qualname)

            return refuse

        def record(state: Any) -> None:
            # a copy, as __setstate__/__dict__.update take one: changes the pickle makes to the
            # dict after BUILD do not reach the object
            if isinstance(state, dict):
                type(obj).budget.charge(
                    _ENTRY_BYTES * len(state), f"BUILDs of {obj.record.qualname}"
                )
                state = dict(state)
            obj.record.state = state
            obj.record.builds += 1

        return record


class _StandInBase(metaclass=_StandInType):
    __slots__ = ("record",)
    record: StandIn
    __setstate__ = _StandInBuild()

    def __new__(cls, *args: Any) -> Any:  # NEWOBJ
        cls.budget.charge(_REF_BYTES * len(args), f"NEWOBJs of {cls.qualname}")
        obj = object.__new__(cls)
        obj.record = StandIn(cls.qualname, args)
        return obj

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on dict subclasses
        self.record.items[key] = value

    def append(self, value: Any) -> None:  # APPEND(S) on list subclasses
        self.record.listitems.append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.record.listitems.extend(values)


class _AttributeType(_StandInType):
    """Metaclass of the stand-ins of attributes reached through ``builtins.getattr``: a method
    reference is data while it is only stored; calling it is what makes getattr an escape."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _called(cls.qualname)


class _AttributeBase(_StandInBase):
    __slots__ = ()

    def __new__(cls, *args: Any) -> Any:  # NEWOBJ, copyreg._reconstructor
        raise _called(cls.qualname)


def _called(qualname: str) -> Refused:
    return Refused(
        f"the pickle calls {qualname}, which it reached through builtins.getattr",
        hostile=_GETATTR,
    )


class _Types:
    """The stand-in classes of one pickle, by name: those ``find_class`` hands out and those of
    the attributes ``getattr`` reaches. Holds nothing that holds the unpickler (see
    :func:`_builders`)."""

    __slots__ = ("attributes", "budget", "by_name", "calls")

    def __init__(self, calls: list[str], budget: _CopyBudget) -> None:
        self.by_name: dict[str, type] = {}
        self.attributes: dict[str, type] = {}
        self.calls = calls  # for hostile globals: what the file would have run, described
        self.budget = budget

    def stand_in(self, qualname: str, hostile: bool = False) -> type:
        cls = self.by_name.get(qualname)
        if cls is None:
            cls = self.by_name[qualname] = self._new(_StandInType, _StandInBase, qualname, hostile)
        return cls

    def attribute(self, qualname: str) -> type:
        cls = self.attributes.get(qualname)
        if cls is None:
            cls = self._new(_AttributeType, _AttributeBase, qualname, False)
            self.attributes[qualname] = cls
        return cls

    def _new(self, meta: type, base: type, qualname: str, hostile: bool) -> type:
        if len(self.by_name) + len(self.attributes) >= _MAX_GLOBALS:
            raise Refused(f"more than {_MAX_GLOBALS} distinct globals")
        attrs = {
            "qualname": qualname,
            "calls": self.calls if hostile else None,
            "budget": self.budget,
            "__slots__": (),  # one object per call or NEWOBJ: no __dict__ each
        }
        cls: type = meta(qualname.rpartition(".")[2], (base,), attrs)
        return cls


class _Getattr(_NoBuild):
    """``builtins.getattr`` as find_class hands it out, judged by its call.

    Pickle protocols 0-3 cannot name a function defined in a class (yolov5's ``Segment`` keeps
    ``self.detect = Detect.forward``) and write ``getattr(Detect, "forward")`` instead. That
    call, with a global that became a stand-in and a public attribute name
    (:func:`_is_public_name`), is the attribute: an inert stand-in named ``module.Class.name``,
    judged as a global of that name (UNKNOWN for a model's class; hostile for
    ``getattr(torch.jit, "load")``, and for ``getattr(somemodule.os, "system")``: see
    :func:`_alias`), which refuses to be called. Every other call is hostile (with
    ``allow_globals=["builtins.getattr"]``, an inert record of the call). The pre-scan
    (:class:`_Names`) applies the same rule to the opcodes, and also requires the method
    reference to be kept only as a dict value or as what the pickle returns: never an argument,
    never called."""

    qualname = "builtins.getattr"

    def __init__(self, types: _Types, seen: dict[str, None], allowed: frozenset[str]) -> None:
        self.types = types
        self.seen = seen
        self.allowed = allowed

    def __call__(self, *args: Any) -> Any:
        if len(args) == 2 and _is_reference(args[0]) and _is_public_name(args[1]):
            qualname = f"{args[0].qualname}.{args[1]}"
            for name in (qualname, _alias(args[0].qualname, args[1])):
                if (reason := _hostility(name, args[1], self.allowed)) is not None:
                    raise Refused(reason, hostile=name)
            self.seen.setdefault(qualname, None)
            return self.types.attribute(qualname)
        if _GETATTR in self.allowed:  # accepted by name: an inert record, as any global
            self.seen.setdefault(_GETATTR, None)
            return self.types.stand_in(_GETATTR)(*args)
        shown = ", ".join(brief(getattr(a, "qualname", a), limit=80) for a in args[:3])
        raise Refused(
            f"getattr({shown}) is not a reference to a method of a class the pickle names",
            hostile=_GETATTR,
        )


_GETATTR = "builtins.getattr"


def _alias(qualname: str, attr: str) -> str:
    """``os.system`` for ``yolov5.utils.general.os`` and ``system``: what the attribute is when
    the global is a module imported under its own name (GLOBAL cannot name it that way, getattr
    can). A reached attribute is hostile when this name is: naming os.system through a module
    that imports os is naming os.system."""
    return f"{qualname.rpartition('.')[2]}.{attr}"


def _is_reference(obj: Any) -> bool:
    """Whether ``obj`` is a global as ``find_class`` handed it out as a stand-in (not a call's
    result, an attribute reached through getattr, or one of smartload's builders and markers:
    torch's and numpy's internals, whose methods no honest pickle references)."""
    return type(obj) is _StandInType


def _is_public_name(name: Any) -> bool:
    """An attribute name getattr may take in a method reference: a plain ASCII identifier that
    does not start with ``_``. That keeps out every dunder (``__globals__``, ``__init__``,
    ``__reduce__``, ``__subclasses__``, ``__builtins__``: the ways from an object to the
    interpreter) and the private helpers a package does not mean to be called from outside
    (``_load_from_bytes``); methods that honest pickles reference are public."""
    return type(name) is str and name.isascii() and name.isidentifier() and name[0] != "_"


# --------------------------------------------------------------------------------------------------
# the unpickler


def _no_persistent_ids(pid: Any) -> Any:
    raise Refused("a persistent id in a plain pickle (only torch files use them)")


class _Unpickler(pickle.Unpickler):
    def __init__(
        self,
        stream: BinaryIO,
        *,
        symbolic: bool,
        allow_globals: frozenset[str],
        persistent_load: Callable[[Any], Any] | None,
        encoding: str,
    ) -> None:
        super().__init__(stream, encoding=encoding, fix_imports=False)
        self.symbolic = symbolic
        self.allow_globals = allow_globals
        self.hostile: list[str] = []
        self.problems: list[str] = []
        self.globals_seen: dict[str, None] = {}
        self.calls: list[str] = []  # calls of hostile globals, described (never made)
        # set through the C unpickler's own attribute: no Python frame of ours in between
        self.persistent_load = persistent_load or _no_persistent_ids  # type: ignore[method-assign]
        self.budget = _CopyBudget()
        self._types = _Types(self.calls, self.budget)
        self._builders = _builders(symbolic, self.budget)
        self._getattr = _Getattr(self._types, self.globals_seen, allow_globals)

    # -- called by the pickle machine ---------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        qualname, name = _qualname(module, name)
        if qualname == _GETATTR:  # judged by its call: a method reference is data
            return self._getattr
        self.globals_seen.setdefault(qualname, None)
        if (reason := _hostility(qualname, name, self.allow_globals)) is not None:
            self._hostile(qualname, reason)
            return self._types.stand_in(qualname, hostile=True)
        return self._builders.get(qualname) or marker(qualname) or self._types.stand_in(qualname)

    # -- helpers ------------------------------------------------------------------------------

    def note_named(self, named: Iterable[tuple[str, str]]) -> None:
        """Judge the globals the pre-scan found the pickle naming, before anything is built, so
        that a hostile one is reported whatever else goes wrong (and wherever it sits)."""
        for qualname, reason in hostile_names(named, self.allow_globals):
            self._hostile(qualname, reason)

    def _hostile(self, qualname: str, reason: str) -> None:
        if qualname not in self.hostile:
            self.hostile.append(qualname)
            self.problems.append(f"{qualname}: {reason}")


def _qualname(module: str, name: str) -> tuple[str, str]:
    """``(module.name, name)`` under Python 3's names (``__builtin__.eval`` is builtins.eval).

    A name longer than any importable one is refused before it is copied: a file can name one
    long string thousands of times through the memo."""
    if len(module) + len(name) > _MAX_NAME:
        raise Refused(
            f"a global named by {len(module) + len(name):,} characters; no module has one"
        )
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}", name


def hostile_names(
    named: Iterable[tuple[str, str]], allowed: frozenset[str]
) -> list[tuple[str, str]]:
    """``(qualname, reason)`` of each hostile global among ``(module, name)`` pairs, once each."""
    found: dict[str, str] = {}
    for module, name in named:
        if len(module) + len(name) > _MAX_NAME:
            continue  # not importable, so not hostile; find_class refuses it as malformed
        qualname, name = _qualname(module, name)
        if qualname not in found and (reason := _hostility(qualname, name, allowed)) is not None:
            found[qualname] = reason
    return list(found.items())


def walk_names(data: Any, start: int, named: list[tuple[str, str]]) -> int:
    """Pre-scan the pickle at ``data[start:]`` (bytes or mmap), appending to ``named`` the
    ``(module, name)`` of each global it names (``("module.Class", "name")`` for an attribute
    a method reference reaches through getattr: see :class:`_Names`); returns the offset after
    its STOP. Raises :class:`Refused` or ValueError where it cannot go on (``named`` holds those
    before)."""
    return _walk(data, start, named)


def _hostility(qualname: str, name: str, allowed: frozenset[str]) -> str | None:
    """Why naming ``qualname`` makes the file hostile, or None."""
    if "." in name:
        return f"dotted global name {name!r} (attribute lookup)"
    # exact names that run nothing from the file, ahead of the hostile list: torch.cuda's
    # storage types (tensors saved from a GPU before torch 1.0) and torch.serialization.
    # _get_layout (sparse tensors, refused with a reason) sit under hostile prefixes
    if qualname in _BUILDER_NAMES or qualname in allowed or marker(qualname) is not None:
        return None
    return hostile_reason(qualname)


_MAX_TUPLE_DEPTH = 100  # CPython hashes nested tuples recursively in C: deep ones crash it
_MAX_MEMO_GAP = 1024  # memo indices grow one by one in real pickles
_MAX_GLOBALS = 10_000  # distinct globals; each becomes a class
_MAX_NAME = 1_000  # characters in module + name; Python's longest importable names are far shorter


def _prescan(stream: BinaryIO, named: list[tuple[str, str]] | None = None) -> int:
    """Walk the opcodes once, without building anything, and refuse what would hurt the C
    unpickler itself: deeply nested tuples (their hash recurses in C), memo indices far past
    the memo's size (the memo is resized to twice the index) and floods of globals. Returns the
    pickle's length in bytes; raises :class:`Refused`, or ValueError for a pickle too malformed
    to walk. Appends to ``named`` the ``(module, name)`` of every global the pickle names, as it
    goes (those before the problem, when it raises).

    The stack is simulated with one number per item: its tuple depth (0 for anything else), or
    for a string, minus the offset of its text (``STACK_GLOBAL`` takes its names from strings).
    This runs once per opcode (35 per tensor in a torch pickle), so the common opcodes have
    their own branches ahead of the table-driven general case.
    """
    start = stream.tell()
    if isinstance(stream, io.BytesIO):
        end = _walk(stream.getvalue(), start, named)
    else:
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end = _walk(data, start, named)
    stream.seek(start)
    return end - start


def _walk(data: Any, i: int, named: list[tuple[str, str]] | None = None) -> int:
    """:func:`_prescan` over a buffer, from offset ``i``; returns the offset after the STOP."""
    stack: list[int] = []
    marks: list[int] = []
    # memo index → tuple depth (or string), for the non-zero ones; an index memoized twice keeps
    # the deeper (an overestimate is safe, and real pickles never reuse an index)
    depths: dict[int, int] = {}
    names = _Names(data, named)
    filled: set[int] = set()  # memo indices set so far: MEMOIZE writes at len(filled), as C does
    globals_named = 0
    # locals: this loop runs 700,000 times for a 20,000-tensor checkpoint
    push, pop, mark, get, fill = stack.append, stack.pop, marks.append, depths.get, filled.add
    u32, ops, gap, too_deep = _U32, _OPS, _MAX_MEMO_GAP, _MAX_TUPLE_DEPTH
    limit = gap  # the largest memo index allowed now: the objects memoized so far + the gap
    try:
        while True:  # the end of the data raises IndexError
            op = data[i]
            i += 1
            if op == 0x72:  # LONG_BINPUT
                index = u32(data, i)[0]
                i += 4
                if index > limit:
                    raise Refused(
                        f"a memo index {index} far beyond the {limit - gap} objects memoized"
                    )
                top = stack[-1]
                if top and (top > get(index, 0) if top > 0 else get(index, 0) <= 0):
                    depths[index] = top  # a twice-memoized index keeps the deeper tuple
                fill(index)
                limit += 1
                continue
            if op == 0x4B:  # BININT1
                i += 1
                push(0)
                continue
            if op == 0x68:  # BINGET
                top = get(data[i], 0)
                push(top)
                i += 1
                if type(top) is _Tracked:
                    top.copies += 1
                continue
            if op == 0x28:  # MARK
                mark(len(stack))
                continue
            if op == 0x58:  # BINUNICODE
                push(-i)
                i += 4 + u32(data, i)[0]
                continue
            if op == 0x74:  # TUPLE
                at = marks.pop()
                depth = max(stack[at:], default=0)
                if type(depth) is _Ref and len(stack) - at == 2:  # (a global, ...)
                    depth = _pair(stack[at], stack[at + 1])
                else:
                    depth = depth + 1 if depth > 0 else 1
                del stack[at:]
                if depth > too_deep:
                    raise Refused(f"tuples nested more than {too_deep} deep")
                push(depth)
                continue
            if op == 0x52:  # REDUCE
                args = pop()
                stack[-1] = names.call(stack[-1], args) if type(stack[-1]) is _Tracked else 0
                continue
            if op == 0x29:  # EMPTY_TUPLE
                push(1)
                continue
            if op == 0x85:  # TUPLE1
                depth = stack[-1]
                depth = depth + 1 if depth > 0 else 1
                if depth > too_deep:
                    raise Refused(f"tuples nested more than {too_deep} deep")
                stack[-1] = depth
                continue
            if op == 0x71:  # BINPUT: an index below 256 is never far ahead
                top = stack[-1]
                if top and (top > get(data[i], 0) if top > 0 else get(data[i], 0) <= 0):
                    depths[data[i]] = top
                fill(data[i])
                i += 1
                limit += 1
                continue
            if op == 0x89 or op == 0x88:  # NEWFALSE, NEWTRUE
                push(0)
                continue
            spec = ops[op]
            if spec is None:
                raise ValueError(f"unknown opcode {op:#04x} at byte {i - 1}")
            kind, pops, pushes, argmode, size = spec
            arg = i
            if argmode == _FIXED:
                i += size
            elif argmode == _COUNTED or argmode == _COUNTED_SIGNED:
                length = int.from_bytes(
                    data[i : i + size], "little", signed=argmode == _COUNTED_SIGNED
                )
                if length < 0:
                    raise ValueError(f"negative length at byte {i}")
                i += size + length
            else:  # one or two lines
                for _ in range(argmode):
                    j = data.find(b"\n", i)
                    if j < 0:
                        raise ValueError(f"unterminated argument at byte {i}")
                    i = j + 1
            if i > len(data):
                break
            if kind == _PUSH:
                push(0)
                continue
            if kind == _TEXT:
                push(-arg)
                continue
            if kind == _STOP:
                if names.result:  # what the pickle returns is kept, as a dict's values are
                    names.stored(stack[-1:])
                return i
            if kind == _GLOBAL or op == 0x69:  # GLOBAL, STACK_GLOBAL, INST
                named_global = names.add(op, arg, i, stack)
            elif names.result and (op == 0x75 or op == 0x73 or op == 0x64):
                # SETITEMS, SETITEM, DICT: the values go into a dict
                names.stored(stack[-1:] if op == 0x73 else stack[marks[-1] + 1 :: 2])
            elif op == 0x92:  # NEWOBJ_EX
                names.keywords = True
            if op == 0x30 and marks and marks[-1] == len(stack):  # POP right after a MARK
                marks.pop()  # C drops the mark, not the item below it
                continue
            depth = 0
            if kind == _MARK:
                marks.append(len(stack))
                continue
            if kind == _TO_MARK or kind == _TUPLE_TO_MARK:
                at = marks.pop()
                if kind == _TUPLE_TO_MARK:
                    depth = max(stack[at:], default=0)
                    depth = depth + 1 if depth > 0 else 1
                del stack[at - pops :]
            elif kind == _TUPLE_N:
                depth = max(stack[-pops:])
                if type(depth) is _Ref and pops == 2:  # TUPLE2 of (a global, ...)
                    depth = _pair(stack[-2], stack[-1])
                else:
                    depth = depth + 1 if depth > 0 else 1
                del stack[-pops:]
            elif kind == _KEEP:  # DUP, READONLY_BUFFER: the top item's depth carries over
                depth = stack[-1]
                if type(depth) is _Tracked:
                    depth.copies += pushes - pops
                del stack[-pops:]
            elif pops:
                if len(stack) - pops < (marks[-1] if marks else 0):  # C's fence: the last mark
                    raise ValueError(f"stack underflow at byte {arg - 1}")
                del stack[-pops:]
            if kind == _EMPTY_TUPLE:
                depth = 1
            elif kind == _PUT:  # the top item stays where it is
                puts = limit - gap
                if argmode == _FIXED and size == 0:  # MEMOIZE: the next free slot, as C counts
                    index = len(filled)
                else:
                    index = _int_arg(data, arg, i, argmode)
                if index > limit:
                    raise Refused(f"a memo index {index} far beyond the {puts} objects memoized")
                top = stack[-1]
                if top and (top > get(index, 0) if top > 0 else get(index, 0) <= 0):
                    depths[index] = top
                fill(index)
                limit += 1
                continue
            elif kind == _GET:
                depth = get(_int_arg(data, arg, i, argmode), 0)
                if type(depth) is _Tracked:
                    depth.copies += 1
            elif kind == _GLOBAL:
                globals_named += 1
                if globals_named > _MAX_GLOBALS * 10:  # real pickles memoize repeated globals
                    raise Refused(f"more than {_MAX_GLOBALS * 10} global lookups")
                depth = named_global
            if depth > too_deep:
                raise Refused(f"tuples nested more than {too_deep} deep")
            stack.extend([depth] * pushes)
    except (IndexError, struct.error):  # past the data's end, or popping an empty stack
        raise ValueError("the pickle is truncated, or its stack or marks do not balance") from None
    finally:  # getattr, judged by all it was used for (up to where the walk stopped)
        names.finish(reput=len(filled) < limit - gap)
    raise ValueError("the pickle ends before its STOP opcode")


_U32 = struct.Struct("<I").unpack_from


class _Names:
    """The ``(module, name)`` of every global a pickle names, for :func:`_walk`: the text of
    each GLOBAL and INST, and the two strings under each STACK_GLOBAL, followed through the
    memo. Each name is cut to :data:`_NAME_CHARS` (a cut one ends in "..."), and at most
    ``10 * _MAX_GLOBALS`` are kept: the walk refuses more global lookups than that anyway.

    ``builtins.getattr`` is named only if the pickle uses it for anything but a method
    reference (see :class:`_Getattr`): the walk follows each copy of it and of what it returned
    (:class:`_Tracked`). It is data only when every copy of getattr is called (REDUCE) with a
    tuple of a global that becomes a stand-in, as GLOBAL or STACK_GLOBAL pushed it, and a
    public name (:func:`_is_public_name`); when every copy of what that returned goes into a
    dict as a value (an object's ``__dict__``) or is what the pickle returns: never called,
    never an argument; when no memo index is written twice (the walk follows the memo by
    index; C reads the last write); and when the pickle has no NEWOBJ_EX (whose dict of
    keyword arguments hands its values to a constructor: ``itertools.accumulate(...,
    func=...)`` calls it). Each such call names ``module.Class.name`` instead, judged as a
    global (and its alias, where that is hostile: see :func:`_alias`). Protocols 0-3, which
    write method references this way, have no NEWOBJ_EX and never write a memo index twice."""

    __slots__ = (
        "at", "attributes", "data", "getattr", "getattr_names", "keywords", "out", "result",
        "seen", "texts",
    )  # fmt: skip

    def __init__(self, data: Any, out: list[tuple[str, str]] | None) -> None:
        self.data = data
        self.out = out
        self.seen: set[tuple[str, str]] = set()
        self.attributes: set[tuple[str, str]] = set()  # module.Class, name: reached by getattr
        self.getattr: _Tracked | None = None  # getattr, as the walk follows it
        self.getattr_names: list[tuple[str, str]] = []  # how the pickle named it
        self.at = 0  # where in ``out`` it was first named
        # what getattr returned in method references, all counted as one (each use takes a
        # copy: the counts agree in sum only if they agree for each)
        self.result: _Tracked | None = None
        self.texts: dict[int, str | None] = {}  # attribute names, by where their text is
        self.keywords = False  # a NEWOBJ_EX seen

    def add(self, op: int, arg: int, end: int, stack: list[int]) -> int:
        """Note the global named by the opcode ``op`` whose argument spans ``arg:end``; returns
        what the opcode pushes, as the walk follows it: the global (GLOBAL, STACK_GLOBAL) or 0
        (the result of INST's call, or a global the walk does not follow)."""
        if self.out is None or len(self.seen) >= 10 * _MAX_GLOBALS + len(self.attributes):
            return 0  # (seen also holds aliases of attributes: at most one each)
        data = self.data
        if op == 0x93:  # STACK_GLOBAL: two strings on the stack, or the unpickler refuses it
            if len(stack) < 2 or stack[-1] >= 0 or stack[-2] >= 0:
                return 0
            module, name = _text_at(data, -stack[-2]), _text_at(data, -stack[-1])
            if module is None or name is None:
                return 0
        else:  # GLOBAL, INST: "module\nname\n"
            newline = data.find(b"\n", arg, end)
            if newline < 0:
                return 0
            module = _cut(bytes(data[arg : min(newline, arg + _NAME_CHARS + 1)]))
            name = _cut(bytes(data[newline + 1 : min(end - 1, newline + _NAME_CHARS + 2)]))
        pushed: int = 0
        if op != 0x69 and name.isidentifier() and all(map(str.isidentifier, module.split("."))):
            qualname = _qualname(module, name)[0]
            if qualname == _GETATTR:  # named only if it is used otherwise (see finish)
                if not self.getattr_names:
                    self.at = len(self.out)
                if (module, name) not in self.getattr_names:
                    self.getattr_names.append((module, name))
                self.getattr = self.getattr or _Tracked()
                self.getattr.copies += 1
                return self.getattr
            if qualname not in _BUILDER_NAMES and marker(qualname) is None:  # a stand-in's
                pushed = _Ref(qualname)
        self._note(module, name)
        return pushed

    def call(self, fn: _Tracked, args: int) -> int:
        """REDUCE of ``fn``, a tracked value: what it pushes, as the walk follows it."""
        if fn is self.getattr and type(args) is _Pair:
            attr = self.texts.get(args.at, "")
            if attr == "":
                attr = self.texts[args.at] = _text_at(self.data, args.at)
            if attr is not None and _is_public_name(attr) and len(self.attributes) < _MAX_GLOBALS:
                fn.uses += 1
                reached = (args.ref.qualname, attr)
                if reached not in self.attributes:
                    self.attributes.add(reached)
                    self.out.append(reached)  # type: ignore[union-attr]
                    alias = _alias(args.ref.qualname, attr)
                    if _hostility(alias, attr, frozenset()) is not None:
                        self._note(*alias.rsplit(".", 1))
                self.result = self.result or _Tracked()
                self.result.copies += 1
                return self.result
        return 0  # getattr called otherwise, or what it returned called: not counted as used

    def stored(self, values: list[int]) -> None:
        """``values`` go into a dict as its values, or are what the pickle returns."""
        for value in values:
            if value is self.result:
                self.result.uses += 1

    def finish(self, reput: bool) -> None:
        """After the walk, or where it stopped: name getattr unless every copy of it, and of
        what it returned, went where a method reference goes (``reput``: a memo index was
        written twice)."""
        if self.getattr is None or self.out is None:
            return
        used = all(t.copies == t.uses for t in (self.getattr, self.result) if t is not None)
        if used and not reput and not self.keywords:
            return
        # where the pickle first named it, so that globals are listed in the pickle's order
        new = [n for n in self.getattr_names if n not in self.seen]
        self.seen.update(new)
        self.out[self.at : self.at] = new

    def _note(self, module: str, name: str) -> None:
        if (module, name) not in self.seen:
            self.seen.add((module, name))
            self.out.append((module, name))  # type: ignore[union-attr]


class _Ref(int):
    """A global on the walk's stack: 0 (neither a tuple nor a string) that memoizes (true)."""

    qualname: str

    def __new__(cls, qualname: str) -> _Ref:
        self = int.__new__(cls, 0)
        self.qualname = qualname
        return self

    def __bool__(self) -> bool:
        return True


class _Tracked(int):
    """getattr, or what it returned, on the walk's stack: how many copies the pickle made of it
    (pushed, fetched from the memo, DUP) and how many went where they are data."""

    copies: int
    uses: int

    def __new__(cls) -> _Tracked:
        self = int.__new__(cls, 0)
        self.copies = self.uses = 0
        return self

    def __bool__(self) -> bool:
        return True


class _Pair(int):
    """A tuple of a global and a string (the text at ``at``): depth 1, as any flat tuple."""

    ref: _Ref
    at: int

    def __new__(cls, ref: _Ref, at: int) -> _Pair:
        self = int.__new__(cls, 1)
        self.ref = ref
        self.at = at
        return self


def _pair(first: int, second: int) -> int:
    """The depth of a 2-tuple whose first item is a global: a :class:`_Pair` with a string."""
    if second < 0 and type(first) is _Ref and type(second) is int:
        return _Pair(first, -second)
    return 1


_NAME_CHARS = 160  # longer than any real module path or name
_TEXT_OPS = ("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
             "SHORT_BINUNICODE", "BINUNICODE8")  # fmt: skip


def _cut(raw: bytes, encoding: str = "utf-8") -> str:
    """Text of a name, at most :data:`_NAME_CHARS` characters ("..." marks a cut)."""
    raw = raw[: _NAME_CHARS + 1]
    if encoding == "raw-unicode-escape":  # the C function: a codec lookup would import
        text = codecs.raw_unicode_escape_decode(raw, "replace")[0]
    else:
        text = raw.decode(encoding, "replace")
    return text if len(text) <= _NAME_CHARS else text[:_NAME_CHARS] + "..."


def _text_at(data: Any, at: int) -> str | None:
    """The string pushed by the opcode whose argument starts at ``at``, or None if unreadable."""
    op = data[at - 1]
    if op in _COUNTED_TEXT:
        size, encoding = _COUNTED_TEXT[op]
        length = int.from_bytes(data[at : at + size], "little", signed=op == 0x54)
        start = at + size
        return _cut(bytes(data[start : start + min(max(length, 0), _NAME_CHARS + 1)]), encoding)
    end = data.find(b"\n", at, at + 4 * _NAME_CHARS)  # UNICODE, STRING: a line (maybe cut)
    line = bytes(data[at : end if end >= 0 else at + 4 * _NAME_CHARS])
    if op == 0x56:
        return _cut(line, "raw-unicode-escape")
    quote = line[:1]
    if quote not in (b"'", b'"'):
        return None
    inner = line[1:-1] if len(line) >= 2 and line.endswith(quote) else line[1:]
    try:
        return _cut(codecs.escape_decode(inner)[0], "latin-1")
    except ValueError:
        return None


# opcode → (bytes of its length, encoding): BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, then
# Python 2's str (BINSTRING, SHORT_BINSTRING), which smartload decodes as latin-1 or ASCII
_COUNTED_TEXT = {
    0x58: (4, "utf-8"), 0x8C: (1, "utf-8"), 0x8D: (8, "utf-8"),
    0x54: (4, "latin-1"), 0x55: (1, "latin-1"),
}  # fmt: skip


def _int_arg(data: Any, start: int, end: int, argmode: int) -> int:
    """A memo index: a text line (PUT, GET) or a little-endian binary number."""
    raw = data[start:end]
    return int(raw) if argmode == _LINE else int.from_bytes(raw, "little")


(
    _PUSH,
    _TEXT,
    _MARK,
    _TO_MARK,
    _TUPLE_TO_MARK,
    _TUPLE_N,
    _KEEP,
    _EMPTY_TUPLE,
    _PUT,
    _GET,
    _GLOBAL,
    _STOP,
    _OTHER,
) = range(13)
# how an opcode's argument is laid out (_LINE and _LINE2 are also the number of lines)
_LINE, _LINE2, _FIXED, _COUNTED, _COUNTED_SIGNED = 1, 2, 3, 4, 5


def _kind(op: pickletools.OpcodeInfo) -> tuple[int, int, int]:
    """(kind, items popped besides a MARK's slice, items pushed) for one opcode."""
    before = [s.name for s in op.stack_before]
    pushes = len(op.stack_after)
    name = op.name
    if name == "MARK":
        return _MARK, 0, 0
    if name == "STOP":
        return _STOP, 1, 0
    if "mark" in before:
        kind = _TUPLE_TO_MARK if name in ("TUPLE", "FROZENSET") else _TO_MARK
        return kind, before.index("mark"), pushes
    if name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        return _TUPLE_N, len(before), pushes
    if name in ("DUP", "READONLY_BUFFER"):
        return _KEEP, len(before), pushes
    if name == "EMPTY_TUPLE":
        return _EMPTY_TUPLE, 0, 1
    if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
        return _PUT, 0, 0
    if name in ("GET", "BINGET", "LONG_BINGET"):
        return _GET, 0, 1
    if name in ("GLOBAL", "STACK_GLOBAL", "INST"):
        return _GLOBAL, len(before) - ("mark" in before), pushes
    if name in _TEXT_OPS:
        return _TEXT, 0, 1
    if not before and pushes == 1:
        return _PUSH, 0, 1
    return _OTHER, len(before), pushes


def _argument(op: pickletools.OpcodeInfo) -> tuple[int, int]:
    """(layout, size): a fixed size, a count of ``size`` bytes before the data, or text lines."""
    arg = op.arg
    if arg is None:
        return _FIXED, 0
    if arg.n >= 0:
        return _FIXED, arg.n
    if arg.n == pickletools.UP_TO_NEWLINE:
        return (_LINE2 if arg.name == "stringnl_noescape_pair" else _LINE), 0
    if arg.n == pickletools.TAKEN_FROM_ARGUMENT4:  # BINSTRING's count is signed
        return _COUNTED_SIGNED, 4
    counts = {
        pickletools.TAKEN_FROM_ARGUMENT1: 1,
        pickletools.TAKEN_FROM_ARGUMENT4U: 4,
        pickletools.TAKEN_FROM_ARGUMENT8U: 8,
    }
    return _COUNTED, counts[arg.n]


_OPS: list[tuple[int, int, int, int, int] | None] = [None] * 256
for _op in pickletools.opcodes:
    _OPS[ord(_op.code.encode("latin-1"))] = (*_kind(_op), *_argument(_op))


def unpickle(
    stream: BinaryIO,
    *,
    path: str,
    member: str = "",
    symbolic: bool = False,
    allow_globals: Iterable[str] = (),
    persistent_load: Callable[[Any], Any] | None = None,
    encoding: str = "ASCII",
    end: int | None = None,
) -> tuple[Any, list[str]]:
    """Run the restricted unpickler over ``stream`` from its current position.

    Returns ``(object, globals seen)``; the stream is left just after the pickle's STOP. Raises :class:`UnsafeCheckpointError` if any
    hostile global appears (listing all of them) and :class:`CheckpointFormatError` for malformed
    pickles and disallowed constructs. With ``end``, bytes between the STOP and ``end`` are an error.
    """
    where = f"{path}:{member}" if member else path
    up = _Unpickler(
        stream,
        symbolic=symbolic,
        allow_globals=frozenset(allow_globals),
        persistent_load=persistent_load,
        encoding=encoding,
    )
    error: str | None = None
    hint = "The file is corrupt or was not written by torch/numpy; re-export it"
    obj: Any = None
    named: list[tuple[str, str]] = []
    try:
        try:
            size = _prescan(stream, named)
        finally:  # hostile globals first, whatever else is wrong: all those before any problem
            up.note_named(named)
        up.budget.allow(size)
        obj = _resolve(up.load(), {})
    except Refused as exc:
        if exc.hostile:
            up._hostile(exc.hostile, str(exc))
        else:
            error, hint = str(exc), exc.hint or hint
    except UnsafeCheckpointError:  # from a format's persistent_load
        raise
    except CheckpointFormatError:
        if not up.hostile:
            raise
    except RecursionError:
        error = "pickle nests too deeply"
    except Exception as exc:  # the pickle machine reports malformed input with many types
        error = f"malformed pickle ({type(exc).__name__}: {exc})"
    if up.hostile:  # first, whatever else is wrong: that is mentioned after
        besides = [f"besides, {error}"] if error is not None else []
        raise UnsafeCheckpointError(
            where, up.hostile, detail="; ".join(up.problems + besides), calls=up.calls
        )
    if error is not None:
        raise CheckpointFormatError(where, error, hint)
    if end is not None and (extra := end - stream.tell()) != 0:
        raise CheckpointFormatError(
            where,
            f"{extra} unexpected byte(s) after the pickle's end",
            "The file was altered after it was written; do not trust it",
        )
    return obj, list(up.globals_seen)


# --------------------------------------------------------------------------------------------------
# allowlisted builders


def marker(qualname: str) -> Marker | None:
    """The marker of a global that is only data (a storage type, a dtype ...), or None."""
    module, _, name = qualname.rpartition(".")
    if module == "torch.cuda" and name in STORAGE_DTYPES:  # saved from a GPU, loaded on the CPU
        return Marker(qualname, STORAGE_DTYPES[name])
    if module == "torch":
        if name in STORAGE_DTYPES:
            return Marker(qualname, STORAGE_DTYPES[name])
        dtype = TORCH_DTYPE_ALIASES.get(name, name)
        if dtype in DTYPE_ITEMSIZE:
            return Marker(qualname, dtype)
        if name in ("Tensor", "Size"):
            return Marker(qualname, name)
    if qualname in ("torch.storage.UntypedStorage", "torch.UntypedStorage"):
        return Marker(qualname, "uint8")
    if qualname == "torch.nn.parameter.Parameter":
        return Marker(qualname, "Parameter")
    if qualname in ("numpy.ndarray",):
        return Marker(qualname, "ndarray")
    return None


def _builders(symbolic: bool, budget: _CopyBudget) -> dict[str, _Builder]:
    # The builders must not hold the unpickler: after an error the C unpickler keeps its stack,
    # which the garbage collector cannot see into, and a cycle through it would never be freed.
    raw_bytes = _ArrayBytes(budget, symbolic)

    def tensor_v1(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRecord:
        # torch 0.3's rebuild, without requires_grad (lpips' v0.0 weights)
        return _tensor(storage, offset, size, stride, False, None, None)

    def tensor_v2(
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> TensorRecord:
        return _tensor(storage, offset, size, stride, requires_grad, backward_hooks, None)

    def tensor_v3(
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> TensorRecord:
        if not isinstance(dtype, Marker) or dtype.value not in DTYPE_ITEMSIZE:
            _refuse(f"_rebuild_tensor_v3 with the dtype {brief(dtype)}")
        return _tensor(storage, offset, size, stride, requires_grad, backward_hooks, dtype.value)

    def parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> Any:
        if not isinstance(data, TensorRecord):
            _refuse("_rebuild_parameter of something that is not a tensor")
        _check_no_hooks(backward_hooks)
        if state:
            _refuse("_rebuild_parameter_with_state with Python state on the parameter")
        return _replace(data, requires_grad=bool(requires_grad), is_parameter=True)

    def from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if not (isinstance(func, _Builder) and func.qualname in _TENSOR_REBUILDERS):
            name = getattr(func, "qualname", type(func).__name__)
            _refuse(f"_rebuild_from_type_v2 with the foreign function {name}")
        if not (isinstance(new_type, Marker) and new_type.value in ("Tensor", "Parameter")):
            name = getattr(new_type, "qualname", type(new_type).__name__)
            _refuse(f"_rebuild_from_type_v2 to the foreign type {name}")
        if not isinstance(args, tuple):
            _refuse("_rebuild_from_type_v2 without an argument tuple")
        record = func(*args)
        if state:
            _refuse("a tensor carrying Python attributes (_rebuild_from_type_v2 state)")
        if new_type.value == "Parameter":
            record = _replace(record, is_parameter=True)
        return record

    def ordered_dict(*args: Any) -> _StateDict:
        out = _StateDict()
        if args:
            _fill_ordered_dict(out, args, budget)
        return out

    def codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            _refuse("_codecs.encode other than str → bytes in latin1")
        return raw_bytes.latin1(text, "_codecs.encode calls")

    def reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
        if not isinstance(cls, _StandInType):
            _refuse(f"copyreg._reconstructor of {getattr(cls, 'qualname', cls)!r}")
        obj = cls.__new__(cls)  # type: ignore[call-overload]
        obj.record.state = state
        return obj

    def np_reconstruct(cls: Any, shape: Any, dtype_code: Any) -> _NdArray:
        if not (isinstance(cls, Marker) and cls.value == "ndarray"):
            _refuse("numpy _reconstruct of something other than numpy.ndarray")
        return _NdArray(symbolic, raw_bytes)

    def np_dtype(code: Any, align: Any = False, copy: Any = True) -> _NpDtype:
        return _NpDtype(code)

    def np_scalar(dtype: Any, data: Any = None) -> ArrayRecord:
        if not isinstance(dtype, _NpDtype) or not isinstance(data, bytes):
            _refuse("numpy scalar with a non-numeric dtype or no bytes")
        return _array(symbolic, dtype, (), False, data)

    def np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> ArrayRecord:
        if not isinstance(dtype, _NpDtype) or not isinstance(buf, bytes | bytearray):
            _refuse("numpy _frombuffer without a numeric dtype and in-band bytes")
        raw = raw_bytes.frozen(buf, "numpy _frombuffer calls")
        return _array(symbolic, dtype, _shape(shape), order == "F", raw)

    table: dict[str, Callable[..., Any]] = {
        "torch._utils._rebuild_tensor": tensor_v1,
        "torch._utils._rebuild_tensor_v2": tensor_v2,
        "torch._utils._rebuild_tensor_v3": tensor_v3,
        "torch._utils._rebuild_parameter": parameter,
        "torch._utils._rebuild_parameter_with_state": parameter,
        "torch._tensor._rebuild_from_type_v2": from_type_v2,
        "torch._utils._rebuild_from_type_v2": from_type_v2,
        "collections.OrderedDict": ordered_dict,
        "_codecs.encode": codecs_encode,
        "copyreg._reconstructor": reconstructor,
    }
    for np_core in ("numpy.core", "numpy._core"):
        table[f"{np_core}.multiarray._reconstruct"] = np_reconstruct
        table[f"{np_core}.multiarray.scalar"] = np_scalar
        table[f"{np_core}.numeric._frombuffer"] = np_frombuffer
    table["numpy.dtype"] = np_dtype
    for name in _UNSUPPORTED_TENSORS:
        table[name] = _refusing(name)
    return {name: _builder(name, fn) for name, fn in table.items()}


_TENSOR_REBUILDERS = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3")

# tensors torch.load(weights_only=True) reads that are not dense arrays of numbers in a storage:
# what each global makes, and what to save instead
_QUANTIZED = ("a quantized tensor", "Save tensor.dequantize() in its place")
_SPARSE = ("a sparse tensor", "Save tensor.to_dense() in its place")
_UNSUPPORTED_TENSORS = {
    "torch._utils._rebuild_qtensor": _QUANTIZED,
    **{
        f"torch.{q}Storage": _QUANTIZED
        for q in ("QInt8", "QUInt8", "QInt32", "QUInt4x2", "QUInt2x4")
    },
    "torch._utils._rebuild_sparse_tensor": _SPARSE,
    "torch.serialization._get_layout": _SPARSE,
    "torch._utils._rebuild_nested_tensor": ("a nested tensor", "Save its parts (tensor.unbind())"),
    "torch._utils._rebuild_meta_tensor_no_storage": (
        "a meta-device tensor",
        "It holds no values: save the tensor from a real device",
    ),
    "torch._utils._rebuild_wrapper_subclass": ("a tensor subclass", "Save a plain tensor"),
    "torch._utils._rebuild_device_tensor_from_numpy": (
        "a tensor of a device without storage (XLA ...)",
        "Move it to the CPU before saving",
    ),
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": (
        "a tensor of a device without storage (XLA ...)",
        "Move it to the CPU before saving",
    ),
}


def refuse_unsupported_tensor(qualname: str) -> None:
    """Refuse, saying why and what to save instead, if ``qualname`` makes a kind of tensor that
    smartload does not read (a quantized storage type in a persistent id ...)."""
    if qualname in _UNSUPPORTED_TENSORS:
        raise _unsupported(qualname)


def _unsupported(qualname: str) -> Refused:
    what, hint = _UNSUPPORTED_TENSORS[qualname]
    return Refused(
        f"{what} ({qualname}); smartload reads dense tensors only",
        hint=f"{hint}, then load that file",
    )


def _refusing(qualname: str) -> Callable[..., NoReturn]:
    """The builder of a global in ``_UNSUPPORTED_TENSORS``: its call is refused with a reason."""

    def unsupported_tensor(*args: Any) -> NoReturn:
        raise _unsupported(qualname)

    return unsupported_tensor


def _fill_ordered_dict(out: _StateDict, args: tuple[Any, ...], budget: _CopyBudget) -> None:
    """``OrderedDict([[key, value], ...])``, as Python 2 pickled one (its ``__reduce__`` gave the
    items as a list of 2-item lists): exactly one list or tuple of pairs with str keys."""
    if len(args) != 1 or type(args[0]) not in (list, tuple):
        _refuse("OrderedDict called with arguments other than one list of (key, value) pairs")
    items = args[0]
    budget.charge(_ENTRY_BYTES * len(items), "OrderedDict calls")
    for item in items:
        if type(item) not in (list, tuple) or len(item) != 2:
            _refuse(f"OrderedDict called with {brief(item)} where a (key, value) pair belongs")
        if type(item[0]) is not str:
            _refuse(f"OrderedDict called with the key {brief(item[0])}; state dict keys are str")
        out[item[0]] = item[1]


def _replace(record: TensorRecord, **changes: Any) -> TensorRecord:
    from dataclasses import replace

    return replace(record, **changes)


def _refuse(message: str) -> NoReturn:
    raise Refused(message)


def _check_no_hooks(hooks: Any) -> None:
    if hooks is None or (isinstance(hooks, dict) and not hooks):
        return
    _refuse("a tensor with backward hooks (they would be code references)")


def _shape(value: Any) -> tuple[int, ...]:
    if type(value) is not tuple:  # a list: its length checked before it is copied
        if not isinstance(value, tuple | list) or len(value) > MAX_NDIM:
            _refuse(f"a tensor shape that is not up to {MAX_NDIM} sizes: {brief(value)}")
        value = tuple(value)
    # set(map(type, ...)) keeps the checks in C: this runs once per tensor
    if len(value) > MAX_NDIM or (
        value
        and (not _INTS.issuperset(map(type, value)) or min(value) < 0 or max(value) > MAX_NUMEL)
    ):
        _refuse(f"a tensor shape that is not up to {MAX_NDIM} sizes: {brief(value)}")
    if math.prod(value) > MAX_NUMEL:
        _refuse(f"a tensor of more than 2**48 elements (shape of {len(value)} sizes)")
    shape: tuple[int, ...] = value
    return shape


_INTS = frozenset({int})


def _tensor(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: str | None,
) -> TensorRecord:
    if type(storage) is not StorageRef:
        _refuse("a tensor rebuilt from something that is not a storage of the file")
    if backward_hooks:
        _check_no_hooks(backward_hooks)
    shape = _shape(size)
    if type(stride) is not tuple:
        if not isinstance(stride, list) or len(stride) != len(shape):
            _refuse("a tensor stride that does not match its shape")
        stride = tuple(stride)
    if len(stride) != len(shape):
        _refuse("a tensor stride that does not match its shape")
    if stride and (
        not _INTS.issuperset(map(type, stride)) or min(stride) < 0 or max(stride) >= 2**62
    ):
        shown = ", ".join(map(brief, stride[:8]))
        _refuse(f"a tensor with negative or non-integer strides ({shown})")
    if type(offset) is not int or not 0 <= offset < 2**62:
        _refuse(f"a tensor with storage offset {brief(offset)}")
    dtype = dtype or storage.dtype
    itemsize = DTYPE_ITEMSIZE[dtype]
    nbytes = storage.numel * DTYPE_ITEMSIZE[storage.dtype]
    if nbytes % itemsize:
        _refuse(f"a {dtype} tensor on storage {storage.key!r} of {nbytes} bytes")
    # the last element read is at offset + sum((n - 1) * stride)
    extent = 0 if 0 in shape else offset + 1 + sum(map(mul, shape, stride)) - sum(stride)
    if extent * itemsize > nbytes:
        _refuse(
            f"a tensor of shape {list(shape)} at offset {offset} reads past the end of storage "
            f"{storage.key!r} ({nbytes} bytes)"
        )
    return TensorRecord(storage, offset, shape, stride, dtype, bool(requires_grad))


class _NpDtype(_NoBuild):
    """``numpy.dtype(code, align, copy)`` plus its BUILD state: numeric kinds only."""

    qualname = "numpy.dtype"

    def __init__(self, code: Any) -> None:
        if not isinstance(code, str):
            _refuse("numpy.dtype with a non-string code")
        code = NUMPY_CHAR_CODES.get(code, code)
        if code.startswith(("O", "V")):
            raise Refused(
                "an object or structured numpy array (numpy.dtype('O')); such arrays "
                "carry pickled Python objects",
                hostile="numpy.dtype('O')",
            )
        self.code = code
        self.byteorder = "<"

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 5):
            _refuse("numpy dtype with malformed state")
        if state[2] is not None or state[3] is not None or state[4] is not None:
            _refuse("structured numpy dtype (sub-arrays or fields)")
        if state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    def torch_name(self) -> str:
        if self.byteorder == ">" and not self.code.endswith("1"):
            _refuse(f"big-endian numpy array (dtype >{self.code})")
        name = NUMPY_DTYPES.get(self.code)
        if name is None:
            _refuse(f"numpy dtype {self.code!r} is not numeric")
        return name


class _NdArray(_NoBuild):
    """``numpy.core.multiarray._reconstruct(ndarray, ...)`` waiting for its BUILD state."""

    qualname = "numpy.ndarray"

    def __init__(self, symbolic: bool, data: _ArrayBytes) -> None:
        self._symbolic = symbolic
        self._data = data
        self.record: ArrayRecord | None = None

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, rawdata)
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _NpDtype)):
            _refuse("numpy array with malformed state")
        _, shape, dtype, fortran, raw = state
        if isinstance(raw, str):  # protocol 0/1 py2 pickles store bytes as latin1 text
            raw = self._data.latin1(raw, "numpy array BUILDs")
        if not isinstance(raw, bytes | bytearray):
            _refuse("numpy array whose data is not bytes (object array)")
        raw = self._data.frozen(raw, "numpy array BUILDs")
        self.record = _array(self._symbolic, dtype, _shape(shape), bool(fortran), raw)


class _ArrayBytes:
    """The bytes arrays are made of, made once per object of the pickle: a string's latin1
    encoding (py2 pickles carry bytes as text), or a bytearray's copy (protocol 5's in-band
    buffers; a copy, as the pickle could change the bytearray later). Both are charged to the
    budget; a string referenced again gives the same bytes, uncharged. Without materialising
    (``inspect``), bytes are kept only for a string seen twice: a bytearray is not copied."""

    __slots__ = ("budget", "encoded", "keep")

    def __init__(self, budget: _CopyBudget, symbolic: bool) -> None:
        self.budget = budget
        self.keep = not symbolic
        # id → (the string, so that its id stays its own; its bytes, once kept)
        self.encoded: dict[int, tuple[str, bytes | None]] = {}

    def latin1(self, text: str, what: str) -> bytes:
        seen = self.encoded.get(id(text))
        if seen is not None and seen[1] is not None:
            return seen[1]
        self.budget.charge(len(text), what)
        encoded = text.encode("latin1")
        self.encoded[id(text)] = (text, encoded if self.keep or seen is not None else None)
        return encoded

    def frozen(self, buf: bytes | bytearray, what: str) -> bytes | bytearray:
        """``buf`` as bytes (without materialising: ``buf`` itself, only its length is read)."""
        if type(buf) is bytes:
            return buf
        self.budget.charge(len(buf), what)
        return bytes(buf) if self.keep else buf


def _array(
    symbolic: bool, dtype: _NpDtype, shape: tuple[int, ...], fortran: bool, raw: bytes | bytearray
) -> ArrayRecord:
    name = dtype.torch_name()
    numel = math.prod(shape)
    if numel * DTYPE_ITEMSIZE[name] != len(raw):
        _refuse(
            f"numpy array of shape {list(shape)} and dtype {dtype.code} has {len(raw)} bytes of data"
        )
    data = None if symbolic else bytes(raw)  # bytes already when materialising: not copied
    return ArrayRecord(name, dtype.byteorder + dtype.code, shape, fortran, data, len(raw))


def _resolve(obj: Any, memo: dict[int, Any]) -> Any:
    """Replace the unpickler's helper objects in a loaded tree by plain records and containers."""
    if type(obj) in _PLAIN:  # most of a state dict: nothing to replace
        return obj
    key = id(obj)
    if key in memo:
        return memo[key]
    out: Any
    if _is_plain_container(obj):  # kept as it is: walked in C, not item by item in Python
        out = obj
    elif isinstance(obj, _NdArray):
        if obj.record is None:
            raise Refused("a numpy array without its data (no BUILD)")
        out = obj.record
    elif isinstance(obj, _StandInBase):
        out = memo[key] = obj.record
        out.args = _resolve(out.args, memo)
        out.state = _resolve(out.state, memo)
        out.items = {k: _resolve(v, memo) for k, v in out.items.items()}
        out.listitems = [_resolve(v, memo) for v in out.listitems]
    elif isinstance(obj, _StandInType | _NoBuild):
        out = StandIn(obj.qualname)
    elif isinstance(obj, dict):
        out = memo[key] = {}
        for k, v in obj.items():
            out[_resolve_key(k)] = _resolve(v, memo)
    elif isinstance(obj, list):
        out = memo[key] = []
        out.extend(_resolve(v, memo) for v in obj)
    elif isinstance(obj, tuple):
        out = tuple(_resolve(v, memo) for v in obj)
    else:
        return obj
    memo[key] = out
    return out


_PLAIN = frozenset(
    {TensorRecord, ArrayRecord, StorageRef, str, bytes, int, float, bool, type(None)}
)
_PLAIN_KEYS = frozenset({str, bytes, int, float, bool, type(None)})


def _is_plain_container(obj: Any) -> bool:
    """A list, tuple or dict of plain values only (a stand-in's arguments, a BUILD's state):
    nothing in it to replace."""
    kind = type(obj)
    if kind is tuple or kind is list:
        return _PLAIN.issuperset(map(type, obj))
    return (
        kind is dict
        and _PLAIN.issuperset(map(type, obj.values()))
        and _PLAIN_KEYS.issuperset(map(type, obj))
    )


def _resolve_key(key: Any) -> Any:
    """Dict keys stay plain data: an object of ours used as a key becomes its name."""
    if isinstance(key, str | int | float | bool | bytes) or key is None:
        return key
    if isinstance(key, tuple):
        return tuple(_resolve_key(k) for k in key)
    return f"<{getattr(key, 'qualname', type(key).__name__)}>"


# the table's names do not depend on the unpickler it closes over
_BUILDER_NAMES = frozenset(_builders(False, _CopyBudget()))


def inert_globals(globals_seen: Iterable[str]) -> list[str]:
    """The globals that became inert stand-ins (neither allowlisted builders, data markers nor
    builtin data types such as ``builtins.set``)."""
    return [
        g
        for g in globals_seen
        if g not in _BUILDER_NAMES
        and marker(g) is None
        and hostile_reason(g) is None
        and not is_plain_data(g)
    ]


def unknown_globals(globals_seen: Iterable[str]) -> list[str]:
    """The inert globals not known to be data: what ``torch.load`` without ``weights_only``
    would import, and smartload cannot vouch for (a file naming one is UNKNOWN, not SAFE)."""
    return [g for g in inert_globals(globals_seen) if not is_known_data(g)]
