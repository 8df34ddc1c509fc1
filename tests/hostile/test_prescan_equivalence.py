"""The opcode prescan is hand-optimised (it runs 700,000 times for a 20,000-tensor checkpoint);
these properties hold it to a plain reference built on ``pickletools.genops``.

- On pickles ``pickle.dumps`` writes (nested tuples, lists, dicts, strings, protocols 0-5), both
  agree exactly: accepted, or refused with the same message.
- On mutated pickles (bytes flipped, memo indices planted, cut short), whatever the reference
  refuses as dangerous, the prescan refuses too with the same message, unless the reference
  stopped first on a malformed argument the prescan does not decode (the C unpickler rejects it).

Both follow the C unpickler's own rules where a simpler model of the stack would drift from it
(a review found two such drifts that hid a deep tuple): POP right after MARK drops the mark, no
opcode pops below the last mark, and MEMOIZE writes at the count of filled memo slots.
tests/test_hostile.py pins the two attacks.

The prescan that also lists names follows globals and getattr on its stack (as values that are
0 to every check); it reaches the same outcome as the one that does not, on pickles that name
classes and method references (``getattr(str, "join")`` at every protocol).
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import pickletools
import struct
import warnings
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smartload._records import Refused
from smartload._unpickler import _MAX_GLOBALS, _MAX_MEMO_GAP, _MAX_TUPLE_DEPTH, _walk

# --------------------------------------------------------------------------------------------------
# the reference: one simulated stack entry per item (its tuple depth), from genops


def _genops(data: bytes) -> Iterator[tuple[Any, Any]]:
    """genops' opcodes and arguments, one at a time, without the DeprecationWarning it gives for
    a protocol-0 string with an invalid escape (pytest makes warnings errors)."""
    ops = pickletools.genops(io.BytesIO(data))
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                op, arg, _ = next(ops)
            except StopIteration:
                return
        yield op, arg


def reference(data: bytes) -> None:
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}
    puts = globals_named = 0
    for op, arg in _genops(data):
        before = [s.name for s in op.stack_before]
        name = op.name
        depth = 0
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name == "STOP":
            return
        if name == "POP" and marks and marks[-1] == len(stack):  # C drops the mark instead
            marks.pop()
            continue
        if "mark" in before:
            at = marks.pop()
            if name in ("TUPLE", "FROZENSET"):
                depth = 1 + max(stack[at:], default=0)
            del stack[at - before.index("mark") :]
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            depth = 1 + max(stack[-len(before) :])
            del stack[-len(before) :]
        elif name in ("DUP", "READONLY_BUFFER"):
            depth = stack[-1]
            del stack[-len(before) :]
        elif before and name not in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if len(stack) - len(before) < (marks[-1] if marks else 0):  # C's fence
                raise IndexError("underflow")
            del stack[-len(before) :]
        if name == "EMPTY_TUPLE":
            depth = 1
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if arg is None else int(arg)  # MEMOIZE: C's count of slots
            if index > puts + _MAX_MEMO_GAP:
                raise Refused(f"a memo index {index} far beyond the {puts} objects memoized")
            memo[index] = max(memo.get(index, 0), stack[-1])  # as conservative as the prescan
            # (memo holds every index written, so len(memo) is C's count of filled slots)
            puts += 1
            continue
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            depth = memo.get(int(arg), 0)
        elif name in ("GLOBAL", "STACK_GLOBAL", "INST"):
            globals_named += 1
            if globals_named > _MAX_GLOBALS * 10:
                raise Refused(f"more than {_MAX_GLOBALS * 10} global lookups")
        if depth > _MAX_TUPLE_DEPTH:
            raise Refused(f"tuples nested more than {_MAX_TUPLE_DEPTH} deep")
        stack.extend([depth] * len(op.stack_after))
    raise ValueError("no STOP")


def outcome(fn: Any, data: bytes) -> str:
    try:
        fn(data)
    except Refused as exc:
        return f"refused: {exc}"
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        return "malformed"
    return "ok"


def prescan(data: bytes) -> None:
    _walk(data, 0)


def prescan_naming(data: bytes) -> None:
    _walk(data, 0, [])


# --------------------------------------------------------------------------------------------------
# generated pickles

leaves = st.one_of(
    st.integers(-(2**70), 2**70), st.text(max_size=6), st.booleans(), st.none(), st.floats(),
    # globals, and method references (getattr(cls, name) at every protocol)
    st.sampled_from(
        [collections.OrderedDict, pathlib.PurePosixPath, str.join, dict.get,
         collections.OrderedDict.fromkeys]
    ),
)  # fmt: skip
trees = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(tuple),
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=3), inner, max_size=3),
    ),
    max_leaves=30,
)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    """Tuples nested around the limit, sometimes shared (memo GETs carry their depth)."""
    value: Any = draw(leaves)
    for _ in range(draw(st.integers(90, 110))):
        value = (value,) if draw(st.integers(0, 3)) else (value, value)
    return {"k": [value, value]} if draw(st.booleans()) else value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(trees, deep()), st.integers(0, 5))
def test_agrees_on_real_pickles(obj: Any, protocol: int) -> None:
    data = pickle.dumps(obj, protocol=protocol)
    expected = outcome(reference, data)
    event(expected.split(":")[0])
    assert outcome(prescan, data) == expected
    assert outcome(prescan_naming, data) == expected


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(pickle.dumps(draw(st.one_of(trees, deep())), protocol=draw(st.integers(0, 5))))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "memo", "cut", "insert"]))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "memo":  # a LONG_BINPUT with an index near or far past the memo
            index = draw(st.one_of(st.integers(0, 2000), st.integers(2**20, 2**32 - 1)))
            data[at:at] = b"r" + struct.pack("<I", index)
        elif kind == "cut":
            del data[at:]
            if not data:
                data = bytearray(b".")
        else:
            data[at:at] = bytes(draw(st.lists(st.integers(0, 255), min_size=1, max_size=6)))
    return bytes(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_refuses_whatever_the_reference_refuses(data: bytes) -> None:
    expected = outcome(reference, data)
    got = outcome(prescan, data)
    assert outcome(prescan_naming, data) == got
    event(f"{expected.split(':')[0]} -> {got.split(':')[0]}")
    if expected.startswith("refused"):
        assert got == expected
    elif expected == "ok":  # the prescan decodes fewer arguments than genops, never more
        assert got == "ok"
