"""The three-way verdict of ``smartload.inspect`` and ``smartload inspect``: SAFE when every global
a file names is known to be data, UNKNOWN (exit 6) when some are not, UNSAFE (exit 4) when one is
known to be dangerous: every family of the hostile list, and ahead of whatever else is wrong
with the file. ``load`` keeps reading UNKNOWN files and refuses UNSAFE ones."""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import fractions
import io
import json
import pickle
import struct
import sys
import time
import types
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Payload, assert_same_tensors, make_net
from omegaconf import OmegaConf
from pickle_asm import ORDERED_DICT, REBUILD, Call, Global, assemble, tensor, torch_zip
from safetensors.torch import save_file

import smartload
from smartload import CheckpointFormatError, UnsafeCheckpointError
from smartload._hostile import hostile_reason, is_known_data
from smartload.cli import main

Maker = Callable[[Path], Path]


def _inspect_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = main(["inspect", str(path), "--json"])
    return code, json.loads(capsys.readouterr().out)


def _weights() -> dict[str, torch.Tensor]:
    return make_net(10, seed=1).state_dict()


@contextmanager
def _installed(qualname: str, cls: type) -> Iterator[None]:
    """``cls`` importable as ``qualname`` while a file is saved (as it was where it was made),
    and gone again before smartload reads the file."""
    module_name, _, name = qualname.rpartition(".")
    parts = module_name.split(".")
    added = [
        n for n in (".".join(parts[: i + 1]) for i in range(len(parts))) if n not in sys.modules
    ]
    for package in added:
        sys.modules[package] = types.ModuleType(package)
    cls.__module__, cls.__qualname__, cls.__name__ = module_name, name, name
    setattr(sys.modules[module_name], name, cls)
    try:
        yield
    finally:
        for package in added:
            del sys.modules[package]


class _AttributeDict(dict):  # type: ignore[type-arg]
    """Lightning's AttributeDict (a dict whose keys are also attributes), as it pickles."""


@dataclass
class TrainConfig:
    """A training script's own config record: not known to smartload."""

    lr: float = 0.1
    epochs: int = 90


# --------------------------------------------------------------------------------------------------
# SAFE: every global known to be data


def _saved(name: str, obj: object, **kwargs: Any) -> Maker:
    def make(tmp: Path) -> Path:
        path = tmp / name
        torch.save(obj, path, **kwargs)
        return path

    return make


def _lightning_checkpoint(tmp: Path) -> Path:
    hparams = _AttributeDict(lr=0.1, num_classes=10)
    config = OmegaConf.create({"model": {"depth": 18}, "data": ["train", "val"], "seed": None})
    path = tmp / "epoch=3.ckpt"
    with _installed("lightning.fabric.utilities.data.AttributeDict", _AttributeDict):
        torch.save(
            {
                "state_dict": _weights(),
                "hyper_parameters": hparams,
                "config": config,
                "epoch": 3,
                "pytorch-lightning_version": "2.4.0",
                "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": None}},
            },
            path,
        )
    return path


def _detectron2_pkl(tmp: Path) -> Path:
    path = tmp / "model_final.pkl"
    arrays = {k: v.numpy() for k, v in _weights().items()}
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "Detectron2 Model Zoo"}, 2))
    return path


def _safetensors(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    save_file(_weights(), str(path))
    return path


_RECORDS = {
    "saved_at": datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.timezone.utc),
    "day": datetime.date(2026, 11, 25),
    "took": datetime.timedelta(hours=3),
    "counts": collections.Counter("aab"),
    "recent": collections.deque([1, 2]),
    "by_class": collections.defaultdict(list, {"cat": [1]}),
    "run_dir": PurePosixPath("runs/7"),
    "ns": types.SimpleNamespace(a=1),
    "id": uuid.UUID(int=7),
    "frac": fractions.Fraction(1, 3),
    "price": decimal.Decimal("1.5"),
    "tags": {"a", "b"},
    "blob": bytearray(b"x"),
    "span": slice(1, 2),
}
SAFE: dict[str, Maker] = {
    "plain_state_dict": _saved("plain.pth", _weights()),
    "timm_train_checkpoint": _saved(
        "checkpoint-7.pth.tar",
        {
            "state_dict": _weights(),
            "args": argparse.Namespace(lr=0.1, model="resnet50"),
            "epoch": 7,
        },
    ),
    "lightning_checkpoint": _lightning_checkpoint,
    "records_of_values": _saved("records.pth", {"model": _weights(), "meta": _RECORDS}),
    "legacy_format_protocol_1": _saved(
        "legacy.pt",
        {"model": _weights(), "args": argparse.Namespace(lr=0.1)},
        _use_new_zipfile_serialization=False,
        pickle_protocol=1,
    ),
    "detectron2_pkl": _detectron2_pkl,
    "safetensors": _safetensors,
}


