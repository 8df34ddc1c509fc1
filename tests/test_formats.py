"""Every supported format is recognised from its bytes, read lazily and loaded exactly."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, make_net, snapshot
from safetensors.torch import save_file

import smartload


def _state(seed: int = 1) -> dict[str, torch.Tensor]:
    return make_net(10, seed=seed).state_dict()


def _assert_loaded(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("new_zip", [True, False], ids=["torch-zip", "torch-legacy"])
def test_torch_formats_load_exactly(tmp_path: Path, new_zip: bool) -> None:
    """torch.save in both serializations: format named, every tensor copied bit for bit."""
    sd = _state()
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=new_zip)
    model = make_net(10, seed=2)
    report = smartload.load(model, path)
    assert report.format == ("torch-zip" if new_zip else "torch-legacy")
    assert report.state_dict_path == ()
    assert report.summary == {
        "copy": 9, "slice": 0, "reinit-normal": 0, "skip": 0, "unused": 0,
        "reused_params": 347, "model_params": 347,
    }  # fmt: skip
    _assert_loaded(model, sd)


def test_training_checkpoint_with_python_objects(tmp_path: Path) -> None:
    """Namespace, defaultdict, datetime and optimizer state beside the weights stay inert."""
    net = make_net(10, seed=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    path = tmp_path / "train.pth.tar"
    torch.save(
        {
            "epoch": 12,
            "arch": "smallnet",
            "state_dict": net.state_dict(),
            "optimizer": opt.state_dict(),
            "args": argparse.Namespace(lr=0.1, model="smallnet"),
            "counts": collections.defaultdict(list, {"a": [1]}),
            "saved_at": datetime.datetime(2026, 1, 2, 3, 4, 5),
        },
        path,
    )
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    model = make_net(10, seed=3)
    report = smartload.load(model, path)
    _assert_loaded(model, net.state_dict())
    assert report.state_dict_path == ("state_dict",)
    assert report.inert_globals == (  # builtins.list (defaultdict's factory) is plain data
        "argparse.Namespace",
        "collections.defaultdict",
        "datetime.datetime",
    )
    assert report.extras == {
        "epoch": "12",
        "arch": "'smallnet'",
        "optimizer": "dict with 2 entries, 6 tensors",
        "args": "argparse.Namespace [inert, not executed]",
        "counts": "collections.defaultdict [inert, not executed]",
        "saved_at": "datetime.datetime [inert, not executed]",
    }


def test_safetensors_single_file(tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in _state().items()}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    info = smartload.inspect(path)
    assert info.format == "safetensors"
    assert info.metadata == {"format": "pt"}
    assert info.tensors["fc.weight"].shape == (10, 8)
    model = make_net(10, seed=2)
    smartload.load(model, path)
    _assert_loaded(model, sd)


def test_safetensors_sharded_index_and_directory(tmp_path: Path) -> None:
    """model.safetensors.index.json with two shards, given as the index file or its directory."""
    sd = _state()
    keys = sorted(sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[:3],
        "model-00002-of-00002.safetensors": keys[3:],
    }
    weight_map = {}
    for shard, shard_keys in shards.items():
        save_file({k: sd[k] for k in shard_keys}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(shard_keys, shard))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    for target in (index, tmp_path):
        model = make_net(10, seed=2)
        report = smartload.load(model, target)
        assert report.format == "safetensors-sharded"
        _assert_loaded(model, sd)


def test_hf_bin_sharded_index(tmp_path: Path) -> None:
    """pytorch_model.bin.index.json over torch zip shards (storage keys repeat across shards)."""
    sd = _state()
    keys = sorted(sd)
    weight_map = {}
    for i, shard_keys in enumerate((keys[:2], keys[2:]), 1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: sd[k] for k in shard_keys}, tmp_path / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = make_net(10, seed=2)
    report = smartload.load(model, tmp_path)
    assert report.format == "torch-sharded"
    _assert_loaded(model, sd)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_model_zoo_pkl(tmp_path: Path, protocol: int) -> None:
    """{"model": {name: ndarray}, "__author__": ...} at protocols 2, 4 and 5."""
    sd = _state()
    arrays = {k: v.numpy() for k, v in sd.items()}
    path = tmp_path / "model_final.pkl"
    path.write_bytes(
        pickle.dumps(
            {"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True},
            protocol=protocol,
        )
    )
    model = make_net(10, seed=2)
    report = smartload.load(model, path)
    assert report.format == "pickle"
    assert report.state_dict_path == ("model",)
    assert report.extras == {"__author__": "'Detectron2 Model Zoo'", "matching_heuristics": "True"}
    _assert_loaded(model, sd)


def test_caffe2_blobs_pkl_py2_latin1(tmp_path: Path) -> None:
    """A Python 2 style pickle ({"blobs": ...}, str data read as latin1) is found and read."""
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "R-50.pkl"
    path.write_bytes(
        pickle.dumps(
            {"blobs": {"fc1000_w": weight, "fc1000_b": np.zeros(2, np.float32)}}, protocol=2
        )
    )
    info = smartload.inspect(path)
    assert info.state_dict_path == ("blobs",)
    assert {k: (t.shape, t.dtype) for k, t in info.tensors.items()} == {
        "fc1000_w": ((2, 3), "float32"),
        "fc1000_b": ((2,), "float32"),
    }
    model = torch.nn.Linear(3, 2)
    smartload.load(model, path, rename={r"^fc1000_w$": "weight", r"^fc1000_b$": "bias"})
    assert torch.equal(model.weight.detach(), torch.from_numpy(weight))


def test_format_is_sniffed_not_taken_from_the_name(tmp_path: Path) -> None:
    """A safetensors file named .pth and a torch zip named .safetensors both read."""
    sd = {k: v.contiguous() for k, v in _state().items()}
    save_file(sd, str(tmp_path / "weights.pth"))
    torch.save(sd, tmp_path / "weights.safetensors")
    assert smartload.inspect(tmp_path / "weights.pth").format == "safetensors"
    assert smartload.inspect(tmp_path / "weights.safetensors").format == "torch-zip"


def test_inspect_reads_no_tensor_data(tmp_path: Path) -> None:
    """Corrupting every storage's bytes changes nothing for inspect; load then fails its CRC."""
    sd = _state()
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    import zipfile

    with zipfile.ZipFile(path) as z:
        spans = [(i.header_offset, i.file_size) for i in z.infolist() if "/data/" in i.filename]
    data = bytearray(path.read_bytes())
    for offset, size in spans:  # flip the last byte of each storage
        name_len, extra_len = struct.unpack("<HH", data[offset + 26 : offset + 30])
        data[offset + 30 + name_len + extra_len + size - 1] ^= 0xFF
    path.write_bytes(bytes(data))
    info = smartload.inspect(path)
    assert (info.num_tensors, info.num_params, info.nbytes) == (9, 347, 346 * 4 + 8)
    model = make_net(10, seed=2)
    before = snapshot(model)
    with pytest.raises(smartload.CheckpointFormatError, match="CRC mismatch in storage"):
        smartload.load(model, path, verify_checksums=True)
    assert_unchanged(model, before)


