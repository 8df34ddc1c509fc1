"""Reading checkpoint files: format detection and structure, without torch and without tensor data.

:func:`read` returns a :class:`RawCheckpoint`: the file's object tree with tensors as records
(:class:`TensorRecord` for torch and safetensors files, :class:`ArrayRecord` for numpy pickles,
:class:`ChunkedRecord` for ``torch.distributed.checkpoint`` directories, read by ``_dcp.py``), and
for every storage the byte range in which its data lies. Nothing here reads tensor bytes.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

from ._gc import gc_paused
from ._hostile_scan import refuse_if_hostile
from ._records import DTYPE_ITEMSIZE, MAX_NDIM, MAX_NUMEL, Refused, StorageRef, TensorRecord, brief
from ._unpickler import Marker, is_stand_in_class, marker, refuse_unsupported_tensor, unpickle
from .errors import CheckpointFormatError

__all__ = ["RawCheckpoint", "Source", "read"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# a legacy file saved with pickle_protocol 0 or 1 opens with the magic number as a text LONG
_LEGACY_MAGIC_TEXT = b"L%dL\n." % _LEGACY_MAGIC
_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
    "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip
_ZIP_FORBIDDEN_FLAGS = 0x1 | 0x40 | 0x2000  # encrypted, strong encryption, masked directory
DCP_METADATA = ".metadata"  # what makes a directory a torch.distributed.checkpoint one


class Source(NamedTuple):
    """Where a storage's bytes are: ``nbytes`` at ``offset`` in ``file``; ``crc`` if the zip has one."""

    file: str
    offset: int
    nbytes: int
    crc: int | None = None


@dataclass
class RawCheckpoint:
    path: str
    format: str
    tree: Any
    sources: dict[str, Source] = field(default_factory=dict)
    globals: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def read(
    path: str | os.PathLike[str], *, symbolic: bool = False, allow_globals: Iterable[str] = ()
) -> RawCheckpoint:
    """Read a checkpoint file or directory's structure. See the module docstring."""
    with gc_paused():
        try:
            return _read(os.fspath(path), symbolic, frozenset(allow_globals))
        except CheckpointFormatError as exc:  # a hostile global anywhere is reported first
            # (a DCP .metadata is judged by its own reader, against its own allowlist)
            if not _is_dcp(os.fspath(path)):
                refuse_if_hostile(os.fspath(path), exc, frozenset(allow_globals))
            raise


# the directories and shard indexes being read, outermost first: (real path, path as named)
_Trail = tuple[tuple[str, str], ...]


def _read(path: str, symbolic: bool, allow: frozenset[str], trail: _Trail = ()) -> RawCheckpoint:
    """Read ``path``, reached through the directories and shard indexes of ``trail``."""
    st = _stat(path)
    trail = _enter(path, trail)
    if stat.S_ISDIR(st.st_mode):
        return _read_directory(path, symbolic, allow, trail)
    _check_regular(path, st)
    if os.path.basename(path) == DCP_METADATA and _is_pickle(path):  # a DCP directory's own
        from ._dcp import read_dcp

        return read_dcp(os.path.dirname(os.path.abspath(path)), allow)
    if st.st_size == 0:
        raise CheckpointFormatError(path, "empty file (0 bytes)", "The download or save failed")
    with open(path, "rb") as f:
        head = f.read(512)
    kind = _sniff(path, head, st.st_size)
    if kind == "zip":
        return _read_torch_zip(path, symbolic, allow)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "index":
        return _read_index(path, symbolic, allow, trail)
    return _read_pickle(path, symbolic, allow)


_MAX_NESTING = 8  # directories and shard indexes leading to one another: real ones nest 2 deep


def _enter(path: str, trail: _Trail) -> _Trail:
    """``trail`` and ``path``, refusing a path that leads back to one of ``trail`` (an index
    naming itself, two naming each other) or that nests too deep. Errors name the outermost
    path, the one the caller gave."""
    real = _realpath(path)
    if real in {seen for seen, _ in trail}:
        problem = (
            "names itself as a shard"
            if real == trail[-1][0]
            else f"names {path}, which is already being read (shard indexes naming each other)"
        )
        if len(trail) > 1:  # named by a file the caller did not name: say which
            problem = f"{trail[-1][1]} {problem}"
        raise CheckpointFormatError(trail[0][1], problem, _NESTING_HINT)
    if len(trail) >= _MAX_NESTING:
        raise CheckpointFormatError(
            trail[0][1],
            f"shard indexes or directories nested more than {_MAX_NESTING} deep (at {path})",
            _NESTING_HINT,
        )
    return (*trail, (real, path))


