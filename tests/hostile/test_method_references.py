"""A method reference (yolov5's ``Segment`` keeps ``self.detect = Detect.forward``) pickled at
protocols 0-3 is ``getattr(Detect, "forward")``: data, named ``module.Detect.forward`` and judged
as that global (UNKNOWN for a model's class), when getattr gets a global that becomes a stand-in
and a public name, and what it returns is only kept (a dict value, or what the pickle returns).
Every other use of getattr stays UNSAFE: in the pre-scan, in the unpickler's builder, and in the
last look at files refused for another reason."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import assert_same_tensors, make_net
from pickle_asm import Call, Get, Global, Put, Raw, Seq, assemble, tensor, torch_zip
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

import smartload
from smartload import CheckpointFormatError, UnsafeCheckpointError
from smartload._records import Refused
from smartload._unpickler import _qualname, _Unpickler, unpickle, walk_names
from smartload.cli import main

GETATTR = Global("builtins", "getattr")
DETECT = Global("zoo.models", "Detect")  # a model's class, of a package not installed here
_W = tensor("0", 2, (1, 2), (2, 1))


def ref(obj: Any, name: Any) -> Call:
    """``getattr(obj, name)``, as protocol 2 writes a method reference."""
    return Call(GETATTR, (obj, name))


def _torch_file(tmp: Path, payload: Any) -> Path:
    """A torch zip of ``{"model": {"w": ...}, "x": payload}``."""
    data = assemble({"model": {"w": _W}, "x": payload})
    return torch_zip(tmp / "ref.pth", data, {"0": struct.pack("<2f", 1, 2)})


class _Tiny(torch.nn.Module):
    """The model ``_torch_file``'s weights are for."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, 2))


def _not_a_torch_zip(tmp: Path, payload: Any) -> Path:
    """The same pickle in a zip smartload refuses (data.pkl at its root): read by the last look."""
    path = tmp / "ref.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.pkl", assemble({"model": {}, "x": payload}))
    return path


def _prescan_names(data: bytes) -> list[str]:
    named: list[tuple[str, str]] = []
    assert walk_names(data, 0, named) == len(data)
    return [_qualname(module, name)[0] for module, name in named]


# --------------------------------------------------------------------------------------------------
# method references: data


class Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def fuse(self) -> None:
        pass


class Segment(Head):
    """A head keeping its parent's methods, as yolov5's ``Segment`` keeps ``Detect.forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.proto = torch.nn.Conv2d(4, 2, 1)
        self.detect = Head.forward
        self.fuse_parent = Head.fuse


HEAD = f"{__name__}.Head"


@pytest.mark.parametrize("protocol", [1, 2, 3])
def test_a_pickled_model_keeping_methods_is_unknown_and_loads(
    protocol: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``torch.save`` of a model whose module keeps two methods of a class (getattr fetched from
    the memo for the second): UNKNOWN naming ``module.Head.forward`` and ``module.Head.fuse``,
    builtins.getattr named nowhere; the CLI exits 6; load copies every tensor."""
    torch.manual_seed(0)
    source = Segment()
    path = tmp_path / "segment.pt"
    torch.save({"model": source, "epoch": 3}, path, pickle_protocol=protocol)
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert data.count(b"getattr") == 1 and b"fuse" in data  # one GLOBAL, then the memo

    info = smartload.inspect(path)
    assert info.verdict == "UNKNOWN"
    assert {f"{HEAD}.forward", f"{HEAD}.fuse"} <= set(info.unknown_globals)
    assert "builtins.getattr" not in info.globals
    assert main(["inspect", str(path)]) == 6
    capsys.readouterr()

    torch.manual_seed(1)
    target = Segment()
    report = smartload.load(target, path)
    assert report.summary["copy"] == 4
    assert_same_tensors(target.state_dict(), source.state_dict())