def test_mapping_input(tmp_path: Path) -> None:
    """An in-memory state dict is accepted like a file."""
    sd = _state()
    model = make_net(10, seed=2)
    report = smartload.load(model, sd)
    assert report.format == "mapping" and report.checkpoint == "<mapping>"
    _assert_loaded(model, sd)


def test_shared_and_strided_tensors(tmp_path: Path) -> None:
    """Views into one storage and transposed tensors come back with their exact values."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"a": base[1:3], "b": base.t(), "c": base}
    path = tmp_path / "views.pt"
    torch.save(sd, path)
    info = smartload.inspect(path)
    assert info.shared_storages == 1
    assert info.non_contiguous == ["b"]

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("a", torch.zeros(2, 6))
            self.register_buffer("b", torch.zeros(6, 4))
            self.register_buffer("c", torch.zeros(4, 6))

    holder = Holder()
    smartload.load(holder, path)
    for key, value in sd.items():
        assert torch.equal(getattr(holder, key), value), key


class HParams(dict):  # type: ignore[type-arg]
    """Stands for Lightning's AttributeDict."""


@dataclasses.dataclass
class TrainConfig:
    lr: float
    layers: tuple[int, ...]


def test_lightning_checkpoint_hyper_parameters_stay_inert(tmp_path: Path) -> None:
    """Lightning's layout: `model.`-prefixed state_dict, hyper_parameters of user classes."""
    sd = _state()
    path = tmp_path / "epoch=3-step=100.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 100,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "hyper_parameters": HParams(cfg=TrainConfig(0.1, (1, 2)), name="run"),
            "optimizer_states": [{"state": {}, "param_groups": []}],
            "lr_schedulers": [],
        },
        path,
    )
    model = make_net(10, seed=2)
    report = smartload.load(model, path)
    _assert_loaded(model, sd)
    assert report.inert_globals == ("test_formats.HParams", "test_formats.TrainConfig")
    assert report.extras["hyper_parameters"] == "test_formats.HParams [inert, not executed]"
    assert report.extras["optimizer_states"] == "list of 1"
