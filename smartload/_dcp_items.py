"""The bytes items of a DCP directory, judged by the globals their pickles name. No torch.

A DCP save stores each non-tensor value (``epoch``, optimizer ``param_groups``, ``train_state``,
a dataloader's state ...) as a BYTE_IO item: ``torch.save`` of the value, which ``dcp.load``
hands to ``torch.load(weights_only=False)``, a plain unpickling. smartload never unpickles one
and never uses its value; it walks each item's pickle with the unpickler's pre-scan (opcodes
only: nothing built, nothing imported) and judges the names as it judges any file's. A hostile
global in any item refuses the directory (:class:`UnsafeCheckpointError` naming the global and
the item); other globals are the directory's like any file's (unknown ones make the verdict
UNKNOWN and leave loading alone).

What is walked is what ``torch.load`` would unpickle: in a ``torch.save`` archive (the default,
``PK\\x03\\x04`` first) its ``data.pkl`` only, found through the zip directory of the item's own
window; a TorchScript archive (``torch.load`` passes it to ``torch.jit.load``) is hostile; any
other item is read as torch's legacy format does, pickle after pickle from its start, and an
archive smartload cannot read is walked from every local zip header as well (more names than
torch would see, never fewer). No tensor storage is read, and nothing past an item's end.

Cost: the walks of one directory cover at most :data:`SCAN_LIMIT` bytes of pickle, each
through a window of the file that ends where the item does (or where the limit does). An item
left unwalked past the limit, or whose walk the pre-scan refused before its end, is listed as
not scanned: its names are unknown, the verdict UNKNOWN. Items that overlap, which DCP never
writes, are refused (each walked once at most).
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Sequence
from typing import NamedTuple

from ._formats import _data_offset, _zip_members
from ._hostile_scan import importable, named_in, stacked_names
from ._records import Refused, brief
from ._unpickler import hostile_names, unknown_globals, walk_names
from .errors import CheckpointFormatError, UnsafeCheckpointError

__all__ = ["SCAN_LIMIT", "BytesItem", "ItemRef", "UnscannedItem", "scan_items"]

SCAN_LIMIT = 64 << 20  # bytes of pickle walked per directory (a few seconds at worst)
_ZIP = b"PK\x03\x04"
logger = logging.getLogger("smartload")


class BytesItem(str):
    """A non-tensor value of a DCP save (a BYTE_IO item: ``epoch``, optimizer ``param_groups``
    ...): a pickle that smartload never unpickles, described by its size and what its scan
    found. It shows as its description, unquoted."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str.__str__(self)


class UnscannedItem(BytesItem):
    """A bytes item whose pickle was not walked to its end (too large, or refused by the
    pre-scan): smartload cannot say what it names."""

    __slots__ = ()


class ItemRef(NamedTuple):
    """A bytes item, checked against its file: ``length`` bytes at ``offset`` of ``file``."""

    key: str  # the flattened state-dict key
    rel: str  # its file, as the metadata names it
    file: str  # the real path
    offset: int
    length: int


class _Walk(NamedTuple):
    named: list[tuple[str, str]]
    stopped: str | None  # why the walk ended before the pickle did (its names after are unseen)
    note: str = ""  # how the item was read, when not as a torch.save archive
    torchscript: bool = False


def scan_items(
    directory: str,
    items: Sequence[ItemRef],
    allow: frozenset[str],
    besides: CheckpointFormatError | None = None,
) -> tuple[dict[str, BytesItem], list[str]]:
    """Each item's description by key, and the globals the items name (file order, once each).

    Raises :class:`UnsafeCheckpointError` when an item names a hostile global (not in
    ``allow``), listing every one and the items naming them, ahead of ``besides`` (a problem
    the caller found with the directory, raised next) or of overlapping items."""
    scanner = _Scanner(allow)
    described: dict[str, BytesItem] = {}
    problem = besides.problem if besides is not None else None
    try:
        for item in _in_file_order(items):
            overlap = scanner.overlap(item)
            if overlap is not None:
                problem = problem or (
                    f"bytes items {_key(overlap.key)} and {_key(item.key)} overlap in "
                    f"{brief(item.rel, 80)} (DCP writes each item once)"
                )
                continue
            described[item.key] = scanner.describe(item)
    finally:
        scanner.close()
    if scanner.hostile:
        raise _unsafe(directory, scanner.hostile, problem)
    if besides is not None:
        raise besides
    if problem is not None:
        raise CheckpointFormatError(
            directory, problem, "The directory was altered after DCP wrote it; do not trust it"
        )
    return described, list(scanner.globals)


def _in_file_order(items: Sequence[ItemRef]) -> list[ItemRef]:
    return sorted(items, key=lambda item: (item.file, item.offset, item.length))


