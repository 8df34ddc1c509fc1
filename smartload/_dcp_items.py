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

Tensor items (the default layout: each chunk a ``torch.save`` archive of one tensor) are judged
the same way, up front, though ``dcp.load`` reads them with ``weights_only=True``: the verdict is
about the whole directory, and smartload unpickles a chunk's ``data.pkl`` (with its restricted
unpickler) when the chunk is read. Only ``data.pkl`` is walked, found through the item's own zip
directory; it is a few hundred bytes, the same for every chunk of one dtype and shape, so each
distinct one is walked once (keyed by its BLAKE2b digest and length, never by its bytes). A
hostile global refuses the directory like a bytes item's; an unknown one is the directory's
(UNKNOWN; reading the chunk refuses it, a tensor item must rebuild a tensor). A ``data.pkl``
larger than :data:`MAX_TENSOR_PICKLE`, or one the pre-scan refuses before its end, or past the
:data:`TENSOR_SCAN_LIMIT` bytes of distinct ``data.pkl`` walked per directory, refuses the
directory (after any hostile name is reported), as do tensor items that overlap. An item whose
``data.pkl`` cannot be found (not an archive, a garbled header) is refused when it is read, as
before: torch.load would refuse it too, and its tensor data is never walked as if it were pickles.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

from ._formats import _data_offset, _Member, _zip_members
from ._hostile_scan import importable, named_in, stacked_names
from ._records import Refused, brief
from ._unpickler import hostile_names, unknown_globals, walk_names
from .errors import CheckpointFormatError, UnsafeCheckpointError

__all__ = [
    "MAX_TENSOR_PICKLE",
    "SCAN_LIMIT",
    "TENSOR_SCAN_LIMIT",
    "TOO_LARGE_HINT",
    "BytesItem",
    "ChunkItem",
    "ItemRef",
    "UnscannedItem",
    "item_pickle",
    "pickle_key",
    "scan_items",
    "too_large",
]

SCAN_LIMIT = 64 << 20  # bytes of pickle walked per directory (a few seconds at worst)
MAX_TENSOR_PICKLE = 64 << 10  # bytes of one tensor item's data.pkl (DCP writes ~150 to ~400)
TENSOR_SCAN_LIMIT = 64 << 20  # bytes of distinct data.pkl walked per directory (~8 s at worst)
_ZIP = b"PK\x03\x04"
_ALTERED = "The directory was altered after DCP wrote it; do not trust it"
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


class ChunkItem(NamedTuple):
    """A tensor chunk's item of the default layout: a ``torch.save`` archive of the chunk,
    ``length`` bytes at ``offset`` of ``file``."""

    key: str  # the flattened state-dict key of the tensor
    offsets: tuple[int, ...]  # where the chunk begins in it
    rel: str
    file: str
    offset: int
    length: int

    @property
    def what(self) -> str:
        return f"tensor {_key(self.key)}, chunk at [{', '.join(map(str, self.offsets))}]"


def item_pickle(
    path: str, mm: mmap.mmap, start: int, stop: int
) -> tuple[dict[str, _Member], str, _Member, int]:
    """The members of the ``torch.save`` archive that fills ``mm[start:stop]``, its ``<name>/``
    prefix, its ``data.pkl`` member and where that member's bytes begin (not read, not checked:
    its size may be anything). Raises :class:`CheckpointFormatError` if it is no such archive."""
    members = _zip_members(path, mm, start, stop)
    pkl = [name for name in members if name.rpartition("/")[2] == "data.pkl"]
    if len(pkl) != 1 or pkl[0].count("/") != 1:
        raise CheckpointFormatError(
            path,
            f"expected exactly one <name>/data.pkl in the zip, found {len(pkl)}",
            "This is not a torch.save archive",
        )
    member = members[pkl[0]]
    return members, pkl[0][: -len("data.pkl")], member, _data_offset(path, mm, member, stop)


def pickle_key(data: bytes) -> tuple[bytes, int]:
    """What a small pickle is cached by: its BLAKE2b digest and its length, not its bytes."""
    return hashlib.blake2b(data, digest_size=32).digest(), len(data)


