"""Torch parity on every file torch.save writes: zip and legacy formats, pickle protocols 0-5.

smartload's reader gives exactly the tensors ``torch.load(weights_only=True, map_location="cpu")``
gives (keys, dtypes, shapes, strides, bits, shared storages, Parameter flags); where torch cannot
read back its own file (protocols it refuses, dtypes its legacy reader lacks, protocol 0's text
storage ids) smartload gives exactly what was saved. ``smartload.load`` into a module fills it as
``load_state_dict`` does. Python-2-era files (``OrderedDict([[key, tensor], ...])``, CUDA storage
types, torch 0.3's ``_rebuild_tensor``) are rebuilt by hand, and lpips' shipped weights are read.
"""

from __future__ import annotations

import collections
import math
import pickle
import struct
import warnings
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pickle_asm import Build, Call, Get, Global, New, Pid, Put, Raw, assemble, torch_zip
from torch import nn

import smartload
from smartload._formats import read
from smartload._records import TensorRecord
from smartload._tensors import Materializer

pytestmark = [
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning"),
]

DATA = Path(__file__).parent / "data"

DTYPES = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.complex128, torch.complex64, torch.complex32,
    torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint64, torch.uint32, torch.uint16, torch.uint8, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu, torch.float4_e2m1fn_x2, torch.bits8, torch.bits16,
)  # fmt: skip
# the dtypes torch's legacy reader has a storage type for; it cannot read back the others
LEGACY_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128,
    torch.complex64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
}  # fmt: skip
PARAMETER_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
FORMATS = {"torch-zip": True, "torch-legacy": False}
PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# --------------------------------------------------------------------------------------------------
# reading and comparing


def smartload_tree(path: Path, fmt: str) -> Any:
    """The file's whole object tree as smartload's reader gives it, records made tensors."""
    raw = read(path)
    assert raw.format == fmt
    materializer = Materializer(raw.sources)

    def build(node: Any) -> Any:
        if isinstance(node, TensorRecord):
            tensor = materializer.tensor(node)
            if node.is_parameter:
                return nn.Parameter(tensor, requires_grad=node.requires_grad)
            return tensor.requires_grad_(node.requires_grad)
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(build(v) for v in node)
        return node

    return build(raw.tree)


def torch_tree(path: Path) -> Any | None:
    """What ``torch.load(weights_only=True)`` reads, or None where torch cannot read the file."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, AssertionError, AttributeError):
        return None


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor in logical order: NaN payloads and -0.0 compare exactly."""
    # copied into fresh memory: contiguous() keeps odd strides on empty and size-1 dimensions
    flat = torch.empty(tensor.numel(), dtype=tensor.dtype).copy_(tensor.detach().reshape(-1))
    return flat.view(torch.uint8)


def assert_same_tree(got: Any, expected: Any, where: str = "") -> None:
    """The same containers in the same order; tensors equal in type, dtype, shape, strides, bits."""
    if isinstance(expected, torch.Tensor):
        assert type(got) is type(expected), where
        assert got.requires_grad == expected.requires_grad, where
        assert (got.dtype, got.shape, got.stride()) == (
            expected.dtype,
            expected.shape,
            expected.stride(),
        ), where
        assert torch.equal(bits(got), bits(expected)), where
    elif isinstance(expected, Mapping):
        assert isinstance(got, dict) and list(got) == list(expected), where
        for key, value in expected.items():
            assert_same_tree(got[key], value, f"{where}/{key}")
    elif isinstance(expected, list | tuple):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_same_tree(g, e, f"{where}/{i}")
    else:
        assert type(got) is type(expected) and got == expected, where


