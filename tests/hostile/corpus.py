"""The adversarial corpus: every case is built here, in pure Python, at test time.

``CASES`` maps a name to a :class:`Case`: how to build the file (given a folder and a shell command
a payload would run), and what smartload must answer: the error type and a fragment of its message,
the exact hostile globals for refusals, or ``None`` for files that must load.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cost_attacks as attacks
import numpy as np
import torch
from conftest import Payload, make_net
from pickle_asm import Build, Call, Global, New, assemble, tensor, torch_zip
from safetensors.torch import save_file
from test_hostile import (
    compressed_member,
    crc_mismatch,
    dotted_stack_global,
    duplicate_data_pkl,
    empty_file,
    foreign_rebuild_function,
    gzipped_checkpoint,
    importlib_chain,
    legacy_tar,
    negative_strides,
    numpy_build_gadget,
    object_ndarray_pkl,
    overlapping_safetensors,
    png_named_pt,
    protocol0_eval,
    reduce_in_torch_zip,
    setitem_on_list,
    shard_escapes_directory,
    storage_size_lie,
    symlink_to_dev_zero,
    torchscript_archive,
    truncated_pth,
    truncated_safetensors,
    view_past_storage,
)

from smartload import CheckpointFormatError, UnsafeCheckpointError

Maker = Callable[[Path, str], Path]


@dataclass(frozen=True)
class Case:
    make: Maker
    error: type[Exception] | None  # None: the file must load
    fragment: str = ""
    globals: list[str] = field(default_factory=list)
    verdict: str = "SAFE"  # inspect's verdict on a file it reads (UNKNOWN: globals not known data)
    load_kwargs: dict[str, object] = field(default_factory=dict)  # for smartload.load


def unsafe(make: Maker, *names: str) -> Case:
    return Case(make, UnsafeCheckpointError, f"it names {', '.join(names)}", list(names))


def broken(make: Maker, fragment: str) -> Case:
    return Case(make, CheckpointFormatError, fragment)


def _weights() -> dict[str, torch.Tensor]:
    return make_net(10, seed=1).state_dict()


def _pkl(name: str, data: bytes) -> Maker:
    def make(tmp: Path, cmd: str) -> Path:
        path = tmp / name
        path.write_bytes(data.replace(b"CMD", cmd.encode()))
        return path

    return make


def _call_global(module: str, name: str, protocol: int = 2) -> Maker:
    def make(tmp: Path, cmd: str) -> Path:
        payload = {"model": {}, "x": Call(Global(module, name), (cmd,))}
        return torch_zip(tmp / f"{module}_{name}.pth", assemble(payload, protocol))

    return make


def memo_obfuscation(tmp: Path, cmd: str) -> Path:
    """The global is memoized under a harmless-looking index and fetched back before the call."""
    data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01cposix\nsystem\nq\x07X\x01\x00\x00\x00bh\x07"
    data += b"X" + struct.pack("<I", len(cmd)) + cmd.encode() + b"\x85Ru."
    return torch_zip(tmp / "memo.pth", data)


def nested_pickle_loads(tmp: Path, cmd: str) -> Path:
    inner = pickle.dumps(Payload(cmd), protocol=2).decode("latin1")
    outer = Call(Global("pickle", "loads"), (Call(Global("_codecs", "encode"), (inner, "latin1")),))
    return torch_zip(tmp / "nested.pth", assemble({"model": {}, "x": outer}))


def partial_torch_load(tmp: Path, cmd: str) -> Path:
    partial = Build(
        Call(Global("functools", "partial"), (Global("torch", "load"),)),
        (Global("torch", "load"), (cmd,), {"weights_only": False}, None),
    )
    return torch_zip(tmp / "partial.pth", assemble({"model": {}, "x": Call(partial, ())}))


def payload_then_garbage(tmp: Path, cmd: str) -> Path:
    path = tmp / "garbage.pkl"
    path.write_bytes(pickle.dumps(Payload(cmd), protocol=2) + b"\x00\xff garbage \x93\x94")
    return path


def frame_divergence(tmp: Path, cmd: str) -> Path:
    body = pickle.dumps({"model": {}}, protocol=4)[11:]  # after PROTO and the FRAME header
    path = tmp / "frame.pkl"
    path.write_bytes(b"\x80\x04\x95" + struct.pack("<Q", len(body) + 1000) + body)
    return path


def eval_built_magic(tmp: Path, cmd: str) -> Path:
    """A legacy torch file whose magic number is computed by eval."""
    path = tmp / "legacy.pt"
    path.write_bytes(b"c__builtin__\neval\n(S'0x1950a86a20f9469cfc6c'\ntR." + pickle.dumps(1001, 2))
    return path


def _patch_zip(make_zip: Callable[[Path], Path], patch: Callable[[bytearray], None]) -> Maker:
    def make(tmp: Path, cmd: str) -> Path:
        path = make_zip(tmp)
        data = bytearray(path.read_bytes())
        patch(data)
        path.write_bytes(bytes(data))
        return path

    return make


def _simple_zip(tmp: Path) -> Path:
    weights = {"weight": tensor("0", 2, (1, 2), (2, 1))}
    return torch_zip(tmp / "patched.pth", assemble(weights), {"0": struct.pack("<2f", 1, 2)})


def _set_encrypted_flag(data: bytearray) -> None:
    at = data.index(b"PK\x01\x02")  # first central directory entry (archive/data.pkl)
    data[at + 8] |= 0x1


def _rename_in_local_header(data: bytearray) -> None:
    at = data.index(b"archive/data.pkl")  # the local header's copy comes first
    data[at : at + 16] = b"archive/data.pkX"


def _declare_huge_member(data: bytearray) -> None:
    at = data.index(b"PK\x01\x02", data.index(b"archive/data/0"))  # central entry of data/0
    data[at + 20 : at + 28] = struct.pack("<II", 0xFFFFFFF0, 0xFFFFFFF0)  # 4 GB, in a 1 KB file


def zip_bomb(tmp: Path, cmd: str) -> Path:
    """1 GB of zeros, DEFLATEd to about 1 MB: refused without inflating a byte."""
    path = tmp / "bomb.pth"
    chunk = zlib.compressobj(9, zlib.DEFLATED, -15)
    raw = b"".join(chunk.compress(b"\x00" * 2**24) for _ in range(64)) + chunk.flush()
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("archive/data.pkl")
        info.compress_type = zipfile.ZIP_STORED
        z.writestr(info, pickle.dumps({}, protocol=2))
    data = bytearray(path.read_bytes())
    # append a deflated member by hand: local header + data + central entry + end record
    name = b"archive/data/0"
    local = struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, 0, len(raw), 2**30, len(name), 0
    )
    cd_at = data.index(b"PK\x01\x02")
    central_old, end_old = (
        data[cd_at : data.index(b"PK\x05\x06")],
        data[data.index(b"PK\x05\x06") :],
    )
    new_offset = cd_at
    body = data[:cd_at] + local + name + raw
    central = struct.pack(
        "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, 0, len(raw), 2**30, len(name),
        0, 0, 0, 0, 0, new_offset,
    ) + name  # fmt: skip
    cd = central_old + central
    end = bytearray(end_old)
    struct.pack_into("<HHII", end, 8, 2, 2, len(cd), len(body))
    path.write_bytes(bytes(body + cd + end))
    return path


def pickle_then_zip(tmp: Path, cmd: str) -> Path:
    buf = io.BytesIO()
    torch.save(_weights(), buf)
    path = tmp / "polyglot.pth"
    path.write_bytes(pickle.dumps({"model": {}}, protocol=2) + buf.getvalue())
    return path


def safetensors_then_zip(tmp: Path, cmd: str) -> Path:
    path = tmp / "polyglot.safetensors"
    save_file(_weights(), str(path))
    buf = io.BytesIO()
    torch.save({"x": Payload(cmd)}, buf)
    path.write_bytes(path.read_bytes() + buf.getvalue())
    return path


def empty_directory(tmp: Path, cmd: str) -> Path:
    path = tmp / "checkpoints"
    path.mkdir()
    return path


def symlink_to_fifo(tmp: Path, cmd: str) -> Path:
    os.mkfifo(tmp / "fifo")
    path = tmp / "link.pth"
    path.symlink_to(tmp / "fifo")
    return path


def _safetensors(header: object, data: bytes = b"\x00" * 8, raw: bytes | None = None) -> Maker:
    def make(tmp: Path, cmd: str) -> Path:
        text = raw if raw is not None else json.dumps(header).encode()
        path = tmp / "crafted.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
        return path

    return make


def header_length_2_40(tmp: Path, cmd: str) -> Path:
    path = tmp / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}" + b"\x00" * 14)
    return path


def ten_million_entries(tmp: Path, cmd: str) -> Path:
    """A header declaring 10M entries (about 450 MB of JSON), sparse on disk: refused by size."""
    path = tmp / "ten_million.safetensors"
    n = 10_000_000 * 45
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + b'{"t0":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}')
        f.truncate(8 + n)
    return path


def _entry(shape: list[int], begin: int, end: int, dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def nan_inf_tensors(tmp: Path, cmd: str) -> Path:
    sd = _weights()
    sd["fc.weight"][0, 0] = float("nan")
    path = tmp / "nan.pth"
    torch.save(sd, path)
    return path


def py2_latin1_pkl(tmp: Path, cmd: str) -> Path:
    """A Python 2 pickle: protocol 2, numpy data as latin1 str (as Detectron1 wrote them)."""
    arr = np.arange(4, dtype=np.float32)
    data = pickle.dumps({"blobs": {"fc_w": arr}}, protocol=2)
    path = tmp / "py2.pkl"
    path.write_bytes(data.replace(b"_codecs\nencode", b"_codecs\nencode"))  # same opcodes py2 wrote
    return path


def _zoo_pkl(protocol: int) -> Maker:
    def make(tmp: Path, cmd: str) -> Path:
        arrays = {k: v.numpy() for k, v in _weights().items()}
        path = tmp / f"zoo{protocol}.pkl"
        path.write_bytes(
            pickle.dumps({"model": arrays, "__author__": "Detectron2 Model Zoo"}, protocol=protocol)
        )
        return path

    return make


# -- whole-model pickles (torch.save(model), YOLO .pt): module stand-ins ---------------------------


def _module(cls: str, params: object = None, modules: object = None, **attrs: object) -> Build:
    """A module pickled as torch pickles one: NEWOBJ(cls) + BUILD(__dict__)."""
    module, _, name = cls.rpartition(".")
    state = {
        "training": True,
        "_parameters": params or {},
        "_buffers": {},
        "_modules": modules or {},
    }
    return Build(New(Global(module, name)), {**state, **attrs})


def _module_zip(name: str, obj: object) -> Maker:
    def make(tmp: Path, cmd: str) -> Path:
        storage = struct.pack("<4f", 1, 2, 3, 4)
        return torch_zip(tmp / name, assemble({"model": obj}), {"0": storage})

    return make


_W = tensor("0", 4, (2, 2), (2, 1))


def whole_model(tmp: Path, cmd: str) -> Path:
    path = tmp / "whole.pt"
    torch.save(make_net(10, seed=1), path)  # conftest.SmallNet: never imported by smartload
    return path


def whole_model_protocol0(tmp: Path, cmd: str) -> Path:
    path = tmp / "whole0.pt"  # copyreg._reconstructor(cls, object, None) + BUILD
    torch.save({"model": make_net(10, seed=1).half()}, path, pickle_protocol=1)
    return path


def module_attribute_payload(tmp: Path, cmd: str) -> Path:
    net = make_net(10, seed=1)
    net.hook = Payload(cmd)  # an attribute of the module: a __reduce__ → os.system payload
    path = tmp / "module_payload.pt"
    torch.save(net, path)
    return path


def module_cycle(tmp: Path, cmd: str) -> Path:
    net = make_net(10, seed=1)
    net._modules["again"] = net
    path = tmp / "cycle.pt"
    torch.save({"model": net}, path)
    return path


CASES: dict[str, Case] = {
    # code-execution attempts: refused as hostile, every global named
    "os_system_reduce_in_torch_zip": unsafe(reduce_in_torch_zip, "posix.system"),
    "os_system_global": unsafe(_call_global("os", "system"), "os.system"),
    "posix_system_global": unsafe(_call_global("posix", "system"), "posix.system"),
    "protocol0_builtin_eval": unsafe(protocol0_eval, "builtins.eval"),
    "subprocess_popen": unsafe(_call_global("subprocess", "Popen"), "subprocess.Popen"),
    "runpy_run_code": unsafe(_call_global("runpy", "_run_code"), "runpy._run_code"),
    "timeit_timeit": unsafe(_call_global("timeit", "timeit"), "timeit.timeit"),
    "cprofile_run": unsafe(_call_global("cProfile", "run"), "cProfile.run"),
    "pip_main": unsafe(_call_global("pip", "main"), "pip.main"),
    "pydoc_pipepager": unsafe(_call_global("pydoc", "pipepager"), "pydoc.pipepager"),
    "getattr_importlib_chain": unsafe(importlib_chain, "builtins.getattr", "importlib.import_module"),
    "dotted_stack_global": unsafe(dotted_stack_global, "pathlib.os.system"),
    "numpy_prod_build_gadget": unsafe(numpy_build_gadget, "numpy.prod"),
    "numpy_builtins": unsafe(_call_global("numpy", "__builtins__"), "numpy.__builtins__"),
    "memo_put_get_obfuscation": unsafe(memo_obfuscation, "posix.system"),
    "nested_pickle_loads": unsafe(nested_pickle_loads, "pickle.loads"),
    "partial_torch_load": unsafe(partial_torch_load, "functools.partial", "torch.load"),
    "numpy_load": unsafe(_call_global("numpy", "load"), "numpy.load"),
    "object_ndarray": unsafe(object_ndarray_pkl, "numpy.dtype('O')"),
    "object_ndarray_harmless": unsafe(
        _pkl("harmless.pkl", pickle.dumps({"model": {"w": np.array([1, 2], dtype=object)}}, 2)),
        "numpy.dtype('O')",
    ),
    "payload_then_garbage": unsafe(payload_then_garbage, "posix.system"),
    "legacy_eval_built_magic": unsafe(eval_built_magic, "builtins.eval"),
    # a hostile pickle hidden anywhere is reported first (the other problem is mentioned after)
    "polyglot_safetensors_then_zip": unsafe(safetensors_then_zip, "posix.system"),
    # malformed or refused by design
    "frame_length_divergence": broken(frame_divergence, "malformed pickle"),
    "rebuild_from_type_foreign_function": broken(foreign_rebuild_function, "foreign function"),
    "setitem_on_list": broken(setitem_on_list, "malformed pickle"),
    "storage_size_lie": broken(storage_size_lie, "declares 4000 bytes but holds 16"),
    "storage_offset_past_end": broken(view_past_storage, "reads past the end of storage"),
    "negative_strides": broken(negative_strides, "negative or non-integer strides"),
    "torchscript_archive": broken(torchscript_archive, "a TorchScript archive"),
    "legacy_tar": broken(legacy_tar, "a tar archive"),
    "crc_mismatch": broken(crc_mismatch, "CRC mismatch"),
    "zip_encrypted_flag": broken(_patch_zip(_simple_zip, _set_encrypted_flag), "is encrypted"),
    "zip_local_central_name_mismatch": broken(
        _patch_zip(_simple_zip, _rename_in_local_header), "local/central name mismatch"
    ),
    "duplicate_data_pkl": broken(duplicate_data_pkl, "duplicate zip member"),
    "deflate_zip_bomb": broken(zip_bomb, "is compressed (method 8)"),
    "member_declaring_4gb": broken(_patch_zip(_simple_zip, _declare_huge_member), "more than the file"),
    "compressed_data_pkl": broken(compressed_member, "is compressed"),
    "polyglot_pickle_then_zip": broken(pickle_then_zip, "unexpected byte(s) after the pickle's end"),
    "truncated_pth": broken(truncated_pth, "corrupt zip archive"),
    "truncated_safetensors": broken(truncated_safetensors, "the data area is truncated"),
    "empty_file": broken(empty_file, "empty file (0 bytes)"),
    "empty_directory": broken(empty_directory, "a directory without a checkpoint"),
    "symlink_to_dev_zero": broken(symlink_to_dev_zero, "not a regular file"),
    "symlink_to_fifo": broken(symlink_to_fifo, "not a regular file"),
    "png_named_pt": broken(png_named_pt, "a PNG image"),
    "gzip_checkpoint": broken(gzipped_checkpoint, "gzip-compressed data"),
    "shard_index_dotdot": broken(shard_escapes_directory, "lies outside the index's directory"),
    "safetensors_header_2_40": broken(header_length_2_40, "a safetensors header length larger than the file"),
    "safetensors_overlapping": broken(overlapping_safetensors, "overlaps the previous tensor"),
    "safetensors_gapped": broken(
        _safetensors({"a": _entry([1], 0, 4), "b": _entry([1], 8, 12)}, b"\x00" * 12),
        "tensor 'b' at byte 8 leaves a gap before it",
    ),
    "safetensors_out_of_range": broken(
        _safetensors({"a": _entry([4], 0, 16)}), "the data area is truncated"
    ),
    "safetensors_unknown_dtype": broken(
        _safetensors({"a": _entry([2], 0, 8, "F128")}), "tensor 'a': unknown dtype 'F128'"
    ),
    "safetensors_negative_shape": broken(
        _safetensors({"a": _entry([-2], 0, 8)}), "tensor 'a': invalid shape (a list of 1)"
    ),
    "safetensors_overflowing_shape": broken(
        _safetensors({"a": _entry([2**40, 2**40], 0, 8)}), "tensor 'a': invalid shape (a list of 2)"
    ),
    "safetensors_duplicate_keys": broken(
        _safetensors(None, raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                               b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
        "duplicate key 'a'",
    ),  # fmt: skip
    "safetensors_ten_million_entries": broken(ten_million_entries, "exceeds the file or the 100 MB limit"),
    # whole-model pickles: only NEWOBJ + one BUILD per module, only tensors in its slots
    "module_attribute_reduce_payload": unsafe(module_attribute_payload, "posix.system"),
    "module_parameter_made_by_call": Case(
        _module_zip("param_call.pt", _module("zoo.Net", {"weight": Call(Global("zoo.weights", "make"), ("w",))})),
        UnsafeCheckpointError, "the parameter 'weight' is made by calling zoo.weights.make", ["zoo.weights.make"],
    ),
    "module_submodule_made_by_call": Case(
        _module_zip("child_call.pt", _module("zoo.Net", {"w": _W}, {"fc": Build(Call(Global("zoo", "Linear"), ()), {"_parameters": {"w": _W}, "_buffers": {}, "_modules": {}})})),
        UnsafeCheckpointError, "the module at 'fc' (zoo.Linear) is made by calling zoo.Linear(...)", ["zoo.Linear"],
    ),
    "module_setstate_tuple_state": broken(
        _module_zip("tuple_state.pt", Build(New(Global("zoo", "Net")), (None, {"_parameters": {"w": _W}, "_modules": {}}))),
        "carries its state in a tuple of 2, not the plain __dict__ torch pickles; restoring it would need the class's own __setstate__",
    ),
    "module_built_twice": broken(
        _module_zip("twice.pt", Build(_module("zoo.Net", {"w": _W}), {"_parameters": {"w": _W}, "_buffers": {}, "_modules": {}})),
        "is given its state 2 times (BUILD)",
    ),
    "module_build_on_tensor": broken(
        _module_zip("build_tensor.pt", _module("zoo.Net", {"w": Build(_W, {"__class__": Global("zoo", "Evil")})})),
        "BUILD applied to a TensorRecord",
    ),
    "module_build_on_parameter_class": unsafe(
        _module_zip("build_global.pt", _module("zoo.Net", {"w": _W}, extra=Build(Global("torch.nn.parameter", "Parameter"), {"data": 1}))),
        "torch.nn.parameter.Parameter",
    ),
    "module_dotted_parameter_name": broken(
        _module_zip("dotted.pt", _module("zoo.Net", {"fc.weight": _W})),
        "_parameters has the entry 'fc.weight', not an attribute name",
    ),
    "module_cycle": broken(module_cycle, "the module at 'again' contains itself (a cycle)"),
    "module_non_persistent_set_call": Case(
        _module_zip("set_call.pt", _module("zoo.Net", {"w": _W}, _non_persistent_buffers_set=Call(Global("zoo", "names"), ()))),
        UnsafeCheckpointError, "_non_persistent_buffers_set is made by calling zoo.names, not a set of names", ["zoo.names"],
    ),
    # these load (or, for inspect, read) fine
    "whole_model_torch_save": Case(whole_model, None, verdict="UNKNOWN"),
    "whole_model_protocol_1_fp16": Case(whole_model_protocol0, None, verdict="UNKNOWN"),
    "nan_inf_tensors": Case(nan_inf_tensors, CheckpointFormatError, "non-finite values in 1 tensor(s): fc.weight"),
    "py2_latin1_pkl": Case(py2_latin1_pkl, None),
    "detectron2_pkl_protocol_2": Case(_zoo_pkl(2), None),
    "detectron2_pkl_protocol_4": Case(_zoo_pkl(4), None),
    "detectron2_pkl_protocol_5": Case(_zoo_pkl(5), None),
}  # fmt: skip


# -- samples from other scanners' test suites (tests/hostile/samples, under their licences) --------

SAMPLES = Path(__file__).parent / "samples"


def _sample(name: str) -> Maker:
    def make(tmp: Path, cmd: str) -> Path:
        return Path(shutil.copyfile(SAMPLES / name, tmp / Path(name).name))

    return make


def _built(make: Callable[[Path], Path]) -> Maker:
    """A file built by tests/hostile/test_verdict.py (with its own payload)."""
    return lambda tmp, cmd: make(tmp)


_SAMPLE_GLOBALS: dict[str, list[str]] = {
    "picklescan/GHSA-3gf5-cxq9-w223.pkl": ["idlelib.pyshell.ModifiedInterpreter.runcode"],
    "picklescan/GHSA-3vg9-h568-4w9m.pkl": ["idlelib.debugobj.ObjectTreeItem.SetText"],
    "picklescan/GHSA-4675-36f9-wf6r.pkl": ["ctypes.CDLL"],
    "picklescan/GHSA-46h3-79wf-xr6c.pkl": ["builtins.__import__", "_operator.attrgetter"],
    "picklescan/GHSA-49gj-c84q-6qm9.pkl": ["cProfile.run"],
    "picklescan/GHSA-4r9r-ch6f-vxmx.pkl": ["torch.utils.bottleneck.__main__.run_cprofile"],
    "picklescan/GHSA-4whj-rm5r-c2v8.pkl": ["torch.utils.bottleneck.__main__.run_autograd_prof"],
    "picklescan/GHSA-5qwp-399c-mjwf.pkl": ["trace.Trace.run"],
    "picklescan/GHSA-6vqj-c2q5-j97w.pkl": ["profile.Profile.runctx"],
    "picklescan/GHSA-6w4w-5w54-rjvr.pkl": ["idlelib.autocomplete.AutoComplete.get_entity"],
    "picklescan/GHSA-7cq8-mj8x-j263.pkl": ["idlelib.autocomplete.AutoComplete.fetch_completions"],
    "picklescan/GHSA-7wx9-6375-f5wh.pkl": ["profile.run"],
    "picklescan/GHSA-84r2-jw7c-4r5q.pkl": ["operator.methodcaller", "pydoc.locate"],
    "picklescan/GHSA-86cj-95qr-2p4f.pkl": ["torch._dynamo.guards.GuardBuilder.get"],
    "picklescan/GHSA-8r4j-24qv-fmq9.pkl": ["idlelib.calltip.Calltip.fetch_tip"],
    "picklescan/GHSA-955r-x9j8-7rhh.pkl": ["builtins.__import__", "_operator.methodcaller"],
    "picklescan/GHSA-9w88-8rmg-7g2p.pkl": ["cProfile.runctx"],
    "picklescan/GHSA-9xph-j2h6-g47v.pkl": ["idlelib.calltip.get_entity"],
    "picklescan/GHSA-cj3c-v495-4xqh.pkl": ["code.InteractiveInterpreter.runcode"],
    "picklescan/GHSA-f4x7-rfwp-v3xw.pkl": ["torch.fx.experimental.symbolic_shapes.ShapeEnv.evaluate_guards_expression"],
    "picklescan/GHSA-f54q-57x4-jg88.pkl": ["lib2to3.pgen2.grammar.Grammar.loads"],
    "picklescan/GHSA-f745-w6jp-hpxx.pkl": ["torch.utils.collect_env.run"],
    "picklescan/GHSA-fqq6-7vqf-w3fg.pkl": ["doctest.debug_script"],
    "picklescan/GHSA-g344-hcph-8vgg.pkl": ["trace.Trace.runctx"],
    "picklescan/GHSA-g38g-8gr9-h9xp-aix-support.pkl": ["_aix_support._read_cmd_output"],
    "picklescan/GHSA-g38g-8gr9-h9xp-imaplib.pkl": ["imaplib.IMAP4_stream"],
    "picklescan/GHSA-g38g-8gr9-h9xp-osx-support.pkl": ["_osx_support._read_output"],
    "picklescan/GHSA-g38g-8gr9-h9xp-pyrepl-pager.pkl": ["_pyrepl.pager.pipe_pager"],
    "picklescan/GHSA-g38g-8gr9-h9xp-test.pkl": ["test.support.script_helper.assert_python_ok"],
    "picklescan/GHSA-g38g-8gr9-h9xp-uuid.pkl": ["uuid._get_command_stdout"],
    "picklescan/GHSA-h3qp-7fh3-f8h4.pkl": ["torch.utils.data.datapipes.utils.decoder.basichandlers"],
    "picklescan/GHSA-j343-8v2j-ff7w.pkl": ["idlelib.pyshell.ModifiedInterpreter.runcommand"],
    "picklescan/GHSA-jgw4-cr84-mqxg.bin": ["asyncio.unix_events._UnixSubprocessTransport._start"],
    "picklescan/GHSA-jhph-76pp-mggw.pkl": ["torch.utils.collect_env.run_and_read_all", "torch.utils.collect_env.run"],
    "picklescan/GHSA-m273-6v24-x4m4.pkl": ["distutils.file_util.write_file"],
    "picklescan/GHSA-m869-42cg-3xwr.pkl": ["idlelib.run.Executive.runcode"],
    "picklescan/GHSA-p9w7-82w4-7q8m.pkl": ["lib2to3.pgen2.pgen.ParserGenerator.make_label"],
    "picklescan/GHSA-q77w-mwjj-7mqx.pkl": ["asyncio.unix_events._UnixSubprocessTransport._start"],
    "picklescan/GHSA-r8g5-cgf2-4m4m.pkl": ["numpy.f2py.crackfortran.getlincoef"],
    "picklescan/GHSA-vqmv-47xg-9wpr.pkl": ["pty.spawn"],
    "picklescan/GHSA-vr7h-p6mm-wpmh.pkl": ["torch.jit.unsupported_tensor_ops.execWrapper"],
    "picklescan/GHSA-vv6j-3g6g-2pvj.pkl": ["torch.utils._config_module.ConfigModule.load_config"],
    "picklescan/GHSA-vvpj-8cmc-gx39.pkl": ["pkgutil.resolve_name"],
    "picklescan/GHSA-x696-vm39-cp64.pkl": ["profile.Profile.run"],
    "picklescan/GHSA-xp4f-hrf8-rxw7.pkl": ["ensurepip._run_pip"],
    "picklescan/cloudpickle_codeinjection.pkl": [
        "cloudpickle.cloudpickle._make_function", "cloudpickle.cloudpickle._builtin_type",
        "cloudpickle.cloudpickle._make_empty_cell", "cloudpickle.cloudpickle._function_setstate",
        "cloudpickle.cloudpickle._make_cell", "cloudpickle.cloudpickle.subimport",
    ],
    "picklescan/dns_exfiltration.npy": ["ssl.get_server_certificate"],  # a numpy object array
    "picklescan/io_FileIO.pkl": ["_io.FileIO"],
    "picklescan/keyerror-exploit.pkl": ["os.system"],
    "picklescan/logging_FileHandler.pkl": ["logging.FileHandler"],
    # getattr(dict, "get") is passed to apply: not a method reference kept as data
    "picklescan/malicious0.pkl": [
        "builtins.globals", "builtins.compile", "builtins.eval", "builtins.getattr",
        "builtins.dict.get", "builtins.apply",
    ],
    "picklescan/malicious1.zip": ["builtins.eval"],  # data.pkl at the root: not a torch archive
    "picklescan/malicious10.pkl": ["builtins.exec"],
    "picklescan/malicious11.pkl": ["os.system"],  # protocol 0 without PROTO, names from the memo
    "picklescan/malicious13a.pkl": ["pickle.loads"],
    "picklescan/malicious14.pkl": ["runpy._run_code"],
    "picklescan/malicious1_0x1.zip": ["builtins.eval"],  # a member flagged encrypted
    "picklescan/malicious1_central_directory.zip": ["builtins.eval"],
    "picklescan/malicious23.pkl": ["os.system"],
    "picklescan/malicious6.pkl": ["requests.api.get"],  # in a second pickle after the first
    "picklescan/pytorch_magic_bypass.pt": ["builtins.eval"],
    "picklescan/sys_module_override_sploit.pkl": ["torch._utils"],  # BUILD on a global
    "picklescan/type-confusion-exploit.pkl": ["os.system"],
    "picklescan/types_CodeType.pkl": ["types.CodeType"],
    "picklescan/urllib_request_urlopen.pkl": ["urllib.request.urlopen"],
    "modelscan/unsafe_zip_pytorch.pt": ["posix.system"],
}  # fmt: skip


def _verdict_cases() -> dict[str, Case]:
    from test_verdict import UNSAFE_FIRST, _config_object

    cases = {
        f"unsafe_first_{name}": unsafe(_built(make), *hostile)
        for name, (make, hostile, _) in UNSAFE_FIRST.items()
    }
    cases["unknown_config_object"] = Case(_built(_config_object), None, verdict="UNKNOWN")
    return cases


CASES.update(
    {
        f"sample_{Path(name).stem}": unsafe(_sample(name), *found)
        for name, found in _SAMPLE_GLOBALS.items()
    }
)
CASES["sample_picklescan_new_pytorch_model"] = broken(
    _sample("picklescan/new_pytorch_model.bin"), "the file holds a single tensor, not a state dict"
)
CASES.update(_verdict_cases())


# -- issue 14, classes 1-5: files whose cost would outgrow their size, at one size each
# (tests/hostile/test_cost.py grows each one and measures)


def _sized(make: Callable[[Path, int], Path], n: int) -> Maker:
    return lambda tmp, cmd: make(tmp, n)


def _over_budget(make: Callable[[Path, int], Path], what: str) -> Case:
    return broken(_sized(make, 4800), f"{what} would materialise more than ")


CASES.update({
    "shared_list_copied_by_calls": _over_budget(attacks.stand_in_list_argument, "calls of argparse.Namespace"),
    "shared_tuple_as_call_arguments": _over_budget(attacks.stand_in_tuple_arguments, "calls of argparse.Namespace"),
    "shared_state_built_again": _over_budget(attacks.build_shared_state, "BUILDs of zoo.Thing"),
    "shared_bytearray_frombuffer": _over_budget(attacks.frombuffer_shared_bytearray, "numpy _frombuffer calls"),
    "shared_string_encoded": Case(_sized(attacks.codecs_encode_shared, 4800), None),
    "shared_string_ndarrays": Case(_sized(attacks.ndarray_shared_string, 4800), None),
    "shared_container_extras": Case(_sized(attacks.shared_container_extras, 10_000), None),
    "shared_container_nested": Case(_sized(attacks.shared_container_nested, 10_000), None),
    "stand_ins_sharing_state": Case(_sized(attacks.stand_ins_sharing_state, 10_000), None, verdict="UNKNOWN"),
    "long_prefixed_key": Case(_sized(attacks.long_prefixed_key, 160_000), None),
    "broadcast_head_nan": Case(
        lambda tmp, cmd: attacks.broadcast_head(tmp, 2**40, value=float("nan")),
        CheckpointFormatError, "non-finite values in 2 tensor(s): fc.weight (1 NaN), fc.bias (1 NaN)",
        load_kwargs={"num_classes": 10, "class_map": list(range(10))},
    ),
    "overlapping_rows": Case(_sized(attacks.overlapping_rows, 2**18), None),
    "index_naming_itself": broken(attacks.index_naming_itself, "names itself as a shard"),
    "indexes_naming_each_other": broken(attacks.indexes_naming_each_other, "which is already being read"),
    "index_chain": broken(_sized(attacks.index_chain, 2_000), "nested more than 8 deep"),
    "symlink_chain": broken(_sized(attacks.symlink_chain, 1_500), "cannot stat: Too many levels of symbolic links"),
    "shard_symlink_chain": broken(_sized(attacks.shard_symlink_chain, 1_500), "cannot resolve its symbolic links"),
})  # fmt: skip