@pytest.mark.parametrize("name", sorted(SAFE))
def test_files_naming_only_known_data_are_safe(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SAFE: inspect says so, the CLI exits 0 with the verdict in its JSON, and load reads it."""
    path = SAFE[name](tmp_path)
    info = smartload.inspect(path)
    assert (info.verdict, info.unknown_globals) == ("SAFE", ())
    code, data = _inspect_cli(path, capsys)
    assert (code, data["verdict"], data["unknown_globals"], data["safe"]) == (0, "SAFE", [], True)
    model = make_net(10)
    smartload.load(model, path)
    assert torch.equal(model.fc.weight, _weights()["fc.weight"])


def test_safe_lists_the_globals_it_judged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _lightning_checkpoint(tmp_path)
    assert smartload.inspect(path).globals == (
        "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage",
        "torch.LongStorage", "lightning.fabric.utilities.data.AttributeDict",
        "omegaconf.dictconfig.DictConfig", "omegaconf.base.ContainerMetadata", "typing.Any",
        "builtins.dict", "collections.defaultdict", "omegaconf.nodes.AnyNode",
        "omegaconf.base.Metadata", "omegaconf.listconfig.ListConfig", "builtins.list", "builtins.int",
    )  # fmt: skip
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith(
        "SAFE  torch-zip; nothing in the file can run; globals: collections.OrderedDict, "
    )


# --------------------------------------------------------------------------------------------------
# UNKNOWN: globals smartload does not know, kept inert


def _config_object(tmp: Path) -> Path:
    path = tmp / "with_config.pth"
    torch.save({"state_dict": _weights(), "cfg": TrainConfig(), "epoch": 1}, path)
    return path


def test_a_class_smartload_does_not_know_makes_the_file_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """UNKNOWN: exit 6, the unknown globals in the JSON and in the verdict line; load still
    reads the weights, the object staying an inert record."""
    path = _config_object(tmp_path)
    info = smartload.inspect(path)
    assert (info.verdict, info.unknown_globals) == ("UNKNOWN", ("test_verdict.TrainConfig",))
    code, data = _inspect_cli(path, capsys)
    assert (code, data["verdict"], data["unknown_globals"], data["safe"]) == (
        6, "UNKNOWN", ["test_verdict.TrainConfig"], True,
    )  # fmt: skip
    assert main(["inspect", str(path)]) == 6
    assert capsys.readouterr().out.splitlines()[1] == (
        "UNKNOWN  torch-zip; names 1 global smartload does not know (test_verdict.TrainConfig); "
        "nothing was run; `torch.load` without weights_only would import them"
    )
    model = make_net(10)
    report = smartload.load(model, path)
    assert report.extras["cfg"] == "test_verdict.TrainConfig [inert, not executed]"
    assert torch.equal(model.fc.weight, _weights()["fc.weight"])


def test_a_whole_model_pickle_is_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch.save(model): torch.load would import the model's classes."""
    path = _saved("whole.pt", make_net(10, seed=1))(tmp_path)
    info = smartload.inspect(path)
    assert (info.verdict, info.unknown_globals[0]) == ("UNKNOWN", "conftest.SmallNet")
    assert all(g.startswith("torch.nn.modules.") for g in info.unknown_globals[1:])
    assert main(["inspect", str(path), "--json"]) == 6
    capsys.readouterr()


# --------------------------------------------------------------------------------------------------
# UNSAFE: every family of the hostile list


HOSTILE = [
    # the interpreter, imports, processes
    "pkgutil.resolve_name", "_imp.create_dynamic", "_frozen_importlib.BuiltinImporter",
    "_frozen_importlib_external.SourceFileLoader", "importlib.import_module", "runpy._run_code",
    "code.InteractiveInterpreter", "types.CodeType", "_osx_support._read_output",
    "_aix_support._read_cmd_output", "uuid._get_command_stdout", "uuid._ifconfig_getnode",
    "_pyrepl.pager.pipe_pager", "asyncio.subprocess.create_subprocess_shell", "atexit.register",
    "_xxsubinterpreters.run_string", "ctypes.CDLL", "pexpect.spawn", "cffi.FFI",
    # debuggers, test runners, tooling
    "doctest.debug_script", "idlelib.autocomplete.AutoComplete", "idlelib.pyshell.main",
    "lib2to3.pgen2.pgen.ParserGenerator", "lib2to3.main.main", "bdb.Bdb", "pdb.run", "pydoc.pipepager",
    "unittest.main", "test.support.script_helper.assert_python_ok", "trace.Trace",
    "compileall.compile_dir", "py_compile.compile", "ensurepip._run_pip", "distutils.file_util.write_file",
    # files, archives, network
    "tarfile.open", "zipfile.ZipFile", "gzip.open", "codecs.open", "_io.FileIO", "io.open",
    "_io.open", "_io.open_code", "_io.TextIOWrapper", "_io.BufferedReader", "_io.BufferedWriter",
    "_io.BufferedRandom", "io.FileIO",
    "logging.FileHandler", "logging.StreamHandler", "logging.handlers.SocketHandler",
    "logging.config.fileConfig", "imaplib.IMAP4_stream", "smtplib.SMTP", "ssl.get_server_certificate",
    "socketserver.TCPServer", "requests.api.get", "aiohttp.client.ClientSession",
    "http.client.HTTPSConnection", "urllib.request.urlopen", "webbrowser.open", "shelve.open",
    # other pickles and loaders of formats that run code
    "pickle.loads", "dill.loads", "joblib.load", "marshal.loads", "copyreg.add_extension",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "ruamel.yaml.load",
    "pandas.read_pickle", "pandas.read_csv", "pandas.eval", "pandas.io.pickle.read_pickle",
    "pandas.core.computation.eval.eval", "hydra.utils.instantiate", "hydra.utils.call",
    "hydra.utils.get_method", "hydra.utils.get_class", "hydra._internal.utils._locate",
    "sympy.sympify", "sympy.parsing.sympy_parser.parse_expr", "sympy.lambdify",
    "sympy.core.sympify.sympify", "jinja2.Template", "numexpr.evaluate",
    "keras.models.load_model", "tensorflow.keras.models.load_model", "tf_keras.models.load_model",
    "numpy.load", "numpy.ma.loads", "numpy.testing._private.utils.runstring", "numpy.f2py.compile",
    "numpy.DataSource", "numpy.core.records.fromfile", "transformers.dynamic_module_utils.get_class_from_dynamic_module",
    "huggingface_hub.hf_hub_download", "mmengine.fileio.load", "IPython.core.interactiveshell.InteractiveShell",
    # code as data
    "functools.partial", "functools.reduce", "operator.attrgetter", "_operator.methodcaller",
    "builtins.eval", "builtins.getattr", "builtins.__import__", "builtins.open",
    # torch: loaders, compilers, test and tooling subpackages
    "torch.load", "torch.storage._load_from_bytes", "torch.serialization.load", "torch.from_file",
    "torch.testing._internal.common_utils.shell", "torch.utils.collect_env.run",
    "torch.utils._import_utils.import_dill", "torch.utils.model_zoo.load_url",
    "torch.utils.bottleneck.__main__.run_cprofile", "torch.utils.benchmark.Timer",
    "torch.backends.cudnn.set_flags", "torch.utils.data.datapipes.utils.decoder.basichandlers",
    "torch.utils._config_module.ConfigModule", "torch._inductor.codecache.compile_file",
    "torch.fx.experimental.symbolic_shapes.ShapeEnv", "torch.jit.load", "torch.hub.load",
    "torch._dynamo.guards.GuardBuilder", "torch._utils._import_dotted_name", "torch.compile.dangerous",
    "torch.onnx.export", "torch.utils.tensorboard.SummaryWriter", "torch.profiler.profile",
]  # fmt: skip


_W = tensor("0", 2, (1, 2), (2, 1))


def _naming(qualname: str) -> Maker:
    """A torch zip whose extras call ``qualname``, beside a state dict of one tensor."""
    module, _, name = qualname.rpartition(".")

    def make(tmp: Path) -> Path:
        payload = {"model": {"w": _W}, "x": Call(Global(module, name), ("id",))}
        return torch_zip(tmp / "naming.pth", assemble(payload), {"0": struct.pack("<2f", 1, 2)})

    return make


@pytest.mark.parametrize("qualname", HOSTILE)
def test_every_hostile_family_is_unsafe(
    qualname: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """UNSAFE: inspect and load refuse it naming the global; the CLI exits 4, its JSON says so."""
    assert hostile_reason(qualname) is not None
    path = _naming(qualname)(tmp_path)
    for read in (smartload.inspect, lambda p: smartload.load(make_net(10), p)):
        with pytest.raises(UnsafeCheckpointError) as caught:
            read(path)
        assert caught.value.globals == [qualname]
    code, data = _inspect_cli(path, capsys)
    assert (code, data["verdict"], data["error"], data["globals"]) == (
        4,
        "UNSAFE",
        "unsafe",
        [qualname],
    )


KNOWN_DATA = [
    "argparse.Namespace", "types.SimpleNamespace", "typing.Any", "collections.defaultdict",
    "collections.Counter", "collections.deque", "datetime.datetime", "datetime.timezone",
    "decimal.Decimal", "fractions.Fraction", "uuid.UUID", "pathlib.PosixPath",
    "pathlib._local.PurePosixPath", "torch.device", "torch.cuda.FloatTensor",
    "lightning.fabric.utilities.data.AttributeDict", "pytorch_lightning.utilities.parsing.AttributeDict",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.Metadata",
    "omegaconf.base.ContainerMetadata", "omegaconf.nodes.AnyNode",
    "transformers.training_args.TrainingArguments", "transformers.trainer_utils.IntervalStrategy",
    "builtins.set", "__builtin__.frozenset",
]  # fmt: skip


@pytest.mark.parametrize("qualname", KNOWN_DATA)
def test_known_data_is_neither_hostile_nor_unknown(qualname: str, tmp_path: Path) -> None:
    assert (is_known_data(qualname), hostile_reason(qualname)) == (True, None)
    path = _naming(qualname)(tmp_path)
    assert smartload.inspect(path).verdict == "SAFE"


def test_near_misses_of_known_data_are_unknown(tmp_path: Path) -> None:
    """Only the listed names: the module of a data class lends nothing to its neighbours."""
    for qualname in (
        "datetime.sys",
        "argparse.ArgumentParser",
        "omegaconf.OmegaConf",
        "zoo.UUID",
    ):
        assert not is_known_data(qualname)
        assert smartload.inspect(_naming(qualname)(tmp_path)).unknown_globals == (qualname,)


# --------------------------------------------------------------------------------------------------
# UNSAFE first, whatever else is wrong with the file


def _malformed_after_the_global(tmp: Path) -> Path:
    """posix.system named, called, then an opcode that does not exist."""
    data = b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02R\xff."
    return torch_zip(tmp / "malformed.pth", data)


def _refused_before_the_global(tmp: Path) -> Path:
    """A tensor rebuilt from a string is refused before the payload is even reached."""
    bad = Call(REBUILD, ("not a storage", 0, (1,), (1,), False, ORDERED_DICT))
    payload = {"model": {"w": bad}, "x": Call(Global("posix", "system"), ("id",))}
    return torch_zip(tmp / "refused_first.pth", assemble(payload))


def _stack_global_from_the_memo(tmp: Path) -> Path:
    """Protocol 4: the names memoized as strings early, a persistent id (refused in a plain
    pickle) in between, then STACK_GLOBAL from the memo."""
    data = (
        b"\x80\x04\x8c\x02os\x94\x8c\x06system\x940"  # "os" at 0, "system" at 1
        b"0\x8c\x01x\x94Q0"  # BINPERSID: the unpickler stops here
        b"h\x00h\x01\x93\x8c\x02id\x85R."
    )
    path = tmp / "memo.pkl"
    path.write_bytes(data)
    return path


def _protocol_0_without_proto(tmp: Path) -> Path:
    """Text opcodes from the first byte (no PROTO): not a format smartload knows."""
    data = b"Vos\np2\n0Vsystem\np3\n0g2\ng3\n\x93(Vid\ntR."
    path = tmp / "text.pkl"
    path.write_bytes(data)
    return path


def _zip_not_torch(tmp: Path) -> Path:
    path = tmp / "model.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.pkl", pickle.dumps(Payload("id"), 4))
    return path


def _encrypted_flag(tmp: Path) -> Path:
    """The payload's member claims to be encrypted (it is not): torch's reader ignores the flag."""
    path = torch_zip(tmp / "flagged.pth", pickle.dumps({"model": {}, "x": Payload("id")}, 2))
    data = bytearray(path.read_bytes())
    for signature in (b"PK\x03\x04", b"PK\x01\x02"):
        at = data.index(signature)
        data[at + (6 if signature == b"PK\x03\x04" else 8)] |= 0x1
    path.write_bytes(bytes(data))
    return path


def _stacked_pickles(tmp: Path) -> Path:
    path = tmp / "stacked.pkl"
    path.write_bytes(pickle.dumps({"model": {}}, 2) + pickle.dumps(Payload("id"), 2))
    return path


def _numpy_object_array(tmp: Path) -> Path:
    path = tmp / "weights.npy"
    np.save(path, np.array([Payload("id")], dtype=object), allow_pickle=True)
    return path


def _no_state_dict(tmp: Path) -> Path:
    """Only picklescan's universal bypass, no weights at all."""
    payload = {"cfg": Call(Call(Global("pkgutil", "resolve_name"), ("os:system",)), ("id",))}
    return torch_zip(tmp / "bypass.pth", assemble(payload))


def _unknown_beside_hostile(tmp: Path) -> Path:
    payload = {"model": {}, "args": Call(Global("argparse", "Namespace"), ()),
               "cfg": Call(Global("zoo.config", "Config"), ()),
               "x": Call(Global("posix", "system"), ("id",))}  # fmt: skip
    return torch_zip(tmp / "mixed.pth", assemble(payload))


UNSAFE_FIRST: dict[str, tuple[Maker, list[str], str]] = {
    "malformed_after_the_global": (_malformed_after_the_global, ["posix.system"], "unknown opcode"),
    "refused_before_the_global": (_refused_before_the_global, ["posix.system"], "not a storage"),
    "stack_global_from_the_memo": (_stack_global_from_the_memo, ["os.system"], "persistent id"),
    "protocol_0_without_proto": (_protocol_0_without_proto, ["os.system"], "unknown format"),
    "zip_not_a_torch_archive": (_zip_not_torch, ["posix.system"], "data.pkl in the zip"),
    "member_flagged_encrypted": (_encrypted_flag, ["posix.system"], "is encrypted"),
    "second_pickle_after_the_first": (_stacked_pickles, ["posix.system"], "after the pickle's end"),
    "numpy_object_array": (_numpy_object_array, ["posix.system"], "unknown format"),
    "no_state_dict": (_no_state_dict, ["pkgutil.resolve_name"], ""),
    "unknown_beside_hostile": (_unknown_beside_hostile, ["posix.system"], ""),
}


@pytest.mark.parametrize("name", sorted(UNSAFE_FIRST))
def test_a_hostile_global_is_reported_first_whatever_else_is_wrong(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hostile global is named by inspect, load and the CLI (exit 4), the other problem
    only mentioned."""
    make, hostile, other = UNSAFE_FIRST[name]
    path = make(tmp_path)
    for read in (smartload.inspect, lambda p: smartload.load(make_net(10), p)):
        with pytest.raises(UnsafeCheckpointError) as caught:
            read(path)
        assert caught.value.globals == hostile
        assert other in str(caught.value)
    code, data = _inspect_cli(path, capsys)
    assert (code, data["verdict"], data["globals"]) == (4, "UNSAFE", hostile)


def test_allowed_globals_do_not_turn_a_broken_file_hostile(tmp_path: Path) -> None:
    """The last look at a refused file honours allow_globals: the format error stands."""
    path = _stacked_pickles(tmp_path)
    with pytest.raises(CheckpointFormatError, match="after the pickle's end"):
        smartload.load(make_net(10), path, allow_globals=["posix.system"])


def test_a_broken_file_without_hostile_globals_stays_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "text.pkl"
    path.write_bytes(b"Vcollections\nVOrderedDict\n\x93)R.")
    with pytest.raises(CheckpointFormatError, match="unknown format"):
        smartload.inspect(path)
    code, data = _inspect_cli(path, capsys)
    assert (code, data["verdict"], data["error"]) == (3, None, "unreadable")


def test_text_that_looks_like_a_global_is_not_a_hostile_pickle(tmp_path: Path) -> None:
    """The last look counts only names Python could import: a zip of notes is not an attack
    because one begins with "c" and has a dot on its second line."""
    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "check the logs\nsee os.system for details\n")
    with pytest.raises(CheckpointFormatError, match="data.pkl in the zip"):
        smartload.inspect(path)


def test_a_pickled_logger_is_unknown_not_hostile(tmp_path: Path) -> None:
    """logging is a hostile family (handlers open files and sockets), but a Logger pickles as
    logging.getLogger(name), which runs nothing."""
    path = _naming("logging.getLogger")(tmp_path)
    assert smartload.inspect(path).unknown_globals == ("logging.getLogger",)
    assert hostile_reason("logging.Logger") is not None


@pytest.mark.parametrize("buffer", [io.BytesIO(b"\x00\x01step"), io.StringIO("step 7")])
@pytest.mark.parametrize("saved", ["torch file", "dcp"])
def test_in_memory_buffers_are_unknown_not_hostile(
    buffer: io.IOBase, saved: str, tmp_path: Path
) -> None:
    """A train state holding an ``io.BytesIO`` (older torchtitan saves) or ``io.StringIO``:
    pickled as ``_io.BytesIO``, a buffer made from bytes or text that opens no file. UNKNOWN
    naming it (torch's weights_only refuses it), and the weights load; in a DCP directory the
    item is walked, never unpickled. _io's files stay hostile (HOSTILE above)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    sd = _weights()
    state = {"model": sd, "train_state": {"step": 7, "buffer": buffer}}
    path = tmp_path / "step-7"
    if saved == "dcp":
        with warnings.catch_warnings():  # a one-process save, without a process group
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.save(state, storage_writer=FileSystemWriter(path))
    else:
        torch.save(state, path)
    qualname = f"_io.{type(buffer).__name__}"
    info = smartload.inspect(path)
    assert (info.verdict, info.unknown_globals) == ("UNKNOWN", (qualname,))
    assert hostile_reason(qualname) is None and not is_known_data(qualname)
    model = make_net(10, seed=2)
    smartload.load(model, path)
    assert_same_tensors(model.state_dict(), sd)


# --------------------------------------------------------------------------------------------------
# the pre-scan's list of names


class _Anything:
    """What a recording unpickler builds for every global: accepts any call, item and state."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Anything:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _names_found_by_unpickling(data: bytes) -> list[tuple[str, str]]:
    """The reference: the names a real unpickler asks for, in order."""
    named: list[tuple[str, str]] = []

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in named:
                named.append((module, name))
            return _Anything

        def persistent_load(self, pid: Any) -> Any:
            return _Anything()

    Recording(io.BytesIO(data), fix_imports=False, encoding="latin1").load()
    return named


@pytest.mark.parametrize("protocol", range(6))
def test_the_prescan_names_what_the_unpickler_would_look_up(protocol: int) -> None:
    """At every protocol (GLOBAL, STACK_GLOBAL from fresh and memoized strings), the pre-scan
    lists the same globals, in the same order, as an unpickler's find_class sees them."""
    from smartload._unpickler import walk_names

    obj = {
        "model": collections.OrderedDict(w=1),
        "args": argparse.Namespace(lr=0.1),
        "when": [datetime.date(2026, 1, 1), datetime.date(2026, 1, 2)],
        "path": PurePosixPath("a"),
        "dd": collections.defaultdict(list),
        "again": argparse.Namespace(lr=0.2),
        "x": Payload("id"),
    }
    data = pickle.dumps(obj, protocol)
    named: list[tuple[str, str]] = []
    assert walk_names(data, 0, named) == len(data)
    assert named == _names_found_by_unpickling(data)
    assert ("posix", "system") in named


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02U\x02osT\x06\x00\x00\x00system\x93)R.",  # Python 2 str (latin-1)
        b"(S'os'\nS'system'\n\x93)R.",  # protocol 0 quoted text
        b"\x80\x04\x8c\x02os\x94\x8c\x06system2\x940h\x00h\x01\x93)R.",  # DUP, memo
    ],
)
def test_the_prescan_follows_strings_of_every_kind(data: bytes) -> None:
    from smartload._unpickler import walk_names

    named: list[tuple[str, str]] = []
    walk_names(data, 0, named)
    assert named == [("os", "system")]


def test_the_prescan_cuts_long_names_and_stays_linear() -> None:
    """50,000 STACK_GLOBALs of two memoized 100 KB strings: one name, cut, in well under a
    second; the module a cut name names is not a known one."""
    from smartload._unpickler import walk_names

    long = "m" * 100_000
    head = b"\x80\x04\x8d" + struct.pack("<Q", len(long)) + long.encode() + b"\x94" * 1
    head += b"\x8d" + struct.pack("<Q", len(long)) + long.encode() + b"\x94"
    body = b"(" + b"h\x00h\x01\x93" * 50_000 + b"l."
    named: list[tuple[str, str]] = []
    started = time.perf_counter()
    walk_names(head + body, 0, named)
    assert time.perf_counter() - started < 2
    assert named == [("m" * 160 + "...", "m" * 160 + "...")]