def too_large(size: int) -> str:
    """Why a tensor item's ``data.pkl`` of ``size`` bytes is refused."""
    return (
        f"its data.pkl of {size:,} bytes is larger than the {MAX_TENSOR_PICKLE:,} bytes smartload "
        "reads for one tensor"
    )


TOO_LARGE_HINT = (
    "DCP writes a data.pkl of a few hundred bytes for each chunk; this item was not written by "
    "torch.distributed.checkpoint.save, do not trust the directory"
)


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
    chunks: Sequence[ChunkItem] = (),
) -> tuple[dict[str, BytesItem], list[str]]:
    """Each bytes item's description by key, and the globals the items name, bytes items' then
    tensor items' (file order, once each).

    Raises :class:`UnsafeCheckpointError` when an item names a hostile global (not in
    ``allow``), listing every one and the items naming them, ahead of ``besides`` (a problem
    the caller found with the directory, raised next) and of what is wrong with the items
    (overlapping, a tensor item's ``data.pkl`` too large or refused by the pre-scan)."""
    scanner = _Scanner(allow)
    described: dict[str, BytesItem] = {}
    try:
        for item in _in_file_order(items):
            overlap = scanner.overlap(item)
            if overlap is not None:
                scanner.problem(
                    f"bytes items {_key(overlap.key)} and {_key(item.key)} overlap in "
                    f"{brief(item.rel, 80)} (DCP writes each item once)"
                )
                continue
            described[item.key] = scanner.describe(item)
        for chunk in _in_file_order(chunks):
            scanner.chunk(chunk)
    finally:
        scanner.close()
    problem = besides.problem if besides is not None else None
    if scanner.hostile:
        first = scanner.problems[0][0] if scanner.problems else None
        raise _unsafe(directory, scanner.hostile, problem or first)
    if besides is not None:
        raise besides
    if scanner.problems:
        raise CheckpointFormatError(directory, *scanner.problems[0])
    return described, list(scanner.globals)


_Item = TypeVar("_Item", ItemRef, ChunkItem)


def _in_file_order(items: Sequence[_Item]) -> list[_Item]:
    return sorted(items, key=lambda item: (item.file, item.offset, item.length))


class _Scanner:
    def __init__(self, allow: frozenset[str]) -> None:
        self.allow = allow
        self.left = SCAN_LIMIT
        self.files: dict[str, tuple[int, mmap.mmap]] = {}  # real path → (descriptor, map)
        self.end: tuple[str, int] = ("", 0)  # where the previous item (in file order) ends
        self.last: ItemRef | None = None
        self.hostile: list[tuple[str, ItemRef | ChunkItem, list[tuple[str, str]]]] = []
        self.globals: dict[str, None] = {}
        self.problems: list[tuple[str, str]] = []  # (problem, hint), the first raised
        # tensor items: each distinct data.pkl walked and judged once, by its pickle_key
        self.pickles: dict[tuple[bytes, int], _Judged] = {}
        self.pickle_left = TENSOR_SCAN_LIMIT
        # the previous tensor item (in file order): its file, start and end
        self.chunk_end: tuple[str, int, int] = ("", 0, 0)
        self.chunk_last: ChunkItem | None = None

    def problem(self, problem: str, hint: str = _ALTERED) -> None:
        self.problems.append((problem, hint))

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
            self.hostile.append((f"bytes item {_key(item.key)}", item, hostile))
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

    def chunk(self, item: ChunkItem) -> None:
        """Judge the names a tensor item's ``data.pkl`` holds (items come in file order)."""
        file, start, end = self.chunk_end
        if (file, start, end) == (item.file, item.offset, item.offset + item.length):
            return  # the same item as the previous chunk's: judged once
        if file == item.file and item.offset < end and self.chunk_last is not None:
            self.problem(
                f"{self.chunk_last.what} and {item.what} overlap in {brief(item.rel, 80)} (DCP "
                "writes each item once)"
            )
            return
        self.chunk_end, self.chunk_last = (item.file, item.offset, item.offset + item.length), item
        _, mm = self._open(item)
        try:
            _, _, member, begin = item_pickle(item.file, mm, item.offset, item.offset + item.length)
        except CheckpointFormatError as exc:  # refused when read; its tensor data is no pickle
            logger.debug("%s of %s: no data.pkl to scan (%s)", item.what, item.rel, exc.problem)
            return
        if member.size > MAX_TENSOR_PICKLE:  # refused; what it names is looked at first
            take = min(member.size, self.pickle_left)
            self.pickle_left -= take
            self._found(item, _judge(mm[begin : begin + take], self.allow))
            self.problem(f"{item.what}: {too_large(member.size)}", TOO_LARGE_HINT)
            return
        data = mm[begin : begin + member.size]
        key = pickle_key(data)
        judged = self.pickles.get(key)
        if judged is None:
            if len(data) > self.pickle_left:
                self.problem(
                    f"{item.what}: its data.pkl is past the {TENSOR_SCAN_LIMIT:,} bytes of "
                    "distinct tensor pickles smartload walks in a directory",
                    "DCP writes one small data.pkl per dtype and shape; this many distinct ones "
                    "were not written by torch.distributed.checkpoint.save",
                )
                return
            self.pickle_left -= len(data)
            judged = self.pickles[key] = _judge(data, self.allow)
            if judged.unknown:
                logger.warning(
                    "%s of %s: its data.pkl names %s, which a tensor's never does; reading the "
                    "chunk will refuse it",
                    item.what,
                    item.rel,
                    ", ".join(judged.unknown[:4]),
                )
        self._found(item, judged)
        if judged.stopped is not None:
            self.problem(f"{item.what}: its data.pkl cannot be read ({judged.stopped})")

    def _found(self, item: ChunkItem, judged: _Judged) -> None:
        if judged.hostile:
            self.hostile.append((item.what, item, judged.hostile))
        self.globals.update(judged.names)

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

    def _open(self, item: ItemRef | ChunkItem) -> tuple[int, mmap.mmap]:
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