class _Scanner:
    def __init__(self, allow: frozenset[str]) -> None:
        self.allow = allow
        self.left = SCAN_LIMIT
        self.files: dict[str, tuple[int, mmap.mmap]] = {}  # real path → (descriptor, map)
        self.end: tuple[str, int] = ("", 0)  # where the previous item (in file order) ends
        self.last: ItemRef | None = None
        self.hostile: list[tuple[ItemRef, list[tuple[str, str]]]] = []
        self.globals: dict[str, None] = {}

    def overlap(self, item: ItemRef) -> ItemRef | None:
        """The previous item, if ``item`` begins inside it (items come in file order)."""
        if item.length == 0:
            return None
        file, end = self.end
        if file == item.file and item.offset < end and self.last is not None:
            return self.last
        self.end, self.last = (item.file, item.offset + item.length), item
        return None

    def describe(self, item: ItemRef) -> BytesItem:
        walk = self._walk(item) if item.length else _Walk([], None)
        hostile = hostile_names(walk.named, self.allow)
        if walk.torchscript:
            hostile.append(
                (
                    "torch.jit.load",
                    "a TorchScript archive, which torch.load runs with torch.jit.load",
                )
            )
        if hostile:
            self.hostile.append((item, hostile))
        names = [f"{m}.{n}" for m, n in walk.named if importable(m, n)]
        self.globals.update(dict.fromkeys(names))
        if walk.note:
            logger.debug("bytes item %s of %s: %s", _key(item.key), item.rel, walk.note)
        # one fact, the most telling, in the few words a described value gets
        what = f"bytes item ({item.length:,} bytes, "
        if walk.stopped is not None:
            logger.warning(
                "bytes item %s of %s not scanned to its end: %s; what it names is unknown",
                _key(item.key),
                item.rel,
                walk.stopped,
            )
            return UnscannedItem(what + "not scanned to its end)")
        unknown = unknown_globals(names)
        if unknown:
            return BytesItem(
                what + f"{len(unknown)} unknown global{'s' if len(unknown) > 1 else ''})"
            )
        if walk.note:
            return BytesItem(what + "not a torch.save archive)")
        return BytesItem(what + "never unpickled)")

    # -- walking ---------------------------------------------------------------------------------

    def _walk(self, item: ItemRef) -> _Walk:
        fd, mm = self._open(item)
        start, stop = item.offset, item.offset + item.length
        if mm[start : start + 4] != _ZIP:  # torch.load reads it as its legacy format
            named: list[tuple[str, str]] = []
            data, at, cut = self._window(fd, start, stop)
            with data:
                stopped = stacked_names(data, at, named)
            return _Walk(named, cut or stopped)
        try:
            members = _zip_members(item.file, mm, start, stop)
            pkl = [name for name in members if name.rpartition("/")[2] == "data.pkl"]
            if len(pkl) != 1 or pkl[0].count("/") != 1:
                raise CheckpointFormatError(item.file, f"{len(pkl)} <name>/data.pkl members")
            member = members[pkl[0]]
            begin = _data_offset(item.file, mm, member, stop)
        except CheckpointFormatError as exc:
            return self._walk_any(item, fd, exc.problem)
        named = []
        data, at, cut = self._window(fd, begin, begin + member.size)
        with data:
            try:
                walk_names(data, at, named)
                stopped = None
            except Refused as exc:
                stopped = str(exc)
            except ValueError:  # malformed: torch.load fails there too, having run what came before
                stopped = None
        return _Walk(named, cut or stopped)

    def _walk_any(self, item: ItemRef, fd: int, problem: str) -> _Walk:
        """An archive smartload's zip reader refuses: every pickle the item may hold."""
        named: list[tuple[str, str]] = []
        data, at, cut = self._window(fd, item.offset, item.offset + item.length)
        with data:
            walked = named_in(data, named, at)
        note = f"walked as any file: not a torch.save archive smartload reads ({problem})"
        torchscript = walked.torchscript or "TorchScript" in problem
        return _Walk(named, cut or walked.stopped, note, torchscript)

    def _window(self, fd: int, start: int, stop: int) -> tuple[mmap.mmap, int, str | None]:
        """A map of the file's bytes ``start:stop``, cut where the scan limit is reached: the
        map (from a page boundary), where ``start`` lies in it, and why it was cut, if it was."""
        take = min(stop - start, self.left)
        self.left -= take
        base = start - start % mmap.ALLOCATIONGRANULARITY
        cut = None
        if take < stop - start:
            cut = (
                f"its pickle of {stop - start:,} bytes is past the {SCAN_LIMIT:,} bytes of "
                "pickle smartload walks in a directory"
            )
        length = start - base + take
        if length == 0:
            return mmap.mmap(-1, 1), 1, cut  # nothing left to walk: an empty map, past its end
        return mmap.mmap(fd, length, offset=base, access=mmap.ACCESS_READ), start - base, cut

    def _open(self, item: ItemRef) -> tuple[int, mmap.mmap]:
        found = self.files.get(item.file)
        if found is None:
            try:
                fd = os.open(item.file, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointFormatError(item.file, f"cannot read: {exc.strerror}") from None
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                os.close(fd)
                raise CheckpointFormatError(item.file, f"cannot map: {exc}") from None
            found = self.files[item.file] = (fd, mm)
        return found

    def close(self) -> None:
        for fd, mm in self.files.values():
            mm.close()
            os.close(fd)
        self.files.clear()


def _unsafe(
    directory: str,
    hostile: list[tuple[ItemRef, list[tuple[str, str]]]],
    besides: str | None,
) -> UnsafeCheckpointError:
    files = {item.file for item, _ in hostile}
    first = hostile[0][0]
    path = os.path.join(directory, first.rel) if len(files) == 1 else directory
    globals_ = list(dict.fromkeys(name for _, found in hostile for name, _ in found))
    parts = [
        f"bytes item {_key(item.key)} ({item.length:,} bytes at byte {item.offset:,} of "
        f"{brief(item.rel, 80)}): " + ", ".join(f"{name}: {reason}" for name, reason in found)
        for item, found in hostile
    ]
    detail = "; ".join(parts) + "; dcp.load would unpickle it with torch.load(weights_only=False)"
    if besides is not None:
        detail += f"; besides, {besides}"
    return UnsafeCheckpointError(path, globals_, detail=detail)


def _key(name: str) -> str:
    return brief(name, 200)
