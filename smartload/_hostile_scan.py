"""A last look for hostile globals in a file refused for another reason.

A file naming a known-dangerous global anywhere is reported as hostile first, whatever else is
wrong with it: a pickle in a zip that is not a torch archive (or whose member claims to be
encrypted), a second pickle after the first, a protocol-0 pickle without a PROTO opcode, the
pickled objects of a numpy ``.npy``. This walks the opcodes of every pickle the file may hold with
the unpickler's pre-scan (nothing is built, nothing is decompressed), within a budget of a few
times the file's size. Only names that Python could import count (text that merely looks like
a GLOBAL opcode does not), and TorchScript archives are left alone: their pickles are read by
TorchScript's own unpickler, which resolves TorchScript types only.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from typing import Any, NamedTuple

from ._records import Refused
from ._unpickler import hostile_names, walk_names
from .errors import CheckpointFormatError, UnsafeCheckpointError

__all__ = ["Walked", "importable", "named_in", "refuse_if_hostile", "stacked_names"]

_ZIP_LOCAL = b"PK\x03\x04"
_NPY = b"\x93NUMPY"
_MEMBER_COPY = 256 * 2**20  # the most of one zip member walked
_MAX_MEMBERS = 10_000
# how a pickle (or a .npy file) can begin: PROTO, or what protocols 0 and 1 open with
_PICKLE_STARTS = frozenset(bytes([b]) for b in b"\x80\x93(]}cViSUXN")


def refuse_if_hostile(path: str, refused: CheckpointFormatError, allowed: frozenset[str]) -> None:
    """Raise :class:`UnsafeCheckpointError` (from ``refused``) if a pickle in the file at
    ``path`` (or in the file ``refused`` names, for a directory) names a hostile global."""
    path = next(
        (p for p in (path, refused.path, refused.path.rpartition(":")[0]) if _is_file(p)), ""
    )
    named = [n for n in _named_in_file(path) if importable(*n)] if path else []
    found = hostile_names(named, allowed)
    if found:
        detail = "; ".join(f"{name}: {reason}" for name, reason in found)
        raise UnsafeCheckpointError(
            path, [name for name, _ in found], detail=f"{detail}; besides, {refused.problem}"
        ) from refused


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def importable(module: str, name: str) -> bool:
    """Whether ``module.name`` is a name Python could import (text that merely looks like a
    GLOBAL opcode's is not)."""
    return all(part.isidentifier() for part in f"{module}.{name}".split("."))


def _named_in_file(path: str) -> list[tuple[str, str]]:
    """``(module, name)`` of every global the pickles in the file name (none if unreadable)."""
    named: list[tuple[str, str]] = []
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            named_in(data, named)
    except (OSError, ValueError):  # a directory, an empty file, a FIFO ...
        pass
    return named


class Walked(NamedTuple):
    """What :func:`named_in` found besides the names."""

    torchscript: bool  # a TorchScript archive: its members were not walked
    stopped: str | None  # why a walk stopped before a pickle's end (the names after it unseen)


def named_in(data: Any, named: list[tuple[str, str]], start: int = 0) -> Walked:
    """Append to ``named`` the ``(module, name)`` of every global the pickles in ``data[start:]``
    (a file's bytes, or an mmap) may name: stacked from ``start``, and in each zip member found
    by its local header, within a budget of a few times its size. Nothing is decompressed."""
    stopped = stacked_names(data, _npy_body(data, start), named)
    members = _zip_members(data, start)
    if any(n.endswith(b"constants.pkl") or b"/code/" in n for n, _, _ in members):
        return Walked(True, stopped)
    budget = 4 * (len(data) - start) + 2**20
    for _, start, end in members:
        if start == end:
            continue
        if budget < end - start:
            return Walked(False, stopped or "zip members larger than the scan allows")
        budget -= end - start
        region = data[start:end]
        stopped = stacked_names(region, _npy_body(region, 0), named) or stopped
    return Walked(False, stopped)


def stacked_names(data: Any, start: int, named: list[tuple[str, str]]) -> str | None:
    """Walk the pickles one after another from ``start`` (torch's legacy format stacks four; a
    payload may follow the first), until one cannot be walked. Returns why the walk was refused
    where the pickle machine could go on (tuples nested too deep, memo indices far ahead ...:
    the names after that are unseen), or None when the pickles end, or bytes follow that are
    no pickle (where ``pickle.load`` stops too)."""
    while start < len(data):
        try:
            start = walk_names(data, start, named)
        except Refused as exc:  # the names before the problem are in `named`
            return str(exc)
        except ValueError:
            return None
    return None


def _npy_body(data: Any, start: int) -> int:
    """Where a numpy ``.npy`` file's data (the pickle, for object arrays) starts, or ``start``."""
    if data[start : start + 6] != _NPY or len(data) < start + 12:
        return start
    if data[start + 6] == 1:
        return start + 10 + int(struct.unpack_from("<H", data, start + 8)[0])
    return start + 12 + int(struct.unpack_from("<I", data, start + 8)[0])


def _zip_members(data: Any, start: int = 0) -> list[tuple[bytes, int, int]]:
    """``(name, start, end)`` of each zip member, from every local header in the file (a
    central directory may hide some), whatever its flags say; a member whose header gives no
    size ends where the next header begins. ``end == start`` for those not to walk: compressed
    ones (never inflated) and those that cannot begin a pickle."""
    members: list[tuple[bytes, int, int]] = []
    at = data.find(_ZIP_LOCAL, start)
    while at >= 0 and at + 30 <= len(data) and len(members) < _MAX_MEMBERS:
        method, _, _, _, size, _, name_len, extra_len = struct.unpack_from(
            "<HHHIIIHH", data, at + 8
        )
        start = at + 30 + name_len + extra_len
        following = data.find(_ZIP_LOCAL, at + 4)
        end = start + size if 0 < size < 0xFFFFFFFF else following
        end = min(len(data) if end < 0 else end, len(data), start + _MEMBER_COPY)
        if method != 0 or data[start : start + 1] not in _PICKLE_STARTS:
            end = start  # compressed (never inflated), or not a pickle: nothing to walk
        members.append((bytes(data[at + 30 : at + 30 + name_len]), start, max(start, end)))
        at = following
    return members