class _Judged(NamedTuple):
    """What one distinct tensor ``data.pkl`` names, judged."""

    hostile: list[tuple[str, str]]  # (qualname, reason)
    names: dict[str, None]  # the importable ones, in order
    unknown: list[str]
    stopped: str | None  # why the pre-scan refused it before its end (the names after unseen)


def _judge(data: bytes, allow: frozenset[str]) -> _Judged:
    """Walk a tensor item's ``data.pkl`` and judge its names. A malformed pickle ends the walk:
    the unpickler stops there too when the chunk is read."""
    named: list[tuple[str, str]] = []
    stopped = None
    try:
        walk_names(data, 0, named)
    except Refused as exc:
        stopped = str(exc)
    except ValueError:
        pass
    names = dict.fromkeys(f"{m}.{n}" for m, n in named if importable(m, n))
    return _Judged(hostile_names(named, allow), names, unknown_globals(names), stopped)


_SHOWN = 8  # items described in the message; a data.pkl is often shared by every chunk


def _unsafe(
    directory: str,
    hostile: list[tuple[str, ItemRef | ChunkItem, list[tuple[str, str]]]],
    besides: str | None,
) -> UnsafeCheckpointError:
    files = {item.file for _, item, _ in hostile}
    first = hostile[0][1]
    path = os.path.join(directory, first.rel) if len(files) == 1 else directory
    globals_ = list(dict.fromkeys(name for _, _, found in hostile for name, _ in found))
    parts = [
        f"{what} ({item.length:,} bytes at byte {item.offset:,} of {brief(item.rel, 80)}): "
        + ", ".join(f"{name}: {reason}" for name, reason in found)
        for what, item, found in hostile[:_SHOWN]
    ]
    if len(hostile) > _SHOWN:
        parts.append(f"{len(hostile) - _SHOWN:,} more items naming them")
    if any(type(item) is ItemRef for _, item, _ in hostile):
        parts.append("dcp.load would unpickle it with torch.load(weights_only=False)")
    if any(type(item) is ChunkItem for _, item, _ in hostile):
        parts.append(
            "a tensor item's data.pkl names torch's tensor rebuilds and storage types only"
        )
    detail = "; ".join(parts)
    if besides is not None:
        detail += f"; besides, {besides}"
    return UnsafeCheckpointError(path, globals_, detail=detail)


def _key(name: str) -> str:
    return brief(name, 200)