def assert_same_sharing(
    got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    """Tensors that view one storage in ``expected`` view one storage, as far apart, in ``got``."""
    keys = [k for k, v in expected.items() if v.numel()]
    for a, b in combinations(keys, 2):
        if expected[a].untyped_storage().data_ptr() == expected[b].untyped_storage().data_ptr():
            assert got[a].untyped_storage().data_ptr() == got[b].untyped_storage().data_ptr()
            apart = expected[b].data_ptr() - expected[a].data_ptr()
            assert got[b].data_ptr() - got[a].data_ptr() == apart, (a, b)


def module_for(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """A module whose state dict has ``sd``'s keys, shapes and dtypes, all zero (buffers: any
    dtype fits; ``torch.zeros`` lacks some, so the zeros are made as bytes)."""
    root = nn.Module()
    for key, value in sd.items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        zeros = torch.zeros(value.numel() * value.element_size(), dtype=torch.uint8)
        module.register_buffer(name, zeros.view(value.dtype).reshape(value.shape))
    return root


def assert_loads_like_torch(path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``smartload.load`` fills a module exactly as ``load_state_dict`` of ``state_dict`` does."""
    expected, got = module_for(state_dict), module_for(state_dict)
    expected.load_state_dict(state_dict)
    report = smartload.load(got, path, on_nonfinite="allow")
    assert report.summary["copy"] == len(state_dict)
    assert report.unused == ()
    assert_same_tree(dict(got.state_dict()), dict(expected.state_dict()))


# --------------------------------------------------------------------------------------------------
# what torch.save gets


@st.composite
def tensors(draw: st.DrawFn, dtype: torch.dtype) -> torch.Tensor:
    """Random bytes (NaNs and all) as ``dtype``: 0-d, empty, contiguous, transposed or strided."""
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    view = draw(st.sampled_from(["plain", "transposed", "strided"]))
    # strided: every other row of a taller base, from row 1 (a non-zero storage offset)
    base_shape = (2 * shape[0] + 1, *shape[1:]) if view == "strided" and shape else shape
    nbytes = math.prod(base_shape) * dtype.itemsize
    raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    base = torch.tensor(list(raw), dtype=torch.uint8).view(dtype).reshape(base_shape)
    if view == "strided" and shape:
        return base[1::2]
    if view == "transposed" and len(shape) >= 2:
        return base.transpose(0, -1)
    if dtype in PARAMETER_DTYPES and draw(st.booleans()):
        return nn.Parameter(base, requires_grad=draw(st.booleans()))
    return base


class Case:
    """A state dict to save, alone or in a training checkpoint. Its repr gives each tensor's
    layout, not its values: torch cannot print float4 tensors, and Hypothesis prints examples
    (a dataclass it would print field by field)."""

    def __init__(self, sd: dict[str, torch.Tensor], nested: bool) -> None:
        self.sd = sd
        self.nested = nested

    def saved(self) -> Any:
        if not self.nested:
            return self.sd
        return {"model": self.sd, "epoch": 3, "best": -0.5, "tag": "run", "steps": [1, 2]}

    def __repr__(self) -> str:
        layout = {
            k: (str(v.dtype), tuple(v.shape), v.stride(), type(v).__name__)
            for k, v in self.sd.items()
        }
        return f"Case({type(self.sd).__name__}({layout}), nested={self.nested})"


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """1-4 tensors of any dtype, perhaps tied, perhaps an OrderedDict, perhaps nested."""
    count = draw(st.integers(1, 4))
    sd: dict[str, torch.Tensor] = {}
    for i in range(count):
        sd[f"layer{i}.t"] = draw(tensors(draw(st.sampled_from(DTYPES))))
    if draw(st.booleans()):  # tied: the same tensor twice, and a view of its storage
        first = sd["layer0.t"].detach()
        sd["tied.same"] = sd["layer0.t"]
        if first.numel():
            sd["tied.view"] = first.reshape(-1)[first.numel() // 2 :]
    if draw(st.booleans()):  # as model.state_dict() pickles it: OrderedDict + BUILD _metadata
        ordered = collections.OrderedDict(sd)
        ordered._metadata = collections.OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
        sd = ordered
    return Case(sd, draw(st.booleans()))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_reads_what_torch_saves(
    tmp_path_factory: pytest.TempPathFactory, fmt: str, protocol: int, case: Case
) -> None:
    """Every tensor exactly as saved and as torch reads it; smartload.load as load_state_dict."""
    path = tmp_path_factory.mktemp("parity") / "ckpt.pth"
    sd, nested = case.sd, case.nested
    saved = case.saved()
    torch.save(saved, path, _use_new_zipfile_serialization=FORMATS[fmt], pickle_protocol=protocol)
    got = smartload_tree(path, fmt)
    assert_same_tree(got, saved)
    assert_same_sharing(got["model"] if nested else got, sd)
    reference = torch_tree(path)
    dtypes = {t.dtype for t in sd.values()}
    if protocol in (2, 3) and (FORMATS[fmt] or dtypes <= LEGACY_DTYPES):
        assert reference is not None  # the parity cases are not skipped
    if reference is not None:
        assert_same_tree(got, reference)
    state_dict = sd if reference is None else reference["model"] if nested else reference
    assert_loads_like_torch(path, state_dict)


# --------------------------------------------------------------------------------------------------
# Python-2-era files, rebuilt by hand: lpips' and cdpam's shape

ORDERED_DICT = Global("collections", "OrderedDict")


def py2_str(text: str) -> Raw:
    """SHORT_BINSTRING: how Python 2 pickled a str."""
    data = text.encode("latin1")
    return Raw(b"U" + bytes([len(data)]) + data)


def py2_ordered_dict(items: list[tuple[str, Any]], pair: type = list) -> Call:
    """``OrderedDict([[key, value], ...])``: Python 2's ``OrderedDict.__reduce__``."""
    return Call(ORDERED_DICT, ([pair((py2_str(k), v)) for k, v in items],))


def py2_tensor(storage_type: Global, key: str, location: str, t: torch.Tensor, v2: bool) -> Call:
    """A tensor as torch 0.4 (``_rebuild_tensor_v2``) or 0.3 (``_rebuild_tensor``) pickled it."""
    storage = Pid(
        (py2_str("storage"), storage_type, py2_str(key), py2_str(location), t.numel(), None)
    )
    args = (storage, 0, tuple(t.shape), t.stride())
    if v2:  # requires_grad, and empty backward hooks as OrderedDict([])
        return Call(
            Global("torch._utils", "_rebuild_tensor_v2"), (*args, False, Call(ORDERED_DICT, ([],)))
        )
    return Call(Global("torch._utils", "_rebuild_tensor"), args)


def legacy_file(path: Path, tree: bytes, storages: Mapping[str, torch.Tensor]) -> Path:
    """A legacy (non-zip) torch file: magic, version, system info, the tree, its storage keys,
    then each storage as its element count and bytes."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2}}
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, sys_info):
            f.write(pickle.dumps(header, protocol=2))
        f.write(tree)
        f.write(pickle.dumps(list(storages), protocol=2))
        for t in storages.values():
            f.write(struct.pack("<q", t.numel()) + t.numpy().tobytes())
    return path


@pytest.mark.parametrize("pair", [list, tuple])
def test_python2_ordered_dict_with_cuda_storages(tmp_path: Path, pair: type) -> None:
    """OrderedDict([[key, tensor], ...]) + BUILD _metadata, CUDA storage types and locations,
    torch 0.3 and 0.4 rebuilds: read on the CPU exactly as torch reads them, and loaded."""
    torch.manual_seed(0)
    weight, bias, half = torch.randn(3, 2, 1, 1), torch.randn(3), torch.randn(4).half()
    count = torch.tensor(7)
    cuda = "torch.cuda"
    items = [
        ("conv.weight", py2_tensor(Global(cuda, "FloatStorage"), "140", "cuda:0", weight, True)),
        ("conv.bias", py2_tensor(Global("torch", "FloatStorage"), "141", "cuda:1", bias, True)),
        (
            "bn.num_batches_tracked",
            py2_tensor(Global(cuda, "LongStorage"), "142", "cuda:0", count, False),
        ),
        ("bn.scale", py2_tensor(Global(cuda, "HalfStorage"), "143", "cuda:0", half, True)),
    ]
    metadata = [(name, {py2_str("version"): 1}) for name in ("", "conv", "bn")]
    tree = Build(
        py2_ordered_dict(items, pair),
        {py2_str("_metadata"): py2_ordered_dict(metadata, pair)},
    )
    storages = {"140": weight, "141": bias, "142": count, "143": half}
    path = legacy_file(tmp_path / "py2.pth", assemble(tree), storages)
    reference = torch.load(path, weights_only=True, map_location="cpu")
    expected = {
        "conv.weight": weight,
        "conv.bias": bias,
        "bn.num_batches_tracked": count,
        "bn.scale": half,
    }
    assert_same_tree(dict(reference), expected)
    assert_same_tree(smartload_tree(path, "torch-legacy"), reference)
    assert_loads_like_torch(path, reference)


def _refusal(tmp_path: Path, obj: Any) -> str:
    """The problem smartload names for a torch zip whose data.pkl is ``obj``."""
    path = torch_zip(tmp_path / "crafted.pth", assemble(obj))
    with pytest.raises(smartload.CheckpointFormatError) as exc:
        smartload.inspect(path)
    assert exc.value.path == f"{path}:archive/data.pkl"
    assert exc.value.hint == "The file is corrupt or was not written by torch/numpy; re-export it"
    return exc.value.problem


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (
            ({"a": 1},),
            "OrderedDict called with arguments other than one list of (key, value) pairs",
        ),
        (([], []), "OrderedDict called with arguments other than one list of (key, value) pairs"),
        (([["a", 1, 2]],), "OrderedDict called with a list of 3 where a (key, value) pair belongs"),
        ((["ab"],), "OrderedDict called with 'ab' where a (key, value) pair belongs"),
        (([[1, 2]],), "OrderedDict called with the key 1; state dict keys are str"),
    ],
)
def test_ordered_dict_other_arguments_refused(
    tmp_path: Path, args: tuple[Any, ...], problem: str
) -> None:
    """Only one list or tuple of (str key, value) pairs: anything else is named and refused."""
    assert _refusal(tmp_path, {"sd": Call(ORDERED_DICT, args)}) == problem


def _shared_list(count: int) -> Put:
    return Put([[f"k{i}", None] for i in range(count)], 0)


def test_ordered_dict_of_one_list_twice_is_read(tmp_path: Path) -> None:
    """A list of pairs passed to OrderedDict more than once gives equal, separate dicts."""
    calls = [Call(ORDERED_DICT, (Get(0),)), Call(ORDERED_DICT, (Get(0),))]
    path = torch_zip(tmp_path / "twice.pth", assemble([_shared_list(3), *calls]))
    _, first, second = read(path).tree
    assert first == second == {"k0": None, "k1": None, "k2": None}
    assert first is not second


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (Call(ORDERED_DICT, (Get(0),)), "OrderedDict calls"),
        (Call(Global("argparse", "Namespace"), (Get(0),)), "calls of argparse.Namespace"),
        (Build(New(Global("mymodule", "Thing")), Get(1)), "BUILDs of mymodule.Thing"),
    ],
)
def test_copies_of_one_shared_object_are_bounded(tmp_path: Path, call: Any, what: str) -> None:
    """A list or dict memoized once and copied by 10,000 calls or BUILDs (a small file that would
    fill memory) is refused once the copies pass 32 bytes per byte of the pickle + 64 MiB."""
    shared_dict = Put({f"k{i}": None for i in range(1000)}, 1)
    obj = [_shared_list(1000), shared_dict, *[call] * 10_000]
    limit = 32 * len(assemble(obj)) + 64 * 2**20
    assert _refusal(tmp_path, obj) == (
        f"{what} would materialise more than {limit:,} bytes (32 per byte of the pickle + 64 "
        "MiB): the same object is copied again and again"
    )


def test_protocol0_text_storage_id_of_another_class_refused(tmp_path: Path) -> None:
    """A protocol-0 persistent id is parsed as text, never evaluated: a class that is not a
    storage type is refused."""
    pid = Raw(b"P('storage', <class 'posix.system'>, '0', 'cpu', 1)\n")
    tensor = Call(Global("torch._utils", "_rebuild_tensor_v2"), (pid, 0, (1,), (1,), False, None))
    assert _refusal(tmp_path, {"w": tensor}) == (
        "an unknown persistent id (\"('storage', <class 'posix.system'>, '0',\"...)"
    )


def test_only_cuda_storage_types_leave_the_hostile_list(tmp_path: Path) -> None:
    """torch.cuda's storage types are data; every other torch.cuda name stays hostile."""
    storage, other = Global("torch.cuda", "FloatStorage"), Global("torch.cuda", "set_device")
    path = torch_zip(tmp_path / "cuda.pth", assemble({"s": storage, "f": other}))
    with pytest.raises(smartload.UnsafeCheckpointError) as exc:
        smartload.inspect(path)
    assert exc.value.globals == ["torch.cuda.set_device"]
    problem = "the pickle calls torch.cuda.FloatStorage, which is only data"
    assert _refusal(tmp_path, {"s": Call(storage, ())}) == problem


@pytest.mark.parametrize(
    ("make", "problem", "hint"),
    [
        (
            lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
            "a quantized tensor (torch.QInt8Storage)",
            "Save tensor.dequantize() in its place",
        ),
        (
            lambda: torch.eye(3).to_sparse(),
            "a sparse tensor (torch.serialization._get_layout)",
            "Save tensor.to_dense() in its place",
        ),
        (
            lambda: torch.eye(3).to_sparse_csr(),
            "a sparse tensor (torch.serialization._get_layout)",
            "Save tensor.to_dense() in its place",
        ),
        (
            lambda: torch.empty(3, device="meta"),
            "a meta-device tensor (torch._utils._rebuild_meta_tensor_no_storage)",
            "It holds no values: save the tensor from a real device",
        ),
        (
            lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
            "a nested tensor (torch._utils._rebuild_nested_tensor)",
            "Save its parts (tensor.unbind())",
        ),
    ],
    ids=["quantized", "sparse-coo", "sparse-csr", "meta", "nested"],
)
def test_tensor_kinds_torch_reads_but_smartload_does_not_say_why(
    tmp_path: Path, make: Any, problem: str, hint: str
) -> None:
    """Tensors that are not dense numbers in a storage: torch reads them; smartload refuses with
    what the file holds and what to save instead (not "corrupt", not "hostile")."""
    path = tmp_path / "kind.pth"
    with warnings.catch_warnings():  # torch's own: beta, prototype, deprecated, O(nnz) checks
        warnings.simplefilter("ignore", UserWarning)
        torch.save({"w": make()}, path)
        torch.load(path, weights_only=True, map_location="cpu")
    with pytest.raises(smartload.CheckpointFormatError) as exc:
        smartload.inspect(path)
    assert exc.value.problem == f"{problem}; smartload reads dense tensors only"
    assert exc.value.hint == f"{hint}, then load that file"


def test_text_long_other_than_the_legacy_magic_is_unknown(tmp_path: Path) -> None:
    """Only the legacy magic number marks a protocol 0/1 torch file; another text LONG does not."""
    path = tmp_path / "long.pth"
    path.write_bytes(b"L1234L\n.")
    with pytest.raises(smartload.CheckpointFormatError) as exc:
        smartload.inspect(path)
    assert exc.value.problem == "unknown format (starts with 4c 31 32 33 34 4c 0a 2e)"


# --------------------------------------------------------------------------------------------------
# lpips' shipped weights (BSD-2, tests/data/lpips/LICENSE): Python 2, CUDA-saved, legacy format

LPIPS_CHANNELS = {
    "alex": (64, 192, 384, 256, 256),
    "vgg": (64, 128, 256, 512, 512),
    "squeeze": (64, 128, 256, 384, 384, 512, 512),
}


class LinLayers(nn.Module):
    """lpips' heads: ``lin{i}.model`` = Dropout, then a bias-free 1x1 conv to one channel."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        for i, c in enumerate(channels):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
            self.add_module(f"lin{i}", lin)


@pytest.mark.parametrize("net", LPIPS_CHANNELS)
@pytest.mark.parametrize("version", ["v0.0", "v0.1"])
def test_lpips_weights_read_and_load_as_torch_does(version: str, net: str) -> None:
    """Each of lpips' six files: the tensors torch reads, and the same module afterwards."""
    path = DATA / "lpips" / version / f"{net}.pth"
    channels = LPIPS_CHANNELS[net]
    reference = torch.load(path, weights_only=True, map_location="cpu")
    got = smartload_tree(path, "torch-legacy")
    assert_same_tree(got, reference)
    assert {k: tuple(v.shape) for k, v in got.items()} == {
        f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(channels)
    }
    expected, model = LinLayers(channels), LinLayers(channels)
    expected.load_state_dict(reference)
    report = smartload.load(model, path)
    assert report.summary["copy"] == len(channels)
    assert report.summary["reused_params"] == sum(channels)
    assert_same_tree(model.state_dict(), expected.state_dict())
