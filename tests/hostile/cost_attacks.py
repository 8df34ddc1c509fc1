"""Files whose cost would grow faster than their size, built at test time (issue 14, classes 1-5).

Each builder takes a folder and a size ``n`` (references, keys, prefixes or links) and returns the
path; ``tests/hostile/test_cost.py`` grows ``n`` and measures, ``corpus.py`` runs one size of each
under the audit hook.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from pickle_asm import Build, Call, Get, Global, Put, Raw, Seq, assemble, tensor, torch_zip

SHARED = 200_000  # bytes (or items) in the one object every reference points to

_NDARRAY = Global("numpy", "ndarray")
_RECONSTRUCT = Global("numpy.core.multiarray", "_reconstruct")
_FROMBUFFER = Global("numpy.core.numeric", "_frombuffer")
_DTYPE_U1 = Call(Global("numpy", "dtype"), ("u1", False, True))
_WEIGHT = {"weight": tensor("0", 2, (1, 2), (2, 1))}
_STORAGE = {"0": struct.pack("<2f", 1.0, 2.0)}


def _zip(tmp: Path, name: str, extras: object) -> Path:
    """A torch zip of a 1×2 state dict under "model", beside ``extras`` under "x"."""
    return torch_zip(tmp / name, assemble({"model": _WEIGHT, "x": extras}), _STORAGE)


def _text(n: int) -> str:
    return "a" * n


# -- class 1: one memoized object, referenced n times by something that would copy it ------------


def stand_in_list_argument(tmp: Path, n: int) -> Path:
    """``argparse.Namespace(shared_list)`` n times: each call snapshots the list."""
    calls = [Call(Global("argparse", "Namespace"), (Get(1),)) for _ in range(n)]
    return _zip(tmp, "list_arg.pth", [Put([None] * (SHARED // 8), 1), *calls])


def stand_in_tuple_arguments(tmp: Path, n: int) -> Path:
    """``argparse.Namespace(*shared_tuple)`` n times: REDUCE on one memoized argument tuple."""
    call = Seq((Global("argparse", "Namespace"), Get(1), Raw(b"R")))
    return _zip(tmp, "tuple_args.pth", [Put(tuple([None] * (SHARED // 8)), 1), *[call] * n])


def build_shared_state(tmp: Path, n: int) -> Path:
    """n stand-ins each given the same memoized ``__dict__`` by BUILD."""
    state = Put({f"k{i}": None for i in range(SHARED // 32)}, 1)
    builds = [Build(Call(Global("zoo", "Thing"), ()), Get(1)) for _ in range(n)]
    return _zip(tmp, "build_state.pth", [state, *builds])


def codecs_encode_shared(tmp: Path, n: int) -> Path:
    """``_codecs.encode(shared_str, "latin1")`` n times (how py2 pickles carry bytes)."""
    calls = [Call(Global("_codecs", "encode"), (Get(1), "latin1")) for _ in range(n)]
    return _zip(tmp, "encode.pth", [Put(_text(SHARED), 1), *calls])


def ndarray_shared_string(tmp: Path, n: int) -> Path:
    """n numpy arrays rebuilt (``_reconstruct`` + BUILD) from one latin1 string, as a .pkl."""
    arrays = {
        f"w{i}": Build(
            Call(_RECONSTRUCT, (_NDARRAY, (0,), "b")),
            (1, (SHARED,), Get(2), False, Get(1)),
        )
        for i in range(n)
    }
    data = assemble({"s": Put(_text(SHARED), 1), "d": Put(_DTYPE_U1, 2), "model": arrays})
    path = tmp / "ndarray_shared.pkl"
    path.write_bytes(data)
    return path


def frombuffer_shared_bytearray(tmp: Path, n: int) -> Path:
    """n arrays ``_frombuffer(shared_bytearray, ...)`` (protocol 5's in-band buffers), as a .pkl."""
    buffer = Raw(b"\x96" + struct.pack("<Q", SHARED) + b"\x00" * SHARED)  # BYTEARRAY8
    arrays = {f"w{i}": Call(_FROMBUFFER, (Get(1), Get(2), (SHARED,), "C")) for i in range(n)}
    data = assemble({"b": Put(buffer, 1), "d": Put(_DTYPE_U1, 2), "model": arrays}, protocol=5)
    path = tmp / "frombuffer_shared.pkl"
    path.write_bytes(data)
    return path


# -- what every opcode costs: a pickle of n small objects, each made by one to four bytes --------

FLOODS = {
    "empty_lists": b"]",
    "empty_dicts": b"}",
    "stand_in_calls": b"h\x00)R",  # zoo.Thing(), the class fetched from the memo
}


def flood(tmp: Path, n: int, unit: str) -> Path:
    """``{"x": [obj, obj, ...]}``: n objects of one kind (:data:`FLOODS`), as a .pkl."""
    head = b"\x80\x02czoo\nThing\nq\x000}(X\x01\x00\x00\x00x]("
    path = tmp / f"flood_{unit}.pkl"
    path.write_bytes(head + FLOODS[unit] * n + b"eu.")
    return path


# -- class 2: many keys, one container ------------------------------------------------------------


def shared_container_extras(tmp: Path, n: int) -> Path:
    """n top-level keys, all the same dict of ``SHARED // 8`` tensors-or-not entries."""
    shared = {f"k{i}": i for i in range(SHARED // 8)}
    extras = {"model": _WEIGHT, "e0": Put(shared, 1), **{f"e{i}": Get(1) for i in range(1, n)}}
    return torch_zip(tmp / "shared_extras.pth", assemble(extras), _STORAGE)


def shared_container_nested(tmp: Path, n: int) -> Path:
    """n top-level keys, each a small dict of its own holding the same big dict."""
    shared = {f"k{i}": i for i in range(SHARED // 8)}
    extras = {"model": _WEIGHT, "e0": {"x": Put(shared, 1)}}
    extras.update({f"e{i}": {"x": Get(1)} for i in range(1, n)})
    return torch_zip(tmp / "shared_nested.pth", assemble(extras), _STORAGE)


def stand_ins_sharing_state(tmp: Path, n: int) -> Path:
    """n top-level stand-ins, each given the same big tuple as its state by BUILD."""
    state = Put(tuple([None] * (SHARED // 8)), 1)
    objects = {f"o{i}": Build(Call(Global("zoo", "Thing"), ()), Get(1)) for i in range(n)}
    return torch_zip(
        tmp / "shared_state.pth", assemble({"model": _WEIGHT, "s": state, **objects}), _STORAGE
    )


# -- class 3: one long key ------------------------------------------------------------------------


def long_prefixed_key(tmp: Path, n: int) -> Path:
    """The key ``"model." * n + "weight"``: n wrapper prefixes to strip."""
    weights = {"model." * n + "weight": tensor("0", 2, (1, 2), (2, 1))}
    return torch_zip(tmp / "long_key.pth", assemble(weights), _STORAGE)


# -- class 4: a view claiming far more elements than are stored -----------------------------------


def broadcast_head(tmp: Path, rows: int, *, value: float = 0.5) -> Path:
    """``fc.weight`` of shape (rows, 8) and ``fc.bias`` of shape (rows,), all strides 0: every
    element is the one float stored (``conftest.SmallNet``'s other keys are missing)."""
    weights = {
        "fc.weight": tensor("0", 1, (rows, 8), (0, 0)),
        "fc.bias": tensor("0", 1, (rows,), (0,)),
    }
    tmp.mkdir(exist_ok=True)
    return torch_zip(tmp / "broadcast.pth", assemble(weights), {"0": struct.pack("<f", value)})


def overlapping_rows(tmp: Path, n: int) -> Path:
    """``weight`` of shape (n, n) and strides (1, 1) over 2n - 1 stored ones: each row starts
    one element after the previous (n² claimed)."""
    weights = {"weight": tensor("0", 2 * n - 1, (n, n), (1, 1))}
    storage = struct.pack("<f", 1.0) * (2 * n - 1)
    tmp.mkdir(exist_ok=True)
    return torch_zip(tmp / "overlap.pth", assemble(weights), {"0": storage})


# -- class 5: references that lead back to themselves ---------------------------------------------


def _index(path: Path, shard: str) -> Path:
    path.write_text(json.dumps({"weight_map": {"weight": shard}}))
    return path


def index_naming_itself(tmp: Path, n: int = 0) -> Path:
    """A ``.bin`` file that is a shard index whose one shard is itself."""
    return _index(tmp / "pytorch_model.bin", "pytorch_model.bin")


def indexes_naming_each_other(tmp: Path, n: int = 0) -> Path:
    """Two ``.bin`` indexes, each the other's shard."""
    _index(tmp / "b.bin", "a.bin")
    return _index(tmp / "a.bin", "b.bin")


def index_chain(tmp: Path, n: int) -> Path:
    """n ``.bin`` indexes, each the next one's only shard (no cycle, just depth)."""
    for i in range(n):
        _index(tmp / f"i{i}.bin", f"i{i + 1}.bin")
    torch_zip(tmp / f"i{n}.bin", assemble(_WEIGHT), _STORAGE)
    return tmp / "i0.bin"


def _chain(tmp: Path, n: int, name: str) -> Path:
    """``name.format(0)`` → ``name.format(1)`` → ... → ``name.format(n)``, a real checkpoint."""
    torch_zip(tmp / name.format(n), assemble(_WEIGHT), _STORAGE)
    for i in reversed(range(n)):
        os.symlink(name.format(i + 1), tmp / name.format(i))
    return tmp / name.format(0)


def symlink_chain(tmp: Path, n: int) -> Path:
    """A checkpoint reached through a chain of n symlinks."""
    return _chain(tmp, n, "link{}.pth")


def shard_symlink_chain(tmp: Path, n: int) -> Path:
    """A shard index whose one shard is reached through a chain of n symlinks."""
    _chain(tmp, n, "shard{}.bin")
    return _index(tmp / "model.bin.index.json", "shard0.bin")