_NESTING_HINT = "The shards of an index must be weights files; regenerate the index"


def _realpath(path: str, index: str = "") -> str:
    """``os.path.realpath``, which recurses once per link in Python < 3.13: a chain of 1,500
    links is refused here rather than overflowing the stack (naming ``index``, for a shard)."""
    try:
        return os.path.realpath(path)
    except (OSError, RecursionError):
        problem = "cannot resolve its symbolic links (a loop, or a chain too long)"
        if index:
            shard = brief(os.path.basename(path))
            raise CheckpointFormatError(index, f"shard {shard}: {problem}") from None
        raise CheckpointFormatError(path, problem) from None


def _stat(path: str) -> os.stat_result:
    """stat ``path`` (the kernel refuses a chain or loop of more than 40 symbolic links)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise CheckpointFormatError(path, "no such file or directory") from None
    except OSError as exc:
        raise CheckpointFormatError(path, f"cannot stat: {exc.strerror}") from None


def _check_regular(path: str, st: os.stat_result) -> None:
    """Refuse what is not a regular file (a FIFO would block a read for ever)."""
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointFormatError(
            path, "not a regular file (a device, FIFO or socket)", "Pass the checkpoint file itself"
        )


def _regular_file(path: str) -> os.stat_result:
    """stat ``path``, refusing what is not a regular file."""
    st = _stat(path)
    _check_regular(path, st)
    return st


def _sniff(path: str, head: bytes, size: int) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n <= size - 8:
            return "safetensors"
    if head.startswith(b"{"):
        return "index"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head.startswith(_LEGACY_MAGIC_TEXT):
        return "pickle"
    if head[:1] in (b"(", b"}", b"]", b"c") and size > 1:  # protocol 0/1 pickles (py2 .pkl)
        return "pickle"
    if head.startswith(b"\x1f\x8b"):
        problem, hint = "gzip-compressed data", "Decompress it first (gunzip) and pass the result"
    elif head[257:262] == b"ustar":
        problem = "a tar archive (torch's pre-0.4 legacy tar format, or not a checkpoint)"
        hint = "Re-save it with a current torch in a trusted environment, or get a newer release"
    elif head.startswith(b"\x89PNG"):
        problem, hint = "a PNG image, not a checkpoint", "Check the file you downloaded"
    elif len(head) >= 8 and head[8:9] == b"{":
        problem = "a safetensors header length larger than the file (truncated)"
        hint = "Download the file again"
    else:
        problem = f"unknown format (starts with {head[:8].hex(' ')})"
        hint = (
            "smartload reads torch .pth/.pt/.bin/.ckpt, safetensors, detectron2 .pkl and "
            "*.index.json shard indexes"
        )
    raise CheckpointFormatError(path, problem, hint)


# --------------------------------------------------------------------------------------------------
# torch zip


def _read_torch_zip(path: str, symbolic: bool, allow: frozenset[str]) -> RawCheckpoint:
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        tree, sources, globals_ = torch_zip_tree(path, mm, symbolic, allow)
    finally:
        mm.close()
    return RawCheckpoint(path, "torch-zip", tree, sources, globals_)


def torch_zip_tree(
    path: str, mm: mmap.mmap, symbolic: bool, allow: frozenset[str]
) -> tuple[Any, dict[str, Source], list[str]]:
    """The object tree, storage sources and globals of the ``torch.save`` archive ``mm``."""
    members, prefix, pickle_bytes = torch_zip_pickle(path, mm)
    storages: dict[str, StorageRef] = {}
    sources: dict[str, Source] = {}

    def persistent_load(pid: Any) -> StorageRef:
        ref = storage_ref(pid, storages)
        key = ref.key
        if key not in sources:
            sources[key] = storage_source(path, mm, members, prefix, ref)
        return ref

    tree, globals_ = unpickle(
        io.BytesIO(pickle_bytes),
        path=path,
        member=f"{prefix}data.pkl",
        symbolic=symbolic,
        allow_globals=allow,
        persistent_load=persistent_load,
        end=len(pickle_bytes),
    )
    return tree, sources, globals_


def torch_zip_pickle(
    path: str, mm: mmap.mmap, start: int = 0, end: int | None = None
) -> tuple[dict[str, _Member], str, bytes]:
    """The members of the ``torch.save`` archive that fills ``mm[start:end]`` (the whole file by
    default; one item of a DCP ``.distcp`` file, whose zip offsets count from the item's start),
    its ``<name>/`` prefix, and its ``data.pkl`` (CRC checked). Little-endian only."""
    members = _zip_members(path, mm, start, end)
    pkl = [name for name in members if name.rpartition("/")[2] == "data.pkl"]
    if len(pkl) != 1 or pkl[0].count("/") != 1:
        raise CheckpointFormatError(
            path,
            f"expected exactly one <name>/data.pkl in the zip, found {len(pkl)}",
            "This is not a torch.save archive",
        )
    prefix = pkl[0][: -len("data.pkl")]
    order = members.get(prefix + "byteorder")
    if order is not None and _member_bytes(path, mm, order, end=end) != b"little":
        raise CheckpointFormatError(path, "a big-endian checkpoint", "Re-save it on x86/ARM")
    return members, prefix, _member_bytes(path, mm, members[pkl[0]], check_crc=True, end=end)


def storage_source(
    path: str,
    mm: mmap.mmap,
    members: dict[str, _Member],
    prefix: str,
    ref: StorageRef,
    end: int | None = None,
) -> Source:
    """Where the storage ``ref`` of a ``torch.save`` archive lies (raises :class:`Refused`)."""
    member = members.get(f"{prefix}data/{ref.key}")
    if member is None:
        raise Refused(f"storage {ref.key!r} is missing")
    offset = _data_offset(path, mm, member, end)
    if member.size < ref.nbytes:
        raise Refused(
            f"storage {member.name!r} declares {ref.nbytes} bytes but holds {member.size}"
        )
    return Source(path, offset, ref.nbytes, member.crc)


class _Member(NamedTuple):
    """A stored zip member, from the central directory."""

    name: str
    raw_name: bytes  # as the central directory spells it; the local header must agree
    header_offset: int
    size: int
    crc: int


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record, 22 bytes
_EOCD64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes, just before the end record
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # 56 bytes
# central directory entry (46 bytes + name ...): signature, flags, method, crc, compressed and
# uncompressed sizes, name/extra/comment lengths, local header offset; "x": fields not read
_CENTRAL = struct.Struct("<4s4x2H4x3L3H8xL")
# local header (30 bytes + name + extra): signature, method, name and extra lengths
_LOCAL = struct.Struct("<4s4xH16x2H")
_ZIP64_MARK = 0xFFFFFFFF


def _zip_members(
    path: str, mm: mmap.mmap, start: int = 0, stop: int | None = None
) -> dict[str, _Member]:
    """The central directory, checked: one entry per name, stored (not compressed), unencrypted,
    inside the file. Our own reader rather than ``zipfile``: it costs 1 µs per member instead of
    3.5, and it keeps the raw names for the local-header check.

    The archive fills ``mm[start:stop]`` (the whole file by default): its own offsets count from
    ``start``; the members' header offsets returned are absolute."""
    stop = len(mm) if stop is None else stop
    size = stop - start

    def corrupt(problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(path, f"corrupt zip archive ({problem})", "Download it again")

    # the end record is the last 22 bytes, unless a comment (up to 64 KB) follows it
    floor, end = max(start, stop - _EOCD.size - 0xFFFF), stop
    while True:
        end = mm.rfind(b"PK\x05\x06", floor, end)
        if end < 0 or end + _EOCD.size > stop:
            raise corrupt("no end of central directory record; the file is truncated")
        *_, comment_length = _EOCD.unpack_from(mm, end)
        if end + _EOCD.size + comment_length == stop:
            break
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(mm, end)
    if disk or cd_disk:
        raise corrupt("a multi-disk archive")
    if count == 0xFFFF or cd_size == _ZIP64_MARK or cd_offset == _ZIP64_MARK:
        locator = end - _EOCD64_LOCATOR.size
        if locator < start or mm[locator : locator + 4] != b"PK\x06\x07":
            raise corrupt("zip64 end record locator missing")
        at = start + _EOCD64_LOCATOR.unpack_from(mm, locator)[2]
        if at + _EOCD64.size > locator or mm[at : at + 4] != b"PK\x06\x06":
            raise corrupt("zip64 end record missing")
        *_, count, cd_size, cd_offset = _EOCD64.unpack_from(mm, at)
        end = at
    if start + cd_offset + cd_size > end:
        raise corrupt("the central directory lies outside the file")
    entries = []
    unpack = _CENTRAL.unpack_from
    pos, cd_end = start + cd_offset, start + cd_offset + cd_size
    for _ in range(count):
        if pos + _CENTRAL.size > cd_end:
            raise corrupt("the central directory is truncated")
        sig, flags, method, crc, csize, usize, nlen, xlen, clen, offset = unpack(mm, pos)
        if sig != b"PK\x01\x02":
            raise corrupt(f"bad central directory entry at byte {pos}")
        raw = mm[pos + 46 : pos + 46 + nlen]
        try:
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            raise corrupt(f"a member name that is not UTF-8 ({raw[:80]!r})") from None
        if _ZIP64_MARK in (usize, csize, offset):
            usize, csize, offset = _zip64_extra(
                mm[pos + 46 + nlen : pos + 46 + nlen + xlen], usize, csize, offset, corrupt
            )
        pos += 46 + nlen + xlen + clen
        entries.append((name, raw, flags, method, crc, csize, usize, offset))
    if any("/code/" in e[0] or e[0].endswith("constants.pkl") for e in entries):
        raise CheckpointFormatError(
            path,
            "a TorchScript archive (it contains code/ and constants.pkl)",
            "smartload never runs TorchScript; export a state dict with "
            "torch.save(model.state_dict()) from code you trust",
        )
    members: dict[str, _Member] = {}
    for name, raw, flags, method, crc, csize, usize, offset in entries:
        if name in members:
            raise CheckpointFormatError(
                path, f"duplicate zip member {name!r}", "The archive was tampered with"
            )
        if method != zipfile.ZIP_STORED:
            raise CheckpointFormatError(
                path,
                f"zip member {name!r} is compressed (method {method})",
                "torch.save never compresses; the archive was made by another tool",
            )
        if flags & _ZIP_FORBIDDEN_FLAGS:
            raise CheckpointFormatError(
                path, f"zip member {name!r} is encrypted (flags {flags:#x})"
            )
        if usize != csize or offset + usize > size:
            raise CheckpointFormatError(
                path,
                f"zip member {name!r} declares {usize} bytes, more than the file",
                "The file is truncated or was tampered with",
            )
        members[name] = _Member(name, raw, start + offset, usize, crc)
    return members


def _zip64_extra(
    extra: bytes, usize: int, csize: int, offset: int, corrupt: Any
) -> tuple[int, int, int]:
    """The 64-bit sizes and offset a zip64 extra field holds for the 32-bit fields set to ~0."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, pos)
        if pos + 4 + length > len(extra):
            raise corrupt("an extra field longer than the space it has")
        if tag == 1:
            values = list(struct.unpack_from(f"<{min(length, 24) // 8}Q", extra, pos + 4))
            out = []
            for field in (usize, csize, offset):
                if field == _ZIP64_MARK:
                    if not values:
                        raise corrupt("a zip64 extra field too short")
                    field = values.pop(0)
                out.append(field)
            return out[0], out[1], out[2]
        pos += 4 + length
    raise corrupt("a zip64 member without its zip64 extra field")


def _data_offset(path: str, mm: mmap.mmap, member: _Member, stop: int | None = None) -> int:
    """Where ``member``'s data begins (its archive ends at ``stop``, by default the file's end)."""
    stop = len(mm) if stop is None else stop
    start = member.header_offset
    if start + _LOCAL.size > stop:
        raise CheckpointFormatError(path, f"zip member {member.name!r}: bad local header")
    sig, method, name_len, extra_len = _LOCAL.unpack_from(mm, start)
    if sig != b"PK\x03\x04":
        raise CheckpointFormatError(path, f"zip member {member.name!r}: bad local header")
    name = mm[start + 30 : start + 30 + name_len]
    if name != member.raw_name:
        raise CheckpointFormatError(
            path,
            f"zip member {member.name!r}: local header names {name[:80]!r}",
            "The archive was tampered with (local/central name mismatch)",
        )
    if method != zipfile.ZIP_STORED:
        raise CheckpointFormatError(path, f"zip member {member.name!r} is compressed")
    offset: int = start + 30 + name_len + extra_len
    if offset + member.size > stop:
        raise CheckpointFormatError(path, f"zip member {member.name!r} is truncated")
    return offset


def _member_bytes(
    path: str, mm: mmap.mmap, member: _Member, check_crc: bool = False, end: int | None = None
) -> bytes:
    offset = _data_offset(path, mm, member, end)
    data = mm[offset : offset + member.size]
    if check_crc and zlib.crc32(data) != member.crc:
        raise CheckpointFormatError(
            path, f"CRC mismatch in zip member {member.name!r}", "The file is corrupt"
        )
    return data


def storage_ref(pid: Any, storages: dict[str, StorageRef]) -> StorageRef:
    if type(pid) is str:
        pid = _text_pid(pid)
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
        raise Refused(f"an unknown persistent id ({brief(pid)})")
    _, storage_type, key, location, numel = pid[:5]
    if len(pid) == 6 and pid[5] is not None:
        raise Refused("a legacy storage view (not supported)")
    refuse_unsupported_tensor(getattr(storage_type, "qualname", ""))
    if not (
        isinstance(storage_type, Marker)
        and storage_type.qualname.endswith("Storage")
        and storage_type.value in DTYPE_ITEMSIZE
    ):
        raise Refused(f"a persistent id with storage type {brief(storage_type)}")
    if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int:
        raise Refused("a malformed storage persistent id")
    if not 0 <= numel < 2**48 or "/" in key or key.startswith(".") or len(key) > 64:
        raise Refused(f"a storage {brief(key)} of {brief(numel)} elements")
    ref = storages.get(key)
    if ref is None:
        ref = storages[key] = StorageRef(key, storage_type.value, numel, location)
    elif ref.nbytes != numel * DTYPE_ITEMSIZE[storage_type.value]:
        raise Refused(f"storage {key!r} declared twice with different sizes")
    return ref


# pickle_protocol=0 writes a persistent id as its str(): torch.save's tuple becomes
# "('storage', <class 'torch.FloatStorage'>, '0', 'cpu', 12)" (legacy files add ", None", the
# view; Python 2 writes u'...' and 12L). torch.load cannot read it back; smartload parses exactly
# that, and the class named must be a storage type.
_TEXT_PID = re.compile(
    r"\('storage', <class '([\w.]{1,64})'>, u?'(\w{1,64})', u?'([\w:.-]{1,64})', (\d{1,15})L?"
    r"(?:, None)?\)",
    re.ASCII,
)


def _text_pid(pid: str) -> tuple[Any, ...]:
    """The tuple a protocol-0 persistent id stands for, with the storage type as its marker."""
    match = _TEXT_PID.fullmatch(pid)
    storage_type = match and marker(match[1])
    if match is None or storage_type is None:
        raise Refused(f"an unknown persistent id ({brief(pid)})")
    return ("storage", storage_type, match[2], match[3], int(match[4]))


def _legacy_ref(pid: Any, storages: dict[str, StorageRef]) -> Any:
    """Legacy ``torch.save(model)`` names each module class as ``("module", cls, file, source)``
    (torch only compares the source with the installed one): the class's inert stand-in."""
    if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
        if not is_stand_in_class(pid[1]):
            raise Refused(f"a module persistent id naming {brief(pid[1])}")
        return pid[1]
    return storage_ref(pid, storages)


# --------------------------------------------------------------------------------------------------
# pickles: torch legacy (stacked pickles + raw storages) and plain pickles (detectron2 .pkl)


def _read_pickle(path: str, symbolic: bool, allow: frozenset[str]) -> RawCheckpoint:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first, globals_ = unpickle(
            f, path=path, symbolic=symbolic, allow_globals=allow, encoding="latin1"
        )
        if type(first) is int:
            return _read_legacy(path, f, size, first, symbolic, allow)
        _expect_end(path, f, size)
    return RawCheckpoint(path, "pickle", first, {}, globals_)


def _read_legacy(
    path: str, f: BinaryIO, size: int, magic: int, symbolic: bool, allow: frozenset[str]
) -> RawCheckpoint:
    if magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(path, "a pickle of a bare integer, not a checkpoint")

    def load(**kwargs: Any) -> Any:
        obj, seen = unpickle(f, path=path, symbolic=symbolic, allow_globals=allow, **kwargs)
        globals_.extend(g for g in seen if g not in globals_)
        return obj

    globals_: list[str] = []
    if load() != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(path, "unsupported legacy torch protocol version")
    load()  # sys_info: endianness and type sizes
    storages: dict[str, StorageRef] = {}
    tree = load(persistent_load=lambda pid: _legacy_ref(pid, storages), encoding="latin1")
    keys = load()
    if (
        not isinstance(keys, list)
        or not all(isinstance(k, str) for k in keys)
        or set(keys) != set(storages)
        or len(keys) != len(storages)
    ):
        raise CheckpointFormatError(path, "legacy storage list does not match the pickle")
    sources: dict[str, Source] = {}
    pos = f.tell()
    for key in keys:
        ref = storages[key]
        f.seek(pos)
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointFormatError(path, f"truncated before storage {key!r}")
        (numel,) = struct.unpack("<q", raw)
        if numel != ref.numel or pos + 8 + ref.nbytes > size:
            raise CheckpointFormatError(
                path,
                f"storage {key!r} declares {ref.numel} elements; the file has {numel} "
                f"and {max(size - pos - 8, 0)} bytes left",
                "The file is truncated or was tampered with",
            )
        sources[key] = Source(path, pos + 8, ref.nbytes)
        pos += 8 + ref.nbytes
    if pos != size:
        raise CheckpointFormatError(path, f"{size - pos} unexpected byte(s) after the last storage")
    return RawCheckpoint(path, "torch-legacy", tree, sources, globals_)


def _expect_end(path: str, f: BinaryIO, size: int) -> None:
    extra = size - f.tell()
    if extra:
        raise CheckpointFormatError(
            path,
            f"{extra} unexpected byte(s) after the pickle's end",
            "The file was altered after it was written (or is a polyglot); do not trust it",
        )


# --------------------------------------------------------------------------------------------------
# safetensors


def _read_safetensors(path: str, key_prefix: str = "") -> RawCheckpoint:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(path, "truncated safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > _SAFETENSORS_MAX_HEADER or 8 + n > size:
            raise CheckpointFormatError(
                path, f"safetensors header length {n} exceeds the file or the 100 MB limit"
            )
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointFormatError(path, f"safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointFormatError(path, "safetensors __metadata__ is not a str → str map")
    base = 8 + n
    tree: dict[str, TensorRecord] = {}
    sources: dict[str, Source] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        dtype, shape, begin, end = _safetensors_entry(path, name, entry)
        numel = math.prod(shape)
        if end - begin != numel * DTYPE_ITEMSIZE[dtype]:
            raise CheckpointFormatError(
                path,
                f"tensor {name!r}: offsets [{begin}, {end}] hold {end - begin} bytes, "
                f"shape {list(shape)} {dtype} needs {numel * DTYPE_ITEMSIZE[dtype]}",
            )
        spans.append((begin, end, name))
        key = key_prefix + name
        ref = StorageRef(key, dtype, numel, "file")
        stride = _contiguous_strides(shape)
        tree[name] = TensorRecord(ref, 0, shape, stride, dtype)
        sources[key] = Source(path, base + begin, end - begin)
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            problem = (
                "overlaps the previous tensor" if begin < expected else "leaves a gap before it"
            )
            raise CheckpointFormatError(
                path, f"tensor {name!r} at byte {begin} {problem}", "The file is corrupt or crafted"
            )
        expected = end
    if base + expected != size:
        problem = "is truncated" if base + expected > size else "has trailing bytes"
        raise CheckpointFormatError(
            path,
            f"the data area {problem}: tensors end at {base + expected}, file has {size} bytes",
            "Download it again; do not trust a file with hidden content",
        )
    return RawCheckpoint(path, "safetensors", tree, sources, [], metadata)


def _safetensors_entry(path: str, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict):
        raise CheckpointFormatError(path, f"tensor {name!r}: header entry is not an object")
    code = entry.get("dtype")
    dtype = _SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CheckpointFormatError(path, f"tensor {name!r}: unknown dtype {brief(code)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_NDIM
        and all(type(s) is int and 0 <= s <= MAX_NUMEL for s in shape)
        and math.prod(shape) <= MAX_NUMEL
    ):
        raise CheckpointFormatError(path, f"tensor {name!r}: invalid shape ({brief(shape)})")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and 0 <= o < 2**62 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise CheckpointFormatError(
            path, f"tensor {name!r}: invalid data_offsets ({brief(offsets)})"
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


# --------------------------------------------------------------------------------------------------
# sharded checkpoints and directories

_DIRECTORY_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _read_directory(
    path: str, symbolic: bool, allow: frozenset[str], trail: _Trail
) -> RawCheckpoint:
    if _is_dcp(path):  # torch.distributed.checkpoint
        from ._dcp import read_dcp  # it reads the archives in .distcp files with this module

        return read_dcp(path, allow)
    for name in _DIRECTORY_CANDIDATES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return _read(candidate, symbolic, allow, trail)
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise CheckpointFormatError(path, f"cannot list the directory: {exc.strerror}") from None
    for suffix in (".safetensors.index.json", ".safetensors", ".bin.index.json"):
        found = [n for n in names if n.endswith(suffix)]
        if len(found) == 1:
            return _read(os.path.join(path, found[0]), symbolic, allow, trail)
    raise CheckpointFormatError(
        path,
        f"a directory without a checkpoint smartload recognises (contains: {', '.join(names[:8])})",
        "Pass the checkpoint file, or a directory holding model.safetensors[.index.json], "
        "pytorch_model.bin[.index.json] or a torch.distributed.checkpoint save (.metadata)",
    )


def _is_dcp(path: str) -> bool:
    """Whether ``path`` is a DCP directory, or its ``.metadata``."""
    if os.path.basename(path) != DCP_METADATA:
        path = os.path.join(path, DCP_METADATA)
    return os.path.isfile(path) and _is_pickle(path)


def _is_pickle(path: str) -> bool:
    """Whether the file opens like a pickle of protocol 2 or later (a DCP ``.metadata`` does;
    a JSON one some writers leave does not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")


def _read_index(path: str, symbolic: bool, allow: frozenset[str], trail: _Trail) -> RawCheckpoint:
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read(_SAFETENSORS_MAX_HEADER + 1))
    except (ValueError, RecursionError) as exc:
        raise CheckpointFormatError(path, f"not a valid JSON shard index ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointFormatError(path, "a JSON file without a str → str 'weight_map'")
    folder = _realpath(os.path.dirname(os.path.abspath(path)))
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    tree: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    globals_: list[str] = []
    formats = set()
    for shard, keys in shards.items():
        shard_path = _realpath(os.path.join(folder, shard), index=path)
        if os.path.isabs(shard) or os.path.dirname(shard_path) != folder:
            raise CheckpointFormatError(
                path,
                f"shard {shard!r} lies outside the index's directory",
                "The index was tampered with; shard names must be plain file names",
            )
        if not shard.endswith((".safetensors", ".bin", ".pt", ".pth")):
            raise CheckpointFormatError(path, f"shard {brief(shard)} is not a weights file")
        _regular_file(shard_path)
        part = (
            _read_safetensors(shard_path, key_prefix=f"{shard}:")
            if shard.endswith(".safetensors")
            else _read(shard_path, symbolic, allow, trail)
        )
        formats.add(part.format)
        flat = part.tree
        if not isinstance(flat, dict):
            raise CheckpointFormatError(shard_path, "a shard that is not a flat state dict")
        for key in keys:
            if key not in flat:
                raise CheckpointFormatError(path, f"key {key!r} is not in its shard {shard!r}")
            tree[key] = flat[key]
        for storage_key, source in part.sources.items():
            sources[storage_key if part.format == "safetensors" else f"{shard}:{storage_key}"] = (
                source
            )
        if part.format != "safetensors":
            tree.update({k: _rekey(tree[k], shard) for k in keys})
        globals_.extend(g for g in part.globals if g not in globals_)
    fmt = "safetensors-sharded" if formats <= {"safetensors"} else "torch-sharded"
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return RawCheckpoint(
        path, fmt, tree, sources, globals_, {k: str(v) for k, v in metadata.items()}
    )


def _rekey(record: Any, shard: str) -> Any:
    """Qualify a torch shard's storage keys with the shard name (keys repeat across shards)."""
    from dataclasses import replace

    if isinstance(record, TensorRecord):
        return replace(record, storage=replace(record.storage, key=f"{shard}:{record.storage.key}"))
    return record
