"""What the reader builds instead of objects: records of tensors, arrays and inert stand-ins.

No torch, no numpy: a record says where a tensor's bytes are and what they mean; the bytes are read
only when a plan needs them (``_tensors.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DTYPE_ITEMSIZE",
    "MAX_NDIM",
    "MAX_NUMEL",
    "ArrayRecord",
    "Chunk",
    "ChunkedRecord",
    "Describer",
    "Refused",
    "StandIn",
    "StorageRef",
    "TensorRecord",
    "brief",
    "describe",
    "is_leaf",
    "is_module",
]

MAX_NDIM = 64
MAX_NUMEL = 2**48

# --------------------------------------------------------------------------------------------------
# dtypes (names as torch spells them; itemsize in bytes)

DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
}  # fmt: skip

TORCH_DTYPE_ALIASES = {
    "float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
    "short": "int16", "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32",
}  # fmt: skip

STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}  # fmt: skip

# numpy dtype codes (kind + itemsize) to torch dtype names
NUMPY_DTYPES = {
    "f8": "float64", "f4": "float32", "f2": "float16", "c16": "complex128", "c8": "complex64",
    "i8": "int64", "i4": "int32", "i2": "int16", "i1": "int8",
    "u8": "uint64", "u4": "uint32", "u2": "uint16", "u1": "uint8", "b1": "bool",
}  # fmt: skip
NUMPY_CHAR_CODES = {
    "d": "f8", "f": "f4", "e": "f2", "D": "c16", "F": "c8", "q": "i8", "l": "i8", "i": "i4",
    "h": "i2", "b": "i1", "Q": "u8", "L": "u8", "I": "u4", "H": "u2", "B": "u1", "?": "b1",
    "float64": "f8", "float32": "f4", "float16": "f2", "int64": "i8", "int32": "i4",
    "int16": "i2", "int8": "i1", "uint8": "u1", "bool": "b1",
}  # fmt: skip

# --------------------------------------------------------------------------------------------------
# records


class Refused(Exception):
    """Raised inside the pickle machine; turned into a smartload error by :func:`unpickle`.
    ``hint`` says what to do where the default (the file is corrupt) would mislead."""

    def __init__(self, message: str, hostile: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.hostile = hostile
        self.hint = hint


class _Sealed:
    """BUILD would write straight into a record's ``__dict__`` or slots: refuse it.

    Records are value objects, never changed after they are made (``dataclasses.replace`` makes
    new ones); they are not ``frozen=True`` only because a frozen ``__init__`` costs 1 µs more per
    record, paid 60,000 times for a 20,000-tensor checkpoint.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise Refused(f"BUILD applied to a {type(self).__name__}")


def brief(value: Any, limit: int = 40) -> str:
    """A bounded description of a value from the file (its repr may be huge or deep)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if abs(value) < 10**18 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, tuple | list | dict | set | frozenset):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {getattr(value, 'qualname', type(value).__name__)}"


@dataclass(slots=True, unsafe_hash=True)
class StorageRef(_Sealed):
    """A storage in the file: where its bytes are is up to the format reader (``key``)."""

    key: str
    dtype: str
    numel: int
    location: str

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]


@dataclass(slots=True, unsafe_hash=True)
class TensorRecord(_Sealed):
    """A tensor in a torch pickle: a view into a storage. No data is read to make one."""

    storage: StorageRef
    offset: int  # in elements of ``dtype``
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False
    is_parameter: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


@dataclass(slots=True, unsafe_hash=True)
class Chunk(_Sealed):
    """One saved piece of a tensor in a DCP directory: the box of the global tensor at
    ``offsets`` (first index per dimension) of ``sizes`` elements, stored as one item of
    ``length`` bytes at byte ``offset`` of ``file`` (a whole ``torch.save`` archive, or a
    safetensors file, holding the box as a C-ordered tensor). Where in the item the data lies is
    found only when the chunk is read (``_dcp.chunk_source``)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(slots=True, unsafe_hash=True)
