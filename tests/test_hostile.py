"""Hostile and broken files: a typed error naming the problem, nothing run, the model unchanged."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Payload, assert_unchanged, make_net, snapshot
from pickle_asm import ORDERED_DICT, Build, Call, Global, Pid, Raw, assemble, tensor, torch_zip
from safetensors.torch import save_file

import smartload
from smartload import CheckpointFormatError, UnsafeCheckpointError

Maker = Callable[[Path, str], Path]


def _weights() -> dict[str, torch.Tensor]:
    return make_net(10, seed=1).state_dict()


# --------------------------------------------------------------------------------------------------
# hostile: (maker, globals the error must list)


def reduce_in_torch_zip(tmp: Path, cmd: str) -> Path:
    """A real torch.save archive whose pickle also carries a __reduce__ → os.system payload."""
    buf = io.BytesIO()
    torch.save({"state_dict": _weights(), "x": Payload(cmd)}, buf)
    path = tmp / "evil.pth"
    path.write_bytes(buf.getvalue())
    return path


def protocol0_eval(tmp: Path, cmd: str) -> Path:
    path = tmp / "evil0.pkl"
    code = f"__import__('os').system('{cmd}')"
    path.write_bytes(b"c__builtin__\neval\n(S'" + code.encode() + b"'\ntR.")
    return path


def dotted_stack_global(tmp: Path, cmd: str) -> Path:
    path = tmp / "dotted.pkl"
    module, name = b"pathlib", b"os.system"
    path.write_bytes(
        b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x94\x8c" + bytes([len(name)]) + name
        + b"\x94\x93\x8c" + bytes([len(cmd)]) + cmd.encode() + b"\x85R."
    )  # fmt: skip
    return path


def importlib_chain(tmp: Path, cmd: str) -> Path:
    os_module = Call(Global("importlib", "import_module"), ("os",))
    system = Call(Global("builtins", "getattr"), (os_module, "system"))
    return torch_zip(tmp / "chain.pth", assemble({"model": Call(system, (cmd,))}))


def object_ndarray_pkl(tmp: Path, cmd: str) -> Path:
    path = tmp / "object.pkl"
    arrays = {"w": np.array([1, "harmless"], dtype=object)}
    path.write_bytes(pickle.dumps({"model": arrays}, protocol=2))
    return path


def every_global_listed(tmp: Path, cmd: str) -> Path:
    """Three different hostile globals: all of them are named, not just the first."""
    payload = {
        "a": Call(Global("subprocess", "Popen"), (cmd,)),
        "b": Call(Global("runpy", "_run_code"), (cmd, {})),
        "c": Call(Global("functools", "partial"), (Global("torch", "load"),)),
    }
    return torch_zip(tmp / "many.pth", assemble(payload))


def numpy_build_gadget(tmp: Path, cmd: str) -> Path:
    """BUILD with slot state on a numpy function (the modelscan bypass)."""
    gadget = Build(Global("numpy", "prod"), (None, {"__code__": cmd}))
    return torch_zip(tmp / "gadget.pth", assemble({"model": gadget}))


HOSTILE: dict[str, tuple[Maker, list[str]]] = {
    "reduce_os_system_in_torch_zip": (reduce_in_torch_zip, ["posix.system"]),
    "protocol0_builtin_eval": (protocol0_eval, ["builtins.eval"]),
    "dotted_stack_global": (dotted_stack_global, ["pathlib.os.system"]),
    "importlib_getattr_chain": (importlib_chain, ["builtins.getattr", "importlib.import_module"]),
    "object_ndarray": (object_ndarray_pkl, ["numpy.dtype('O')"]),
    "every_global_listed": (
        every_global_listed,
        ["subprocess.Popen", "runpy._run_code", "functools.partial", "torch.load"],
    ),
    "numpy_build_gadget": (numpy_build_gadget, ["numpy.prod"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_refused_by_load_and_inspect(case: str, tmp_path: Path, touch: str) -> None:
    maker, expected = HOSTILE[case]
    path = maker(tmp_path, touch)
    model = make_net(10)
    before = snapshot(model)
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.load(model, path)
    assert caught.value.globals == expected
    message = str(caught.value)
    assert message.startswith(f"{path}")
    assert f"refusing a hostile checkpoint: it names {', '.join(expected)}" in message
    assert "Nothing from the file was run" in message
    assert_unchanged(model, before)
    with pytest.raises(UnsafeCheckpointError) as caught_inspect:
        smartload.inspect(path)
    assert caught_inspect.value.globals == expected


def test_allow_globals_accepts_a_named_global_outside_the_state_dict(tmp_path: Path) -> None:
    """functools.partial beside the weights: refused by default, inert when explicitly allowed."""
    weights = {"weight": tensor("0", 2, (1, 2), (2, 1))}
    blob = {"model": weights, "cfg": Call(Global("functools", "partial"), (1,))}
    path = torch_zip(tmp_path / "partial.pth", assemble(blob), {"0": struct.pack("<2f", 1.0, 2.0)})
    model = torch.nn.Linear(2, 1, bias=False)
    with pytest.raises(UnsafeCheckpointError, match="functools.partial"):
        smartload.load(model, path)
    report = smartload.load(model, path, allow_globals=["functools.partial"])
    assert report.extras == {"cfg": "functools.partial [inert, not executed]"}
    assert model.weight.tolist() == [[1.0, 2.0]]


# --------------------------------------------------------------------------------------------------
# broken or refused by design: (maker, message fragment)


def truncated_pth(tmp: Path, cmd: str) -> Path:
    buf = io.BytesIO()
    torch.save(_weights(), buf)
    path = tmp / "truncated.pth"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def truncated_safetensors(tmp: Path, cmd: str) -> Path:
    path = tmp / "t.safetensors"
    save_file(_weights(), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    return path


def empty_file(tmp: Path, cmd: str) -> Path:
    path = tmp / "empty.pth"
    path.write_bytes(b"")
    return path


def png_named_pt(tmp: Path, cmd: str) -> Path:
    path = tmp / "image.pt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    return path


def gzipped_checkpoint(tmp: Path, cmd: str) -> Path:
    buf = io.BytesIO()
    torch.save(_weights(), buf)
    path = tmp / "ckpt.pth.gz"
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def overlapping_safetensors(tmp: Path, cmd: str) -> Path:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    text = json.dumps(header).encode()
    path = tmp / "overlap.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x00" * 12)
    return path


def torchscript_archive(tmp: Path, cmd: str) -> Path:
    path = tmp / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in this torch
        torch.jit.script(make_net(10)).save(str(path))
    return path


def legacy_tar(tmp: Path, cmd: str) -> Path:
    path = tmp / "old.pth"
    with tarfile.open(path, "w") as tar:
        data = b"x" * 10
        info = tarfile.TarInfo("storages")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def compressed_member(tmp: Path, cmd: str) -> Path:
    path = tmp / "deflated.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
    return path


def crc_mismatch(tmp: Path, cmd: str) -> Path:
    path = torch_zip(tmp / "crc.pth", assemble({"w": 1}))
    data = bytearray(path.read_bytes())
    at = data.index(b"X\x01\x00\x00\x00w")  # inside data.pkl
    data[at + 5] = ord("v")
    path.write_bytes(bytes(data))
    return path


def duplicate_data_pkl(tmp: Path, cmd: str) -> Path:
    path = tmp / "dup.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
            z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
    return path


def storage_size_lie(tmp: Path, cmd: str) -> Path:
    data = assemble({"fc.weight": tensor("0", 1000, (10, 100), (100, 1))})
    return torch_zip(tmp / "lie.pth", data, {"0": b"\x00" * 16})


def view_past_storage(tmp: Path, cmd: str) -> Path:
    data = assemble({"fc.weight": tensor("0", 4, (2, 2), (2, 1), offset=3)})
    return torch_zip(tmp / "past.pth", data, {"0": b"\x00" * 16})


def negative_strides(tmp: Path, cmd: str) -> Path:
    data = assemble({"fc.weight": tensor("0", 4, (2, 2), (-2, 1), offset=2)})
    return torch_zip(tmp / "negative.pth", data, {"0": b"\x00" * 16})


def foreign_rebuild_function(tmp: Path, cmd: str) -> Path:
    rebuild = Global("torch._tensor", "_rebuild_from_type_v2")
    fn = Global("torch._utils", "_rebuild_sparse_tensor")
    data = assemble({"w": Call(rebuild, (fn, Global("torch", "Tensor"), (), {}))})
    return torch_zip(tmp / "foreign.pth", data)


def setitem_on_list(tmp: Path, cmd: str) -> Path:
    path = tmp / "setitem.pkl"
    path.write_bytes(b"\x80\x02]q\x00K\x00K\x01s.")
    return path


def trailing_garbage(tmp: Path, cmd: str) -> Path:
    path = tmp / "trailing.pkl"
    path.write_bytes(pickle.dumps({"model": {}}, protocol=2) + b"cabcde\nxyz\n")  # not hostile
    return path


def shard_escapes_directory(tmp: Path, cmd: str) -> Path:
    (tmp / "outside.safetensors").write_bytes(b"")
    inner = tmp / "model"
    inner.mkdir()
    path = inner / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"fc.weight": "../outside.safetensors"}}))
    return path


def fifo(tmp: Path, cmd: str) -> Path:
    path = tmp / "pipe.pth"
    os.mkfifo(path)
    return path


def symlink_to_dev_zero(tmp: Path, cmd: str) -> Path:
    path = tmp / "zero.pth"
    path.symlink_to("/dev/zero")
    return path


BROKEN: dict[str, tuple[Maker, str]] = {
    "truncated_pth": (truncated_pth, "corrupt zip archive"),
    "truncated_safetensors": (truncated_safetensors, "the data area is truncated"),
    "empty_file": (empty_file, "empty file (0 bytes). The download or save failed"),
    "png_named_pt": (png_named_pt, "a PNG image, not a checkpoint"),
    "gzip": (gzipped_checkpoint, "gzip-compressed data. Decompress it first (gunzip)"),
    "overlapping_safetensors": (overlapping_safetensors, "tensor 'b' at byte 4 overlaps the previous tensor"),
    "torchscript": (torchscript_archive, "a TorchScript archive"),
    "legacy_tar": (legacy_tar, "a tar archive"),
    "compressed_member": (compressed_member, "zip member 'archive/data.pkl' is compressed (method 8)"),
    "crc_mismatch": (crc_mismatch, "CRC mismatch in zip member 'archive/data.pkl'"),
    "duplicate_data_pkl": (duplicate_data_pkl, "duplicate zip member 'archive/data.pkl'"),
    "storage_size_lie": (storage_size_lie, "storage 'archive/data/0' declares 4000 bytes but holds 16"),
    "view_past_storage": (view_past_storage, "reads past the end of storage '0' (16 bytes)"),
    "negative_strides": (negative_strides, "a tensor with negative or non-integer strides (-2, 1)"),
    "foreign_rebuild_function": (
        foreign_rebuild_function,
        "_rebuild_from_type_v2 with the foreign function torch._utils._rebuild_sparse_tensor",
    ),
    "setitem_on_list": (setitem_on_list, "malformed pickle"),
    "trailing_garbage": (trailing_garbage, "11 unexpected byte(s) after the pickle's end"),
    "shard_escapes_directory": (shard_escapes_directory, "shard '../outside.safetensors' lies outside"),
    "fifo": (fifo, "not a regular file (a device, FIFO or socket)"),
    "symlink_to_dev_zero": (symlink_to_dev_zero, "not a regular file (a device, FIFO or socket)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_gets_a_format_error(case: str, tmp_path: Path, touch: str) -> None:
    maker, fragment = BROKEN[case]
    path = maker(tmp_path, touch)
    model = make_net(10)
    before = snapshot(model)
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.load(model, path)
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(str(path))
    assert_unchanged(model, before)
    with pytest.raises(CheckpointFormatError):
        smartload.inspect(path)


def test_nonfinite_values_are_refused_naming_the_key(tmp_path: Path) -> None:
    sd = _weights()
    sd["conv.weight"][0, 0, 0, 0] = float("nan")
    sd["fc.bias"][3] = float("inf")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    model = make_net(10, seed=5)
    before = snapshot(model)
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.load(model, path)
    assert "non-finite values in 2 tensor(s): conv.weight (1 NaN), fc.bias (1 Inf)" in str(
        caught.value
    )
    assert "on_nonfinite='allow'" in str(caught.value)
    assert_unchanged(model, before)
    smartload.load(model, path, on_nonfinite="allow")
    assert torch.isnan(model.conv.weight[0, 0, 0, 0])


# --------------------------------------------------------------------------------------------------
# structures that attack the reader itself: refused quickly, with a smartload error


def build_into_tensor_record(tmp: Path, cmd: str) -> Path:
    """BUILD on a rebuilt tensor would move its view to another storage after validation."""
    weight = Build(tensor("0", 2, (2,), (1,)), {"offset": 8})
    return torch_zip(
        tmp / "build.pth", assemble({"weight": weight}), {"0": b"\x00" * 8, "1": b"\x01" * 8}
    )


def deep_tuple_key(tmp: Path, cmd: str) -> Path:
    path = tmp / "deep.pkl"
    path.write_bytes(
        b"\x80\x02})" + b"\x85" * 200_000 + b"K\x01s."
    )  # hashing it would crash CPython
    return path


def deep_tuple_behind_pop_after_mark(tmp: Path, cmd: str) -> Path:
    """POP right after MARK drops the mark in C, not the item: a walk that pops the item loses
    track of the tuple still on the stack, which then grows 98 levels per round (found in review)."""
    rounds = b"(0K\x00\x86" + b"\x85" * 98  # MARK POP BININT1 TUPLE2 TUPLE1*98
    path = tmp / "pop.pkl"
    path.write_bytes(b"\x80\x02)" + b"\x85" * 98 + rounds * 2000 + b"q\x000}h\x00K\x00s.")
    return path


def deep_tuple_behind_memoize(tmp: Path, cmd: str) -> Path:
    """MEMOIZE writes at the count of filled memo slots, not of PUTs: after a slot is written
    twice, a walk that counts PUTs files the deep tuple under the wrong index (found in review)."""
    rounds = b"\x940h\x01" + b"\x85" * 98  # MEMOIZE POP BINGET 1 TUPLE1*98
    path = tmp / "memoize.pkl"
    path.write_bytes(
        b"\x80\x04K\x00q\x01\x940)" + b"\x85" * 98 + rounds * 2000 + b"\x940}h\x01K\x00s."
    )
    return path


def huge_memo_index(tmp: Path, cmd: str) -> Path:
    path = tmp / "memo.pkl"
    path.write_bytes(b"(lp300000000\n.")  # 14 bytes that make the C unpickler allocate 4.6 GB
    return path


def flood_of_globals(tmp: Path, cmd: str) -> Path:
    path = tmp / "globals.pkl"
    path.write_bytes(b"\x80\x02" + b"".join(b"ca\n%d\n0" % i for i in range(200_000)) + b"N.")
    return path


def untyped_storage_not_a_multiple(tmp: Path, cmd: str) -> Path:
    storage = Pid(("storage", Global("torch", "UntypedStorage"), "0", "cpu", 17))
    v3 = Global("torch._utils", "_rebuild_tensor_v3")
    weight = Call(v3, (storage, 0, (4,), (1,), False, ORDERED_DICT, Global("torch", "float32")))
    return torch_zip(tmp / "v3.pth", assemble({"weight": weight}), {"0": b"\x00" * 17})


def safetensors_dtype_not_a_string(tmp: Path, cmd: str) -> Path:
    header = json.dumps({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp / "dtype.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)
    return path


def safetensors_deep_json(tmp: Path, cmd: str) -> Path:
    header = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def fifo_shard(tmp: Path, cmd: str) -> Path:
    os.mkfifo(tmp / "x.safetensors")
    path = tmp / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"weight": "x.safetensors"}}))
    return path


def index_names_itself(tmp: Path, cmd: str) -> Path:
    path = tmp / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"weight": "model.safetensors.index.json"}}))
    return path


ATTACKS: dict[str, tuple[Maker, str]] = {
    "build_into_tensor_record": (build_into_tensor_record, "BUILD applied to a TensorRecord"),
    "deep_tuple_key": (deep_tuple_key, "tuples nested more than 100 deep"),
    "deep_tuple_behind_pop_after_mark": (deep_tuple_behind_pop_after_mark, "tuples nested more than 100 deep"),
    "deep_tuple_behind_memoize": (deep_tuple_behind_memoize, "tuples nested more than 100 deep"),
    "huge_memo_index": (huge_memo_index, "a memo index 300000000 far beyond the 0 objects memoized"),
    "flood_of_globals": (flood_of_globals, "more than 100000 global lookups"),
    "untyped_storage_not_a_multiple": (untyped_storage_not_a_multiple, "a float32 tensor on storage '0' of 17 bytes"),
    "safetensors_dtype_not_a_string": (safetensors_dtype_not_a_string, "tensor 'a': unknown dtype a list of 1"),
    "safetensors_deep_json": (safetensors_deep_json, "safetensors header is not valid JSON"),
    "fifo_shard": (fifo_shard, "not a regular file (a device, FIFO or socket)"),
    "index_names_itself": (index_names_itself, "shard 'model.safetensors.index.json' is not a weights file"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_attacks_on_the_reader_are_refused_quickly(case: str, tmp_path: Path, touch: str) -> None:
    maker, fragment = ATTACKS[case]
    path = maker(tmp_path, touch)
    model = torch.nn.Linear(2, 1)
    before = snapshot(model)
    started = time.perf_counter()
    for call in (lambda: smartload.load(model, path), lambda: smartload.inspect(path)):
        with pytest.raises(smartload.SmartloadError) as caught:
            call()
        assert fragment in str(caught.value)
    assert time.perf_counter() - started < 10  # a generous bound: the attacks ran for minutes
    assert_unchanged(model, before)


def test_shared_and_self_referencing_containers_are_walked_once(tmp_path: Path) -> None:
    """A 3 KB dict whose 200 entries all point back to it: inspect answers at once."""
    path = tmp_path / "dag.pkl"
    entries = b"".join(b"X\x04\x00\x00\x00k%03d" % i + b"h\x00" for i in range(200))
    path.write_bytes(b"\x80\x02}q\x00(" + entries + b"u.")
    started = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match="no state dict found"):
        smartload.inspect(path)
    assert time.perf_counter() - started < 5


def test_huge_integers_beside_the_weights_are_described_briefly(tmp_path: Path) -> None:
    weights = {"weight": tensor("0", 2, (1, 2), (2, 1))}
    epoch = Raw(b"\x8b" + struct.pack("<i", 3000) + b"\x7f" * 3000)  # LONG4: a 3000-byte int
    data = assemble({"model": weights, "epoch": epoch})
    path = torch_zip(tmp_path / "bigint.pth", data, {"0": struct.pack("<2f", 1.0, 2.0)})
    info = smartload.inspect(path)
    assert info.extras == {"epoch": "an integer of 23999 bits"}


def test_failed_reads_free_what_they_built(tmp_path: Path, touch: str) -> None:
    """After an error the C unpickler keeps its stack, which gc cannot see into: nothing on it may
    lead back to the unpickler, or every failed load leaks (found by fuzzing)."""
    import gc

    from smartload._unpickler import _Unpickler

    files = [
        storage_size_lie(tmp_path, touch),
        reduce_in_torch_zip(tmp_path, touch),
        object_ndarray_pkl(tmp_path, touch),
    ]
    for path in files:
        for _ in range(3):
            with pytest.raises(smartload.SmartloadError):
                smartload.inspect(path)
    gc.collect()
    assert [o for o in gc.get_objects() if type(o) is _Unpickler] == []