@pytest.mark.parametrize("protocol", range(4))
def test_the_prescan_and_the_unpickler_name_the_same_attributes(protocol: int) -> None:
    """At protocols 0-3 (GLOBAL and TUPLE or TUPLE2, memo gets of getattr, of the class and of
    the reference) both list the attributes in place of getattr, in the same order; the
    references come back as inert records of those names."""
    obj = {"a": Segment.__new__(Segment), "refs": {"f": Head.forward, "g": Head.fuse}}
    obj["a"].__dict__.update(detect=Head.forward, other=Head.fuse)
    data = pickle.dumps(obj, protocol)
    loaded, seen = unpickle(io.BytesIO(data), path="refs.pkl", symbolic=True)
    assert _prescan_names(data) == seen
    assert "builtins.getattr" not in seen and f"{HEAD}.fuse" in seen
    assert [(v.qualname, v.called) for v in loaded["refs"].values()] == [
        (f"{HEAD}.forward", False),
        (f"{HEAD}.fuse", False),
    ]
    assert loaded["a"].state["detect"].qualname == f"{HEAD}.forward"


D = "zoo.models.Detect"
BENIGN: dict[str, tuple[Any, list[str]]] = {
    "a reference kept in a dict": ({"hook": ref(DETECT, "forward")}, [f"{D}.forward"]),
    "a class from STACK_GLOBAL": (
        {"hook": ref(Seq((Raw(b"\x8c\nzoo.models\x8c\x06Detect\x93"),)), "forward")},
        [f"{D}.forward"],
    ),
    "getattr, the class and the reference from the memo": (
        {
            "a": Call(Put(GETATTR, 1), (Put(DETECT, 2), "forward")),
            "b": Call(Get(1), (Get(2), "fuse")),
            "c": Put(ref(DETECT, "export"), 3),
            "d": {"again": Get(3)},
        },
        [f"{D}.forward", f"{D}.fuse", f"{D}.export"],
    ),
    "a script's class": (
        {"hook": ref(Global("__main__", "Model"), "forward")},
        ["__main__.Model.forward"],
    ),
    "a known class's method, kept": (
        {"fn": ref(Global("pathlib", "Path"), "write_text")},
        ["pathlib.Path.write_text"],
    ),
}


@pytest.mark.parametrize("case", sorted(BENIGN))
def test_method_references_are_unknown_not_hostile(case: str, tmp_path: Path) -> None:
    """UNKNOWN naming each attribute reached, loads; a file refused for another reason is not
    turned hostile by them."""
    payload, reached = BENIGN[case]
    path = _torch_file(tmp_path, payload)
    info = smartload.inspect(path)
    assert info.verdict == "UNKNOWN"
    assert [g for g in info.unknown_globals if g in reached] == reached
    assert "builtins.getattr" not in info.globals
    model = _Tiny()
    smartload.load(model, path)
    assert model.w.tolist() == [[1.0, 2.0]]
    with pytest.raises(CheckpointFormatError):
        smartload.inspect(_not_a_torch_zip(tmp_path, payload))


# --------------------------------------------------------------------------------------------------
# every other use of getattr: UNSAFE


def _keywords(value: Any) -> Seq:
    """``NEWOBJ_EX(itertools.accumulate, ([...],), {"func": value})``: the dict's values become
    keyword arguments of a constructor."""
    cls = Global("itertools", "accumulate")
    return Seq((cls, ([Global("pathlib", "Path"), "x"],), {"func": value}, Raw(b"\x92")))


_INST = Raw(b"(czoo.models\nDetect\nVforward\nibuiltins\ngetattr\n")  # protocol 0's INST