class ChunkedRecord(_Sealed):
    """A tensor saved in pieces (DCP): its global shape and dtype, and the chunks that tile it.
    No data is read to make one."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[Chunk, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]


@dataclass(slots=True, unsafe_hash=True)
class ArrayRecord(_Sealed):
    """A numpy array pickled inline (detectron2 ``.pkl``). ``data`` is None in symbolic mode."""

    dtype: str  # torch-style name
    numpy_dtype: str  # e.g. "<f4"
    shape: tuple[int, ...]
    fortran: bool
    data: bytes | None
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(slots=True)  # one per call or NEWOBJ in the file: slots halve its size
class StandIn:
    """An inert record of an object the pickle would have built from a non-allowlisted global."""

    qualname: str
    args: tuple[Any, ...] = ()
    state: Any = None
    items: dict[Any, Any] = field(default_factory=dict)
    listitems: list[Any] = field(default_factory=list)
    # how the pickle made it: False for NEWOBJ or copyreg._reconstructor (an object restored from
    # its state, as every pickled nn.Module is; _reconstructor's own state argument only feeds
    # the base class's __new__, None for object), True for a call (REDUCE) of the global
    called: bool = False
    builds: int = 0  # BUILD opcodes applied to it (a restored module has exactly one)

    def describe(self) -> str:
        return f"{self.qualname}(...) [not executed]"


# --------------------------------------------------------------------------------------------------
# what a value from the file is, in a few words


def is_leaf(value: Any) -> bool:
    """A tensor-like value: a record of ours, a torch tensor or a numpy array."""
    if isinstance(value, TensorRecord | ArrayRecord | ChunkedRecord):
        return True
    return (
        type(value).__module__.split(".", 1)[0] in ("torch", "numpy")
        and hasattr(value, "shape")
        and hasattr(value, "dtype")
        and not isinstance(value, type)
    )


def is_module(obj: Any) -> bool:
    """A stand-in that claims to be a pickled ``nn.Module``: its recorded state is a ``__dict__``
    with ``_parameters`` (or a ``(state, slot state)`` tuple holding one, which
    ``_module_tree.extract`` refuses). Constant time: only those two places are looked at."""
    if not isinstance(obj, StandIn):
        return False
    state = obj.state
    if isinstance(state, dict):
        return "_parameters" in state
    return isinstance(state, tuple) and any(
        isinstance(s, dict) and "_parameters" in s for s in state[:2]
    )


class Describer:
    """:func:`describe` for the values of one file, each container walked once for all of them.

    A pickle can share one container of 100,000 items under thousands of keys, or under each of
    thousands of small dicts: counting the tensors afresh for every key would take minutes. The
    lines and the tensor counts are memoized by identity (the values outlive this object).
    """

    def __init__(self) -> None:
        self._lines: dict[int, str] = {}
        self._counts: dict[int, int] = {}  # container id → tensors it holds, capped at _MANY

    def __call__(self, value: Any) -> str:
        line = self._lines.get(id(value))
        if line is None:
            line = self._lines[id(value)] = self._describe(value)
        return line

    def _describe(self, value: Any) -> str:
        if isinstance(value, Mapping):
            tensors = self.count_leaves(value)
            suffix = f", {tensors} tensors" if tensors < _MANY else f", over {_MANY:,} tensors"
            return f"dict with {len(value)} entries{suffix if tensors else ''}"
        return _describe_flat(value)

    def count_leaves(self, node: Any) -> int:
        """Tensors held in ``node``: one per reference (a tensor under two names counts twice,
        a container shared by two parents counts in each), none through a cycle. Iterative, in
        post-order: each container's items are looked at twice in all, whoever asks."""
        counts = self._counts
        todo: list[tuple[Any, bool]] = [(node, False)]
        while todo:
            item, items_done = todo.pop()
            if items_done:
                counts[id(item)] = min(_MANY, sum(map(self._held, _items(item))))
            elif id(item) not in counts and _is_container(item):
                counts[id(item)] = 0  # while its items are counted: a cycle back adds nothing
                todo.append((item, True))
                todo.extend((v, False) for v in _items(item) if _is_container(v))
        return self._held(node)

    def _held(self, value: Any) -> int:
        if is_leaf(value):
            return 1
        return self._counts.get(id(value), 0)


_MANY = 10**9  # tensor counts saturate here: shared containers can multiply them without end


def _is_container(value: Any) -> bool:
    return isinstance(value, Mapping | list | tuple)


def _items(container: Any) -> Any:
    return container.values() if isinstance(container, Mapping) else container


def describe(value: Any) -> str:
    """One line on a non-weight value (``epoch``, ``train_args``, a module's ``yaml`` ...).
    For many values of one file, use one :class:`Describer`."""
    return Describer()(value)


def _describe_flat(value: Any) -> str:
    """:func:`describe` of anything but a mapping: a few words, in constant time."""
    if isinstance(value, TensorRecord | ChunkedRecord):
        return f"tensor {list(value.shape)} {value.dtype}"
    if isinstance(value, StandIn):
        kind = " module object" if is_module(value) else ""
        return f"{value.qualname}{kind} [inert, not executed]"
    if isinstance(value, int) and not isinstance(value, bool):
        return brief(value)
    if isinstance(value, bool | float) or value is None:
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__
