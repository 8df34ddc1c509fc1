"""A tiny pickle assembler for crafting hostile and malformed checkpoints in tests.

``assemble(obj)`` writes a protocol-2 pickle of ``obj`` where :class:`Global`, :class:`Call`,
:class:`New`, :class:`Build`, :class:`Pid`, :class:`Put` and :class:`Get` stand for the GLOBAL,
REDUCE, NEWOBJ, BUILD, BINPERSID and memo opcodes, so a test can name any global (real or not)
without that global existing or being importable here.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(frozen=True)
class Call:
    fn: Any
    args: tuple[Any, ...]


@dataclass(frozen=True)
class New:
    """``cls.__new__(cls, *args)``: how protocol 2 pickles an object (an ``nn.Module``)."""

    cls: Any
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Build:
    obj: Any
    state: Any


@dataclass(frozen=True)
class Pid:
    value: Any


@dataclass(frozen=True)
class Put:
    """``obj``, then LONG_BINPUT: memoized at ``index``."""

    obj: Any
    index: int


@dataclass(frozen=True)
class Get:
    """LONG_BINGET: the object memoized at ``index`` (shared, as pickle shares)."""

    index: int


@dataclass(frozen=True)
class Seq:
    """Each part in turn, left on the stack (``Raw`` opcodes in between act on them)."""

    parts: tuple[Any, ...]


@dataclass(frozen=True)
class Raw:
    """Opcodes inserted as they are."""

    data: bytes


def assemble(obj: Any, protocol: int = 2) -> bytes:
    out = bytearray(b"\x80" + bytes([protocol]))
    _emit(out, obj)
    return bytes(out + b".")


def _emit(out: bytearray, o: Any) -> None:
    if isinstance(o, Raw):
        out += o.data
    elif isinstance(o, Global):
        out += b"c" + f"{o.module}\n{o.name}\n".encode()
    elif isinstance(o, Call):
        _emit(out, o.fn)
        _emit(out, tuple(o.args))
        out += b"R"
    elif isinstance(o, Seq):
        for part in o.parts:
            _emit(out, part)
    elif isinstance(o, Put):
        _emit(out, o.obj)
        out += b"r" + struct.pack("<I", o.index)
    elif isinstance(o, Get):
        out += b"j" + struct.pack("<I", o.index)
    elif isinstance(o, New):
        _emit(out, o.cls)
        _emit(out, tuple(o.args))
        out += b"\x81"
    elif isinstance(o, Build):
        _emit(out, o.obj)
        _emit(out, o.state)
        out += b"b"
    elif isinstance(o, Pid):
        _emit(out, o.value)
        out += b"Q"
    elif isinstance(o, tuple):
        out += b"("
        for x in o:
            _emit(out, x)
        out += b"t"
    elif isinstance(o, list):
        out += b"]("
        for x in o:
            _emit(out, x)
        out += b"e"
    elif isinstance(o, dict):
        out += b"}("
        for k, v in o.items():
            _emit(out, k)
            _emit(out, v)
        out += b"u"
    elif o is None:
        out += b"N"
    elif o is True or o is False:
        out += b"\x88" if o else b"\x89"
    elif isinstance(o, int) and -(2**31) <= o < 2**31:
        out += b"J" + struct.pack("<i", o)
    elif isinstance(o, int):  # LONG1: little-endian two's complement
        data = o.to_bytes((o.bit_length() + 8) // 8, "little", signed=True)
        out += b"\x8a" + bytes([len(data)]) + data
    elif isinstance(o, float):
        out += b"G" + struct.pack(">d", o)
    elif isinstance(o, str):
        data = o.encode()
        out += b"X" + struct.pack("<I", len(data)) + data
    else:
        raise TypeError(type(o))


REBUILD = Global("torch._utils", "_rebuild_tensor_v2")
FLOAT_STORAGE = Global("torch", "FloatStorage")
ORDERED_DICT = Call(Global("collections", "OrderedDict"), ())


def tensor(
    key: str, numel: int, shape: tuple[int, ...], stride: tuple[int, ...], offset: int = 0
) -> Call:
    """``_rebuild_tensor_v2`` of float32 storage ``key`` declared with ``numel`` elements."""
    storage = Pid(("storage", FLOAT_STORAGE, key, "cpu", numel))
    return Call(REBUILD, (storage, offset, shape, stride, False, ORDERED_DICT))


def torch_zip(path: Path, data_pkl: bytes, storages: Mapping[str, bytes] = {}) -> Path:
    """A zip laid out as torch.save writes it, around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", b"little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", b"3\n")
    return path