HOSTILE: dict[str, tuple[Any, list[str]]] = {
    # the name is not a public attribute
    "dunder __init__": (ref(DETECT, "__init__"), ["builtins.getattr"]),
    "dunder __globals__": (ref(DETECT, "__globals__"), ["builtins.getattr"]),
    "dunder __reduce__": (ref(DETECT, "__reduce__"), ["builtins.getattr"]),
    "object.__subclasses__": (
        ref(Global("builtins", "object"), "__subclasses__"),
        ["builtins.getattr"],
    ),
    "a private name": (ref(DETECT, "_load_from_bytes"), ["builtins.getattr"]),
    "not a str": (ref(DETECT, 5), ["builtins.getattr"]),
    "a computed name": (
        ref(DETECT, Call(Global("builtins", "str"), ("forward",))),
        ["builtins.getattr"],
    ),
    # what is reached is hostile
    "torch.jit.load": (ref(Global("torch", "jit"), "load"), ["torch.jit.load"]),
    "subprocess.Popen.communicate": (
        ref(Global("subprocess", "Popen"), "communicate"),
        ["subprocess.Popen", "subprocess.Popen.communicate"],
    ),
    "os.system through a module that imports os": (
        ref(Global("zoo.utils", "os"), "system"),
        ["os.system"],
    ),
    "eval through a module's builtins": (
        ref(Global("zoo.utils", "builtins"), "eval"),
        ["builtins.eval"],
    ),
    "os.system through posixpath": (
        ref(Global("posixpath", "os"), "system"),
        ["posixpath.os", "posixpath.os.system", "os.system"],
    ),
    "a method of a builtin type": (
        ref(Global("builtins", "dict"), "get"),
        ["builtins.dict.get"],
    ),
    # the first argument is not a global that becomes a stand-in
    "a call's result": (ref(Call(DETECT, ()), "forward"), ["builtins.getattr"]),
    "importlib.import_module's result": (
        Call(ref(Call(Global("importlib", "import_module"), ("os",)), "system"), ("id",)),
        ["builtins.getattr", "importlib.import_module"],
    ),
    "memo put from a call": (
        Seq((Put(Call(DETECT, ()), 9), Raw(b"0"), ref(Get(9), "forward"))),
        ["builtins.getattr"],
    ),
    "memo index written twice": (
        Seq((Put(DETECT, 9), Raw(b"0"), Put(Call(DETECT, ()), 9), Raw(b"0"), ref(Get(9), "x"))),
        ["builtins.getattr"],
    ),
    "nested getattr": (ref(ref(DETECT, "forward"), "x"), ["builtins.getattr"]),
    "getattr of getattr": (ref(GETATTR, "x"), ["builtins.getattr"]),
    "a method of one of smartload's builders": (
        ref(Global("collections", "OrderedDict"), "fromkeys"),
        ["builtins.getattr"],
    ),
    # getattr, or the reference, used for anything but keeping it
    "three arguments": (Call(GETATTR, (DETECT, "forward", None)), ["builtins.getattr"]),
    "getattr kept": (GETATTR, ["builtins.getattr"]),
    "the reference called": (Call(ref(DETECT, "forward"), ("id",)), ["builtins.getattr"]),
    "the reference as an argument": (
        Call(Global("itertools", "starmap"), (ref(Global("pathlib", "Path"), "write_text"), [])),
        ["builtins.getattr"],
    ),
    "the reference in a list": ([ref(DETECT, "forward")], ["builtins.getattr"]),
    "the reference as a key": ({ref(DETECT, "forward"): 1}, ["builtins.getattr"]),
    "the reference twice in a tuple": (
        Seq((Put(ref(DETECT, "forward"), 9), Get(9), Raw(b"\x86"))),
        ["builtins.getattr"],
    ),
    "the reference called after the memo": (
        Seq((Put(ref(DETECT, "forward"), 9), Raw(b"0"), Call(Get(9), ("id",)))),
        ["builtins.getattr"],
    ),
    "the reference as a keyword argument": (
        _keywords(ref(Global("pathlib", "Path"), "write_text")),
        ["builtins.getattr"],
    ),
    "INST of getattr": (_INST, ["builtins.getattr"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_every_other_use_of_getattr_is_unsafe(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """inspect, load and the CLI (exit 4) name the hostile globals; so does the last look at the
    same pickle in a zip smartload refuses."""
    payload, expected = HOSTILE[case]
    path = _torch_file(tmp_path, payload)
    for read in (smartload.inspect, lambda p: smartload.load(make_net(10), p)):
        with pytest.raises(UnsafeCheckpointError) as caught:
            read(path)
        assert caught.value.globals == expected
    assert main(["inspect", str(path)]) == 4
    capsys.readouterr()
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.inspect(_not_a_torch_zip(tmp_path, payload))
    assert caught.value.globals == expected


BUILDER_SEES = sorted(
    set(HOSTILE)
    - {  # what only the opcodes show: where the reference goes, how the memo was written
        "the reference as an argument",
        "the reference in a list",
        "the reference twice in a tuple",
        "the reference as a key",
        "the reference as a keyword argument",
        "INST of getattr",
        "getattr kept",
    }
)


@pytest.mark.parametrize("case", BUILDER_SEES)
def test_the_unpickler_refuses_them_without_the_prescan(case: str) -> None:
    """The builder that stands for getattr judges the objects it is called with (a stand-in
    class, a public name) and the reference refuses to be called: the same globals, or the first
    of them, are hostile when nothing was pre-scanned."""
    payload, expected = HOSTILE[case]
    data = assemble({"x": payload})
    up = _Unpickler(
        io.BytesIO(data),
        symbolic=True,
        allow_globals=frozenset(),
        persistent_load=None,
        encoding="ASCII",
    )
    up.budget.allow(len(data))
    try:
        up.load()
    except Refused as exc:
        found = [*up.hostile, exc.hostile]
    else:
        found = list(up.hostile)
    assert found and set(found) <= set(expected)


def test_allow_globals_accepts_getattr_outside_the_state_dict(tmp_path: Path) -> None:
    """``allow_globals=["builtins.getattr"]`` reads a file using getattr otherwise, inertly (the
    call recorded, nothing reached); a hostile attribute still needs its own name."""
    path = _torch_file(tmp_path, ref(Call(DETECT, ()), "forward"))
    model = _Tiny()
    smartload.load(model, path, allow_globals=["builtins.getattr"])
    assert model.w.tolist() == [[1.0, 2.0]]
    path = _torch_file(tmp_path, ref(Global("torch", "jit"), "load"))
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.load(_Tiny(), path, allow_globals=["builtins.getattr"])
    assert caught.value.globals == ["torch.jit.load"]


# --------------------------------------------------------------------------------------------------
# DCP bytes items: walked, never unpickled


def _dcp(tmp: Path, train_state: Any) -> Path:
    path = tmp / "step-7"
    with warnings.catch_warnings():  # a one-process save, without a process group, on purpose
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save(
            {"model": make_net(10, seed=1).state_dict(), "train_state": train_state},
            storage_writer=FileSystemWriter(path),
        )
    return path


def _point_item_at(path: Path, fqn: str, data: bytes) -> None:
    """Append ``data`` to the item's file and point the bytes item ``fqn`` at it."""
    metadata = FileSystemReader(path).read_metadata()
    (key,) = [key for key in metadata.storage_data if key.fqn == fqn]
    info = metadata.storage_data[key]
    file = path / info.relative_path
    info.offset, info.length = file.stat().st_size, len(data)
    with open(file, "ab") as f:
        f.write(data)
    (path / ".metadata").write_bytes(pickle.dumps(metadata, protocol=4))


class Hooks:
    """A training script's record keeping a method (an object: DCP pickles it whole)."""

    def __init__(self) -> None:
        self.on_step = Head.fuse


def test_a_dcp_bytes_item_keeping_a_method_is_unknown(tmp_path: Path) -> None:
    """Train state items that keep a method of a class, or are one (DCP pickles each leaf on
    its own: the method is what the pickle returns): UNKNOWN naming it, loads; the same item
    calling the method is UNSAFE."""
    path = _dcp(tmp_path, {"hook": Head.forward, "hooks": Hooks(), "step": 7})
    info = smartload.inspect(path)
    assert info.verdict == "UNKNOWN"
    assert {f"{HEAD}.forward", f"{HEAD}.fuse", f"{__name__}.Hooks"} <= set(info.unknown_globals)
    assert "builtins.getattr" not in info.globals
    target = make_net(10, seed=2)
    smartload.load(target, path)
    assert_same_tensors(target.state_dict(), make_net(10, seed=1).state_dict())

    _point_item_at(path, "train_state.step", assemble(Call(ref(DETECT, "forward"), ("id",))))
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.inspect(path)
    assert caught.value.globals == ["builtins.getattr"]
