"""torch.distributed.checkpoint directories: read from .metadata alone, loaded exactly, refused
when hostile, unknown, inconsistent or escaping; non-tensor items never read."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import Payload, assert_same_tensors, assert_unchanged, make_net, snapshot
from pickle_asm import Call, Global, assemble
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import smartload
from smartload import CheckpointFormatError, UnsafeCheckpointError
from smartload._dcp import UnknownGlobalsError, chunk_source
from smartload._formats import read
from smartload.cli import main

_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.Size",
    "torch.serialization._get_layout",
    "pathlib.PosixPath",
    "torch.float32",
    "torch.int64",
}
# what each tensor item's data.pkl names (torch.save of a float32 or int64 tensor)
_ITEM_GLOBALS = {
    "torch._utils._rebuild_tensor_v2",
    "torch.FloatStorage",
    "torch.LongStorage",
    "collections.OrderedDict",
}
Box = tuple[tuple[int, ...], tuple[int, ...]]


class ChunkingPlanner(DefaultSavePlanner):
    """Saves the tensors named in ``boxes`` as several chunks (offsets, sizes), the way ranks of
    a sharded model each save theirs, in one process."""

    def __init__(self, boxes: Mapping[str, list[Box]]) -> None:
        super().__init__()
        self.boxes = boxes

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = []
        for item in plan.items:
            if item.index.fqn not in self.boxes:
                items.append(item)
                continue
            assert item.tensor_data is not None
            for offsets, sizes in self.boxes[item.index.fqn]:
                chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
                data = TensorWriteData(chunk, item.tensor_data.properties, item.tensor_data.size)
                index = MetadataIndex(item.index.fqn, offsets)
                items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data))
        self.plan = SavePlan(items, plan.storage_data, plan.planner_data)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.type != WriteItemType.SHARD:
            return super().resolve_data(write_item)
        assert write_item.tensor_data is not None
        tensor = self.state_dict[write_item.index.fqn]
        chunk = write_item.tensor_data.chunk
        for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
            tensor = tensor.narrow(dim, offset, size)
        return tensor.clone()


@pytest.fixture(autouse=True)
def _quiet_dcp() -> Iterator[None]:
    """dcp.save/load warn that no process group is set up: a one-process save, on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _save(
    path: Path, state: dict[str, Any], *, planner: Any = None, safetensors: bool = False
) -> Path:
    layout = SerializationFormat.SAFETENSORS if safetensors else SerializationFormat.TORCH_SAVE
    dcp.save(
        state, storage_writer=FileSystemWriter(path, serialization_format=layout), planner=planner
    )
    return path


def _metadata(path: Path) -> Metadata:
    """The directory's metadata, read by torch (our own file, trusted)."""
    return FileSystemReader(path).read_metadata()


def _rewrite(path: Path, metadata: Any) -> None:
    (path / ".metadata").write_bytes(pickle.dumps(metadata, protocol=4))


def _items(path: Path, fqn: str) -> list[Any]:
    return [info for key, info in _metadata(path).storage_data.items() if key.fqn == fqn]


def _dcp_load(path: Path, like: dict[str, Any]) -> dict[str, Any]:
    """What ``dcp.load`` gives for ``like`` (the same structure, zeros)."""

    def zeros(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: zeros(v) for k, v in value.items()}
        return torch.zeros_like(value)

    out = zeros(like)
    dcp.load(out, checkpoint_id=path)
    return out


def _chunked_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {
        "rows": torch.randn(5, 4),  # FSDP-like: dim 0 split unevenly
        "grid": torch.randn(6, 7),  # 2-D parallel: a 2 × 2 grid
        "cols": torch.randn(3, 9, dtype=torch.float64),  # tensor-parallel Shard(1)
        "steps": torch.tensor(7),  # a scalar, one chunk
        "whole": torch.arange(10),
    }


_BOXES: dict[str, list[Box]] = {
    "model.rows": [((0, 0), (3, 4)), ((3, 0), (2, 4))],
    "model.grid": [((0, 0), (3, 3)), ((0, 3), (3, 4)), ((3, 0), (3, 3)), ((3, 3), (3, 4))],
    "model.cols": [((0, 0), (3, 5)), ((0, 5), (3, 4))],
}


@pytest.fixture
def chunked(tmp_path: Path) -> Path:
    return _save(tmp_path / "chunked", {"model": _chunked_state()}, planner=ChunkingPlanner(_BOXES))


def test_a_state_dict_loads_exactly_as_dcp_load_gives_it(tmp_path: Path) -> None:
    """A plain state dict: format dcp, found at the top level, every tensor bit for bit."""
    sd = make_net(10, seed=1).state_dict()
    path = _save(tmp_path / "ckpt", sd)
    model = make_net(10, seed=2)
    report = smartload.load(model, path)
    assert (report.to_dict()["format"], report.to_dict()["state_dict_path"]) == ("dcp", [])
    assert report.summary["copy"] == len(sd)
    assert_same_tensors(model.state_dict(), _dcp_load(path, sd))
    assert_same_tensors(model.state_dict(), sd)


def test_model_optimizer_and_epoch_nest_like_a_torch_file(tmp_path: Path) -> None:
    """``{"model": sd, "optim": ..., "epoch": 3}``: the state dict is at ("model",), as in a torch
    file of the same dict; the optimizer is described, epoch listed as an unread bytes item."""
    model = make_net(10, seed=1)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optim.step()
    state = {"model": model.state_dict(), "optim": optim.state_dict(), "epoch": 3}
    path = _save(tmp_path / "ckpt", state)
    torch.save(state, tmp_path / "ckpt.pth")

    info, torch_info = smartload.inspect(path), smartload.inspect(tmp_path / "ckpt.pth")
    epoch = _items(path, "epoch")[0].length
    assert (info.format, info.verdict, info.state_dict_path) == ("dcp", "SAFE", ("model",))
    assert info.state_dict_path == torch_info.state_dict_path
    assert {k: (t.shape, t.dtype) for k, t in info.tensors.items()} == {
        k: (t.shape, t.dtype) for k, t in torch_info.tensors.items()
    }
    assert info.extras == {
        "optim": "dict with 2 entries, 18 tensors",
        "epoch": f"bytes item ({epoch:,} bytes, never unpickled)",
    }
    assert set(info.globals) == _DCP_GLOBALS | _ITEM_GLOBALS
    assert (info.unknown_globals, info.inert_globals) == ((), ())

    target = make_net(10, seed=2)
    plan = smartload.diff(target, path)
    report = smartload.load(target, path)
    assert plan.to_dict()["state_dict_path"] == report.to_dict()["state_dict_path"] == ["model"]
    assert_same_tensors(target.state_dict(), _dcp_load(path, {"model": state["model"]})["model"])


def test_torchtitan_style_save_names_only_the_allowlist(tmp_path: Path) -> None:
    """Model, optimizer, scheduler and train state (a tensor step and a list of losses): the
    .metadata names the DCP allowlist only; the model's weights are found under "model"."""
    model = make_net(10, seed=1)
    optim = torch.optim.Adam(model.parameters())
    state = {
        "model": model.state_dict(),
        "optimizer": optim.state_dict(),
        "lr_scheduler": {"last_epoch": 3, "_step_count": 4},
        "train_state": {"step": torch.tensor(7), "global_avg_losses": [0.5, 0.25]},
    }
    info = smartload.inspect(_save(tmp_path / "titan", state))
    assert set(info.globals) == _DCP_GLOBALS | _ITEM_GLOBALS
    assert (info.verdict, info.state_dict_path) == ("SAFE", ("model",))
    assert info.extras == {
        "optimizer": "dict with 1 entries",  # param_groups: no state before a step
        "lr_scheduler": "dict with 2 entries",
        "train_state": "dict with 2 entries, 1 tensors",
    }
    raw = read(tmp_path / "titan")
    losses = raw.tree["train_state"]["global_avg_losses"]
    assert str(losses).startswith("bytes item (") and raw.tree["optimizer"]["param_groups"][0]


def test_safetensors_layout_loads_exactly(tmp_path: Path) -> None:
    """``SerializationFormat.SAFETENSORS``: one blob per file, after the bytes items; each chunk
    is found in the blob's header by its key, its bytes given exactly."""
    sd = make_net(10, seed=1).state_dict()
    path = _save(tmp_path / "st", {"model": sd, "epoch": 3}, safetensors=True)
    model = make_net(10, seed=2)
    smartload.load(model, path)
    assert_same_tensors(model.state_dict(), sd)
    leaf = read(path).tree["model"]["fc.weight"]
    (chunk,) = leaf.chunks
    source = chunk_source(chunk, leaf.dtype)
    epoch = _items(path, "epoch")[0].length
    assert (chunk.length, source.nbytes) == (10 * 8 * 4, 10 * 8 * 4) and source.offset > epoch
    with open(source.file, "rb") as f:
        f.seek(source.offset)
        assert f.read(source.nbytes) == sd["fc.weight"].numpy().tobytes()


def test_chunks_assemble_as_dcp_load_and_dcp_to_torch_save_give_them(
    chunked: Path, tmp_path: Path
) -> None:
    """Rows split unevenly, a 2 × 2 grid, columns, a scalar: assembled bit for bit, as both of
    torch's readers assemble them; inspect gives global shapes and counts the chunks."""
    state = _chunked_state()
    info = smartload.inspect(chunked)
    assert {k: (t.shape, t.dtype, t.chunks) for k, t in info.tensors.items()} == {
        "rows": ((5, 4), "float32", 2),
        "grid": ((6, 7), "float32", 4),
        "cols": ((3, 9), "float64", 2),
        "steps": ((), "int64", 1),
        "whole": ((10,), "int64", 1),
    }
    assert (info.num_chunks, info.to_dict()["tensors"]["grid"]) == (
        10,
        {"shape": [6, 7], "dtype": "float32", "chunks": 4},
    )
    dcp_to_torch_save(chunked, tmp_path / "full.pt")
    consolidated = torch.load(tmp_path / "full.pt")["model"]
    by_dcp_load = _dcp_load(chunked, {"model": state})["model"]

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for key, value in state.items():
                self.register_buffer(key, torch.zeros_like(value))

    holder = Holder()
    smartload.load(holder, chunked)
    assert_same_tensors(holder.state_dict(), state)
    assert_same_tensors(holder.state_dict(), by_dcp_load)
    assert_same_tensors(holder.state_dict(), consolidated)
    # the data is 64-byte aligned in its item, not in the file: some chunks were copied
    chunks = read(chunked).tree["model"]["rows"].chunks
    assert any(chunk_source(c, "float32").offset % 4 for c in chunks)


def test_inspect_imports_no_torch_and_convert_needs_no_torch_distributed(
    chunked: Path, tmp_path: Path
) -> None:
    """In a fresh interpreter: inspect leaves torch unimported; convert consolidates the chunks
    without importing torch.distributed.checkpoint."""
    out = tmp_path / "out.safetensors"
    code = (
        "import sys, smartload\n"
        f"info = smartload.inspect({str(chunked)!r})\n"
        "print(info.format, info.num_chunks, 'torch' in sys.modules)\n"
        "from smartload.cli import main\n"
        f"code = main(['convert', {str(chunked)!r}, {str(out)!r}])\n"
        "print(code, 'torch.distributed.checkpoint' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [
        "dcp 10 False",
        f"wrote {out}: 5 tensors, 552 B (state dict model)",
        "0 False",
    ]
    assert_same_tensors(load_file(out), _chunked_state())


def test_cli_inspect_json_and_text(chunked: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``smartload inspect DIR``: verdict, state dict path, chunks per tensor (exit 0)."""
    assert main(["inspect", str(chunked), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["format"], data["verdict"], data["state_dict_path"]) == ("dcp", "SAFE", ["model"])
    assert (data["num_chunks"], data["tensors"]["rows"]) == (
        10,
        {"shape": [5, 4], "dtype": "float32", "chunks": 2},
    )
    assert main(["inspect", str(chunked)]) == 0
    out = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert "chunks 10 for 5 tensors; split: rows ×2, grid ×4, cols ×2" in out
    assert (
        "state dict model: 5 tensors, 100 parameters, 552 B (float32 ×2, float64 ×1, int64 ×2)"
    ) in out


def test_diff_against_the_consolidated_torch_file(
    chunked: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``smartload diff DIR FILE``: the chunks' values equal dcp_to_torch_save's (exit 0)."""
    dcp_to_torch_save(chunked, tmp_path / "full.pt")
    assert main(["diff", str(chunked), str(tmp_path / "full.pt"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["identical"], data["same"]) == (True, 5)


def test_the_metadata_file_itself_reads_its_directory(chunked: Path) -> None:
    info = smartload.inspect(chunked / ".metadata")
    assert (info.path, info.format, info.num_chunks) == (str(chunked), "dcp", 10)


# --------------------------------------------------------------------------------------------------
# refused


@pytest.mark.parametrize("kind", ["os.system in the metadata", "builtins.exec alone"])
def test_hostile_metadata_is_unsafe(
    kind: str, chunked: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A .metadata naming a hostile global: UnsafeCheckpointError naming it, CLI exit 4,
    nothing run, the model untouched."""
    if kind == "os.system in the metadata":
        metadata = _metadata(chunked)
        metadata.storage_meta = Payload(f"touch {sentinel}")  # type: ignore[assignment]
        _rewrite(chunked, metadata)
        expected = ["posix.system"]
    else:
        code = f"open({str(sentinel)!r}, 'w')"
        (chunked / ".metadata").write_bytes(assemble(Call(Global("builtins", "exec"), (code,))))
        expected = ["builtins.exec"]
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.inspect(chunked)
    assert caught.value.globals == expected
    assert caught.value.path == str(chunked / ".metadata")
    model = make_net(10)
    before = snapshot(model)
    with pytest.raises(UnsafeCheckpointError):
        smartload.load(model, chunked)
    with pytest.raises(UnknownGlobalsError) as unknown:  # accepted as a name: never built
        smartload.load(model, chunked, allow_globals=expected)
    assert unknown.value.globals == expected
    assert_unchanged(model, before)
    assert main(["inspect", str(chunked), "--json"]) == 4
    data = json.loads(capsys.readouterr().out)
    assert (data["verdict"], data["globals"]) == ("UNSAFE", expected)


@dataclasses.dataclass
class _RunInfo:
    host: str


def test_an_unknown_global_is_refused_and_named(
    chunked: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A global outside the DCP allowlist that is not hostile: refused before anything is built,
    named; the CLI says UNKNOWN (exit 6)."""
    metadata = _metadata(chunked)
    metadata.storage_meta = _RunInfo("node-1")  # type: ignore[assignment]
    _rewrite(chunked, metadata)
    qualname = f"{_RunInfo.__module__}._RunInfo"
    with pytest.raises(UnknownGlobalsError) as caught:
        smartload.inspect(chunked)
    assert isinstance(caught.value, CheckpointFormatError)
    assert caught.value.globals == [qualname]
    assert str(caught.value) == (
        f"{chunked / '.metadata'}: names 1 global a DCP .metadata never holds ({qualname}); "
        "nothing was run. smartload reads .metadata files written by "
        "torch.distributed.checkpoint.save; dcp.load would import these names, so load it "
        "that way only if you trust it"
    )
    assert main(["inspect", str(chunked), "--json"]) == 6
    data = json.loads(capsys.readouterr().out)
    assert (data["verdict"], data["unknown_globals"]) == ("UNKNOWN", [qualname])


def test_ordinary_checkpoints_still_refuse_dcp_classes(tmp_path: Path, chunked: Path) -> None:
    """The allowlist is the .metadata's own: a torch file holding DCP objects is hostile."""
    torch.save({"metadata": _metadata(chunked)}, tmp_path / "odd.pth")
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.inspect(tmp_path / "odd.pth")
    assert "torch.distributed.checkpoint.metadata.Metadata" in caught.value.globals


def _chunks(metadata: Metadata, fqn: str) -> list[ChunkStorageMetadata]:
    item = metadata.state_dict_metadata[fqn]
    assert isinstance(item, TensorStorageMetadata)
    return item.chunks


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            "overlap",
            "tensor 'model.rows': its chunks at [0, 0] and [2, 0] overlap",
        ),
        (
            "gap",
            "tensor 'model.rows' of shape [5, 4]: its chunks cover 12 of its 20 elements (a gap)",
        ),
        (
            "outside",
            "tensor 'model.rows' of shape [5, 4]: a chunk at [4, 0] of sizes [2, 4] lies outside it",
        ),
        ("no storage", "tensor 'model.grid', chunk at [3, 3]: no storage entry"),
        (
            "compressed",
            "tensor 'model.cols', chunk at [0, 0]: stored through DCP extensions (a list of 1), "
            "compressed or transformed",
        ),
    ],
)
def test_inconsistent_chunks_are_refused_naming_the_key(
    chunked: Path, change: str, problem: str
) -> None:
    metadata = _metadata(chunked)
    rows = _chunks(metadata, "model.rows")
    if change == "overlap":
        rows[1] = ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([3, 4]))
    elif change == "gap":
        del rows[1]
    elif change == "outside":
        rows[1] = ChunkStorageMetadata(torch.Size([4, 0]), torch.Size([2, 4]))
    elif change == "no storage":
        del metadata.storage_data[MetadataIndex("model.grid", [3, 3])]
    else:
        metadata.storage_data[MetadataIndex("model.cols", [0, 0])].transform_descriptors = ["zstd"]
    _rewrite(chunked, metadata)
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.inspect(chunked)
    assert (caught.value.path, caught.value.problem) == (str(chunked), problem)


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_storage_paths_leaving_the_directory_are_refused(
    chunked: Path, tmp_path: Path, how: str
) -> None:
    """A relative path with "..", an absolute one, or a symbolic link out of the directory."""
    outside = tmp_path / "outside.distcp"
    shutil.copy(chunked / "__0_0.distcp", outside)
    metadata = _metadata(chunked)
    if how == "symlink":
        (chunked / "__0_0.distcp").unlink()
        (chunked / "__0_0.distcp").symlink_to(outside)
        expected = "leads outside the directory (a symbolic link)"
    else:
        name = "../outside.distcp" if how == "parent" else str(outside)
        for info in metadata.storage_data.values():
            info.relative_path = name
        _rewrite(chunked, metadata)
        expected = "lies outside the directory"
    with pytest.raises(CheckpointFormatError, match="its file .*") as caught:
        smartload.inspect(chunked)
    assert expected in caught.value.problem


def test_a_truncated_distcp_is_refused_at_open(chunked: Path) -> None:
    """The last item reaches past the file's end: refused from the metadata, naming the key."""
    last = max(
        ((key, info) for key, info in _metadata(chunked).storage_data.items()),
        key=lambda pair: pair[1].offset,
    )
    data = chunked / "__0_0.distcp"
    size = data.stat().st_size
    os.truncate(data, size - 10)
    key, info = last
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.inspect(chunked)
    assert caught.value.problem == (
        f"tensor {key.fqn!r}, chunk at {list(key.offset)}: its item spans bytes "
        f"{info.offset:,} to {size:,} of __0_0.distcp but the file has {size - 10:,} (truncated)"
    )


def test_an_item_that_disagrees_with_the_metadata_is_refused_when_read(chunked: Path) -> None:
    """The metadata says float64 where the item holds float32: inspect (metadata only) passes,
    reading the chunk refuses it, naming the file and the item."""
    metadata = _metadata(chunked)
    item = metadata.state_dict_metadata["model.rows"]
    assert isinstance(item, TensorStorageMetadata)
    item.properties = TensorProperties(dtype=torch.float64)
    _rewrite(chunked, metadata)
    assert smartload.inspect(chunked).tensors["rows"].dtype == "float64"
    first = _items(chunked, "model.rows")[0]
    holder = torch.nn.Module()
    holder.register_buffer("rows", torch.zeros(5, 4, dtype=torch.float64))
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.load(holder, chunked)
    assert caught.value.path == str(chunked / "__0_0.distcp")
    assert caught.value.problem == (
        f"the item at byte {first.offset:,} ({first.length:,} bytes): it holds float32 [3, 4]; "
        "the metadata says float64 [3, 4]"
    )


def test_garbage_bytes_items_name_nothing_and_leave_loading_alone(tmp_path: Path) -> None:
    """Garbage in every BYTE_IO item (epoch, param_groups): no pickle, so no global (torch.load
    would fail before running anything); inspect says SAFE and load is unaffected."""
    model = make_net(10, seed=1)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model.state_dict(), "optim": optim.state_dict(), "epoch": 3}
    path = _save(tmp_path / "ckpt", state)
    metadata = _metadata(path)
    items = [
        info
        for key, info in metadata.storage_data.items()
        if type(metadata.state_dict_metadata[key.fqn]).__name__ == "BytesStorageMetadata"
    ]
    assert len(items) == 11  # epoch, and the 10 entries of SGD's param_groups
    with open(path / "__0_0.distcp", "r+b") as f:
        for info in items:
            f.seek(info.offset)
            f.write(b"\xff" * info.length)
    info = smartload.inspect(path)
    assert info.extras["epoch"] == f"bytes item ({items[-1].length:,} bytes, never unpickled)"
    assert (info.verdict, info.unscanned_items) == ("SAFE", ())
    target = make_net(10, seed=2)
    smartload.load(target, path)
    assert_same_tensors(target.state_dict(), state["model"])


def test_a_small_metadata_cannot_make_the_tiling_check_quadratic(tmp_path: Path) -> None:
    """A staircase of 3,000 disjoint chunks that all meet along the sweep: the comparisons are
    charged to a budget proportional to the .metadata's size, refused long before 4.5 million."""
    n = 3000
    chunks = [ChunkStorageMetadata(torch.Size([i, i]), torch.Size([n - i, 1])) for i in range(n)]
    item = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([n, n]), chunks)
    path = tmp_path / "stairs"
    path.mkdir()
    _rewrite(path, Metadata({"w": item}, storage_data={}))
    started = time.perf_counter()
    with pytest.raises(
        CheckpointFormatError, match="checking its chunks and paths would take more than"
    ):
        smartload.inspect(path)
    assert time.perf_counter() - started < 5


def test_a_small_metadata_cannot_nest_every_key_deep(tmp_path: Path) -> None:
    """12,000 keys, each 64 levels deep under its own first name: the containers made for them
    are charged to the same budget, refused before most are made."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    item, info = BytesStorageMetadata(), _StorageInfo("__0_0.distcp", 0, 0)
    keys = [f"k{i}" for i in range(12_000)]
    metadata = Metadata(
        {"x": item} | {key: item for key in keys},  # "x" memoized first: 2 bytes a reference
        planner_data={"x": ("x",)} | {key: (key, *["x"] * 63) for key in keys},
        storage_data={MetadataIndex(key): info for key in ["x", *keys]},
    )
    path = tmp_path / "deep"
    path.mkdir()
    (path / "__0_0.distcp").write_bytes(b"")
    _rewrite(path, metadata)
    with pytest.raises(CheckpointFormatError, match="checking its chunks and paths would take"):
        smartload.inspect(path)


def test_a_thousand_chunks_open_from_the_metadata_alone(tmp_path: Path) -> None:
    """1,000 chunks: inspect reads .metadata only (fast); load reads each item once, exactly."""
    torch.manual_seed(0)
    weight = torch.randn(1000, 4)
    boxes = {"w": [((row, 0), (1, 4)) for row in range(1000)]}
    path = _save(tmp_path / "many", {"w": weight}, planner=ChunkingPlanner(boxes))
    started = time.perf_counter()
    info = smartload.inspect(path)
    elapsed = time.perf_counter() - started
    assert (info.num_chunks, info.tensors["w"].shape) == (1000, (1000, 4))
    assert elapsed < 1.0, elapsed  # ~50 ms here; generous for a shared machine

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1000, 4))

    one = One()
    smartload.load(one, path)
    assert torch.equal(one.w.detach(), weight)


def test_the_hf_storage_writer_directory_reads_as_its_index(tmp_path: Path) -> None:
    """HuggingFaceStorageWriter writes safetensors shards and an index, no .metadata pickle."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    sd = make_net(10, seed=1).state_dict()
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(tmp_path / "hf")))
    model = make_net(10, seed=2)
    report = smartload.load(model, tmp_path / "hf")
    assert report.to_dict()["format"] == "safetensors-sharded"
    assert_same_tensors(model.state_dict(), sd)


# --------------------------------------------------------------------------------------------------
# torchtitan's layout: the model's keys at the top level, beside the training state


def _titan_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model's state dict, and torchtitan's save of it: the model's keys flattened into the
    top level next to an AdamW state keyed by FQN (its moments are tensors), an LR scheduler, a
    dataloader's pickled state and the trainer's step."""
    model = make_net(10, seed=1)
    optim = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LinearLR(optim)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optim.step()
    scheduler.step()
    sd = model.state_dict()
    state = {
        **sd,
        "optimizer": get_optimizer_state_dict(model, optim),
        "lr_scheduler": scheduler.state_dict(),
        "dataloader": {"world_size": 1, "dp_rank_0": pickle.dumps({"samples_yielded": 16})},
        "train_state": {"step": 7, "ntokens_seen": 1024},
    }
    return sd, state


@pytest.mark.parametrize("saved", ["dcp", "torch file"])
def test_torchtitan_layout_takes_the_top_level_tensors(
    saved: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The state dict is the top level's tensors (path []), exactly the model's: the optimizer's
    moments nested under "optimizer" are not taken; the training state is listed, SAFE."""
    sd, state = _titan_state()
    if saved == "dcp":
        path = _save(tmp_path / "step-7", state)
        assert "optimizer.state.fc.weight.exp_avg" in _metadata(path).state_dict_metadata
    else:
        path = tmp_path / "step-7.pt"
        torch.save(state, path)
    info = smartload.inspect(path)
    assert (info.verdict, info.state_dict_path, info.other_state_dicts) == ("SAFE", (), ())
    assert {k: (t.shape, t.dtype) for k, t in info.tensors.items()} == {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()
    }
    assert info.extras == {
        "optimizer": "dict with 2 entries, 18 tensors",  # exp_avg, exp_avg_sq and step for 6
        "lr_scheduler": f"dict with {len(state['lr_scheduler'])} entries",
        "dataloader": "dict with 2 entries",
        "train_state": "dict with 2 entries",
    }
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["verdict"], data["state_dict_path"], data["num_tensors"]) == ("SAFE", [], len(sd))

    target = make_net(10, seed=2)
    report = smartload.load(target, path)
    assert (report.to_dict()["state_dict_path"], report.unused) == ([], ())
    assert report.summary["copy"] == len(sd)
    assert_same_tensors(target.state_dict(), sd)
    if saved == "dcp":  # what dcp.load gives for the model's keys alone
        assert_same_tensors(target.state_dict(), _dcp_load(path, sd))


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        ({"model": "sd", "optimizer": "adam", "step": "t"}, ("model",)),  # a tensor beside
        ({"state_dict": "sd", "epoch": 3, "lr": "t", "args": {"a": 1}}, ("state_dict",)),
        ({"fc.weight": "t", "meta": {"epoch": 3, "lr": 0.1}}, ()),  # no tensor beside
    ],
)
def test_top_level_tensors_are_taken_only_when_nothing_below_holds_weights(
    tree: dict[str, Any], expected: tuple[str, ...], tmp_path: Path
) -> None:
    """A tensor beside a state dict (a step counter) never wins over it; tensors beside plain
    values are the state dict."""
    sd = make_net(10, seed=1).state_dict()
    values = {"sd": sd, "t": torch.tensor(5), "adam": {"state": {0: {"exp_avg": torch.ones(3)}}}}

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        return values.get(node, node) if isinstance(node, str) else node

    torch.save(fill(tree), tmp_path / "ckpt.pth")
    info = smartload.inspect(tmp_path / "ckpt.pth")
    assert (info.state_dict_path, info.other_state_dicts) == (expected, ())
    if expected:
        assert set(info.tensors) == set(sd)


# --------------------------------------------------------------------------------------------------
# bytes items: pickles dcp.load would run, pre-scanned


def _point_item_at(path: Path, fqn: str, data: bytes) -> None:
    """Append ``data`` to the item's file and point the bytes item ``fqn`` at it."""
    metadata = _metadata(path)
    (key,) = [key for key in metadata.storage_data if key.fqn == fqn]
    info = metadata.storage_data[key]
    file = path / info.relative_path
    info.offset, info.length = file.stat().st_size, len(data)
    with open(file, "ab") as f:
        f.write(data)
    _rewrite(path, metadata)


def test_a_hostile_bytes_item_is_unsafe_for_inspect_diff_and_load(
    tmp_path: Path, sentinel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``train_state`` whose pickle calls os.system: UnsafeCheckpointError naming the global
    and the item (CLI exit 4) from inspect, diff and load, where dcp.load runs it."""
    sd = make_net(10, seed=1).state_dict()
    path = _save(tmp_path / "ckpt", {"model": sd, "train_state": Payload(f"touch {sentinel}")})
    (item,) = _items(path, "train_state")
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.inspect(path)
    assert (caught.value.path, caught.value.globals) == (
        str(path / "__0_0.distcp"),
        ["posix.system"],
    )
    assert caught.value.detail == (
        f"bytes item 'train_state' ({item.length:,} bytes at byte {item.offset:,} of "
        "'__0_0.distcp'): posix.system: module 'posix' can run code or touch the system; "
        "dcp.load would unpickle it with torch.load(weights_only=False)"
    )
    model = make_net(10, seed=2)
    before = snapshot(model)
    with pytest.raises(UnsafeCheckpointError):
        smartload.diff(model, path)
    with pytest.raises(UnsafeCheckpointError):
        smartload.load(model, path)
    assert_unchanged(model, before)
    for argv in (["inspect", str(path), "--json"], ["diff", str(path), str(path), "--json"]):
        assert main(argv) == 4
        data = json.loads(capsys.readouterr().out)
        assert (data["verdict"], data["globals"]) == ("UNSAFE", ["posix.system"])
    # accepted by name outside the state dict, like any file's: never unpickled, nothing runs
    smartload.load(model, path, allow_globals=["posix.system"])
    assert_same_tensors(model.state_dict(), sd)

    ran = tmp_path / "ran"  # what smartload refuses, dcp.load runs
    torch_path = _save(tmp_path / "other", {"train_state": Payload(f"touch {ran}")})
    dcp.load({"train_state": 0}, checkpoint_id=torch_path)
    assert ran.exists()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("a plain pickle", ["posix.system"]),
        ("torch's legacy format", ["posix.system"]),
        ("an archive smartload's zip reader refuses", ["posix.system"]),
        ("a TorchScript archive", ["torch.jit.load"]),
    ],
)
def test_bytes_items_are_walked_as_torch_load_would_read_them(
    kind: str, expected: list[str], tmp_path: Path, sentinel: Path
) -> None:
    """torch.load unpickles what does not open as a zip as its legacy format (pickle after
    pickle), and hands a TorchScript archive to torch.jit.load: each is judged accordingly; an
    archive smartload's reader refuses is walked from every local header."""
    buffer = io.BytesIO()
    payload = Payload(f"touch {sentinel}")
    if kind == "a plain pickle":
        buffer.write(pickle.dumps({"step": 3, "hook": payload}, protocol=2))
    elif kind == "torch's legacy format":
        torch.save({"step": 3, "hook": payload}, buffer, _use_new_zipfile_serialization=False)
    elif kind == "an archive smartload's zip reader refuses":  # two data.pkl: torch reads one
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("a/data.pkl", pickle.dumps(3, protocol=2))
            archive.writestr("b/data.pkl", pickle.dumps(payload, protocol=2))
    else:
        with warnings.catch_warnings():  # TorchScript is deprecated: still what torch.load runs
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buffer)
    path = _save(tmp_path / "ckpt", {"model": make_net(10).state_dict(), "epoch": 3})
    _point_item_at(path, "epoch", buffer.getvalue())
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.inspect(path)
    assert caught.value.globals == expected
    assert "bytes item 'epoch'" in caught.value.detail


def test_an_unknown_global_in_a_bytes_item_is_unknown_and_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataclass of the saving script as ``train_state``: UNKNOWN naming it (exit 6), the
    item described as naming one; load and diff still work (the item is never unpickled)."""
    sd = make_net(10, seed=1).state_dict()
    state = {"model": sd, "train_state": _RunInfo("node-1"), "metrics": {"loss": 0.25}}
    path = _save(tmp_path / "ckpt", state)
    qualname = f"{_RunInfo.__module__}._RunInfo"
    (item,) = _items(path, "train_state")
    info = smartload.inspect(path)
    assert (info.verdict, info.unknown_globals, info.state_dict_path) == (
        "UNKNOWN",
        (qualname,),
        ("model",),
    )
    assert info.extras["train_state"] == f"bytes item ({item.length:,} bytes, 1 unknown global)"
    assert info.extras["metrics"] == "dict with 1 entries"
    assert qualname in info.verdict_reason
    assert main(["inspect", str(path), "--json"]) == 6
    data = json.loads(capsys.readouterr().out)
    assert (data["verdict"], data["unknown_globals"]) == ("UNKNOWN", [qualname])
    target = make_net(10, seed=2)
    assert smartload.diff(target, path).to_dict()["state_dict_path"] == ["model"]
    smartload.load(target, path)
    assert_same_tensors(target.state_dict(), sd)


def test_benign_bytes_items_stay_safe(tmp_path: Path) -> None:
    """ints, floats, dicts and lists of them, an optimizer's param_groups, raw bytes: the items
    name no global that is not data; SAFE."""
    model = make_net(10, seed=1)
    optim = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    state = {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "epoch": 3,
        "metrics": {"loss": 0.25, "acc": [0.5, 0.75]},
        "blob": b"\x00\x01",
    }
    info = smartload.inspect(_save(tmp_path / "ckpt", state))
    assert (info.verdict, info.unknown_globals, info.unscanned_items) == ("SAFE", (), ())
    # how protocol 2 keeps bytes
    assert set(info.globals) == _DCP_GLOBALS | _ITEM_GLOBALS | {"_codecs.encode"}


def _nested(depth: int) -> Any:
    value: Any = ()
    for _ in range(depth):
        value = (value,)
    return value


@pytest.mark.parametrize("why", ["past the limit", "refused by the pre-scan"])
def test_an_item_not_scanned_to_its_end_is_unknown(
    why: str,
    tmp_path: Path,
    sentinel: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An item past the bytes smartload walks, or whose walk the pre-scan refuses before its
    end (tuples 101 deep, then os.system): what it names is unknown, so the verdict is UNKNOWN,
    never SAFE, and the log says why; the CLI says UNKNOWN (exit 6); load works."""
    sd = make_net(10, seed=1).state_dict()
    path = _save(tmp_path / "ckpt", {"model": sd, "train_state": [0.5] * 100})
    if why == "past the limit":
        monkeypatch.setattr(smartload._dcp_items, "SCAN_LIMIT", 100)
        (item,) = _items(path, "train_state")
        with open(path / item.relative_path, "rb") as f:
            f.seek(item.offset)
            archive = zipfile.ZipFile(io.BytesIO(f.read(item.length)))
        (pkl,) = [i.file_size for i in archive.infolist() if i.filename.endswith("/data.pkl")]
        reason = f"its pickle of {pkl:,} bytes is past the 100 bytes of pickle smartload walks"
        size = item.length
    else:
        data = pickle.dumps((_nested(101), Payload(f"touch {sentinel}")), protocol=2)
        _point_item_at(path, "train_state", data)
        reason, size = "tuples nested more than 100 deep", len(data)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "smartload"):
        info = smartload.inspect(path)
    assert [r.getMessage() for r in caplog.records if r.name == "smartload"] == [
        f"bytes item 'train_state' of __0_0.distcp not scanned to its end: {reason}"
        + (" in a directory" if why == "past the limit" else "")
        + "; what it names is unknown"
    ]
    assert (info.verdict, info.unscanned_items, info.unknown_globals) == (
        "UNKNOWN",
        ("train_state",),
        (),
    )
    assert info.extras["train_state"] == f"bytes item ({size:,} bytes, not scanned to its end)"
    assert "1 bytes item not scanned to the end (train_state)" in info.verdict_reason
    assert main(["inspect", str(path)]) == 6
    target = make_net(10, seed=2)
    smartload.load(target, path)
    assert_same_tensors(target.state_dict(), sd)


def test_a_hostile_item_is_reported_ahead_of_what_else_is_wrong(
    tmp_path: Path, sentinel: Path
) -> None:
    """A hostile item, a bytes item without its storage entry and a tensor chunk without its
    own: UNSAFE, the other bytes item's problem mentioned after."""
    state = {"model": make_net(10).state_dict(), "train_state": Payload(f"touch {sentinel}")}
    path = _save(tmp_path / "ckpt", state)
    metadata = _metadata(path)
    del metadata.storage_data[MetadataIndex("model.fc.weight", [0, 0])]
    metadata.state_dict_metadata["epoch"] = metadata.state_dict_metadata["train_state"]
    _rewrite(path, metadata)
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.inspect(path)
    assert caught.value.globals == ["posix.system"]
    assert caught.value.detail.endswith("; besides, bytes item 'epoch': no storage entry")


def test_overlapping_bytes_items_are_refused(tmp_path: Path) -> None:
    """Two items over the same bytes (DCP never writes that): refused, naming both, so no
    small metadata makes smartload walk one large item many times."""
    path = _save(tmp_path / "ckpt", {"model": make_net(10).state_dict(), "epoch": 3, "step": 9})
    metadata = _metadata(path)
    metadata.storage_data[MetadataIndex("step")] = metadata.storage_data[MetadataIndex("epoch")]
    _rewrite(path, metadata)
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.inspect(path)
    assert caught.value.problem == (
        "bytes items 'epoch' and 'step' overlap in '__0_0.distcp' (DCP writes each item once)"
    )


# --------------------------------------------------------------------------------------------------
# tensor items: each chunk's data.pkl pre-scanned with the directory

_REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"  # how torch.save's protocol 2 names it


def _holder() -> torch.nn.Module:
    """A module with the chunked state's buffers, zeros."""
    holder = torch.nn.Module()
    for key, value in _chunked_state().items():
        holder.register_buffer(key, torch.zeros_like(value))
    return holder


def _rewrite_chunk(path: Path, fqn: str, offsets: tuple[int, ...], change: Any) -> Any:
    """Rebuild the item of ``fqn``'s chunk at ``offsets`` with ``change(data.pkl)`` in place of
    its data.pkl (the other members as they were), append it to the item's file and point the
    chunk's storage entry at it; the new storage entry."""
    metadata = _metadata(path)
    info = metadata.storage_data[MetadataIndex(fqn, offsets)]
    file = path / info.relative_path
    with open(file, "rb") as f:
        f.seek(info.offset)
        item = f.read(info.length)
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(item)) as old,
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as new,
    ):
        names = [member.filename for member in old.infolist()]
        assert sum(name.endswith("/data.pkl") for name in names) == 1
        for name in names:
            data = old.read(name)
            new.writestr(name, change(data) if name.endswith("/data.pkl") else data)
    info.offset, info.length = file.stat().st_size, len(buffer.getvalue())
    with open(file, "ab") as f:
        f.write(buffer.getvalue())
    _rewrite(path, metadata)
    return info


def _naming(qualname: bytes) -> Any:
    """A change of data.pkl: ``qualname`` (b"module\\nname") called where torch's rebuild was."""

    def change(data: bytes) -> bytes:
        assert data.count(_REBUILD) == 1
        return data.replace(_REBUILD, b"c" + qualname + b"\n")

    return change


def test_a_hostile_tensor_item_is_unsafe_for_inspect_diff_and_load(
    chunked: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chunk whose data.pkl calls posix.system where torch's rebuild was: refused up front by
    inspect, diff and load (UnsafeCheckpointError naming the global and the item, CLI exit 4),
    before anything is read; accepted by name, it is still refused when the chunk is read."""
    info = _rewrite_chunk(chunked, "model.rows", (3, 0), _naming(b"posix\nsystem"))
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.inspect(chunked)
    assert (caught.value.path, caught.value.globals) == (
        str(chunked / "__0_0.distcp"),
        ["posix.system"],
    )
    assert caught.value.detail == (
        f"tensor 'model.rows', chunk at [3, 0] ({info.length:,} bytes at byte {info.offset:,} "
        "of '__0_0.distcp'): posix.system: module 'posix' can run code or touch the system; "
        "a tensor item's data.pkl names torch's tensor rebuilds and storage types only"
    )
    holder = _holder()
    before = snapshot(holder)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        smartload.diff(holder, chunked)
    with pytest.raises(UnsafeCheckpointError, match="tensor 'model.rows', chunk at"):
        smartload.load(holder, chunked)
    assert_unchanged(holder, before)
    for argv in (
        ["inspect", str(chunked), "--json"],
        ["diff", str(chunked), str(chunked), "--json"],
    ):
        assert main(argv) == 4
        data = json.loads(capsys.readouterr().out)
        assert (data["verdict"], data["globals"]) == ("UNSAFE", ["posix.system"])
    # a tensor item must rebuild a tensor: an allowed name is refused when the chunk is read
    with pytest.raises(UnsafeCheckpointError) as read:
        smartload.load(holder, chunked, allow_globals=["posix.system"])
    assert (read.value.path, read.value.globals) == (
        str(chunked / "__0_0.distcp"),
        ["posix.system"],
    )
    assert_unchanged(holder, before)


def test_an_unknown_global_in_a_tensor_item_is_unknown_and_refused_when_read(
    chunked: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk's data.pkl calling a training script's function: inspect says UNKNOWN naming it
    (exit 6) and logs the item; diff plans; load refuses the chunk when it reads it (it holds
    no tensor), the model untouched."""
    info = _rewrite_chunk(chunked, "model.rows", (3, 0), _naming(b"trainer.hooks\nrebuild"))
    with caplog.at_level(logging.WARNING, "smartload"):
        inspected = smartload.inspect(chunked)
    assert (inspected.verdict, inspected.unknown_globals) == (
        "UNKNOWN",
        ("trainer.hooks.rebuild",),
    )
    assert [r.getMessage() for r in caplog.records if r.name == "smartload"] == [
        "tensor 'model.rows', chunk at [3, 0] of __0_0.distcp: its data.pkl names "
        "trainer.hooks.rebuild, which a tensor's never does; reading the chunk will refuse it"
    ]
    assert main(["inspect", str(chunked), "--json"]) == 6
    data = json.loads(capsys.readouterr().out)
    assert (data["verdict"], data["unknown_globals"]) == ("UNKNOWN", ["trainer.hooks.rebuild"])
    holder = _holder()
    before = snapshot(holder)
    assert smartload.diff(holder, chunked).to_dict()["state_dict_path"] == ["model"]
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.load(holder, chunked)
    assert caught.value.path == str(chunked / "__0_0.distcp")
    assert caught.value.problem.startswith(
        f"the item at byte {info.offset:,} ({info.length:,} bytes): it holds "
    )
    assert caught.value.problem.endswith(", not a tensor")
    assert_unchanged(holder, before)


def test_an_oversized_tensor_data_pkl_is_refused(chunked: Path) -> None:
    """A data.pkl past 64 KiB (a tensor's is ~150 bytes): refused at open, naming the item,
    by every command; and where a chunk is read, refused before its bytes are."""
    original = read(chunked).tree["model"]["rows"].chunks[1]
    sizes: list[int] = []

    def pad(data: bytes) -> bytes:  # after the pickle's STOP: never read by an unpickler
        sizes.append(len(data) + (64 << 10))
        return data + b"\0" * (64 << 10)

    info = _rewrite_chunk(chunked, "model.rows", (3, 0), pad)
    (size,) = sizes
    expected = (
        f"tensor 'model.rows', chunk at [3, 0]: its data.pkl of {size:,} bytes is larger than "
        "the 65,536 bytes smartload reads for one tensor"
    )
    for action in (smartload.inspect, lambda p: smartload.load(_holder(), p)):
        with pytest.raises(CheckpointFormatError) as caught:
            action(chunked)
        assert (caught.value.path, caught.value.problem) == (str(chunked), expected)
        assert "not written by torch.distributed.checkpoint.save" in str(caught.value)
    chunk = dataclasses.replace(original, offset=info.offset, length=info.length)
    with pytest.raises(CheckpointFormatError) as read_:
        chunk_source(chunk, "float32")
    assert (read_.value.path, read_.value.problem) == (
        str(chunked / "__0_0.distcp"),
        f"the item at byte {info.offset:,} ({info.length:,} bytes): its data.pkl of {size:,} "
        "bytes is larger than the 65,536 bytes smartload reads for one tensor",
    )


@pytest.mark.parametrize("why", ["refused by the pre-scan", "past the limit"])
def test_a_tensor_item_not_scanned_to_its_end_is_refused_at_open(
    why: str, chunked: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data.pkl whose walk the pre-scan refuses (tuples 101 deep before the tensor), or past
    the bytes of distinct tensor pickles walked per directory: what it names is unseen, and
    reading it could not rebuild a tensor, so the directory is refused up front, naming it."""
    if why == "refused by the pre-scan":
        _rewrite_chunk(
            chunked, "model.rows", (3, 0), lambda data: pickle.dumps(_nested(101), protocol=2)
        )
        expected = (
            "tensor 'model.rows', chunk at [3, 0]: its data.pkl cannot be read (tuples nested "
            "more than 100 deep)"
        )
    else:
        monkeypatch.setattr(smartload._dcp_items, "TENSOR_SCAN_LIMIT", 200)
        expected = (
            "tensor 'model.rows', chunk at [3, 0]: its data.pkl is past the 200 bytes of distinct "
            "tensor pickles smartload walks in a directory"
        )
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.inspect(chunked)
    assert (caught.value.path, caught.value.problem) == (str(chunked), expected)


def test_a_hostile_tensor_item_is_reported_ahead_of_what_else_is_wrong(chunked: Path) -> None:
    """A hostile, oversized data.pkl and a tensor whose chunks leave a gap: UNSAFE, the other
    problems said after."""
    hostile = _naming(b"posix\nsystem")
    _rewrite_chunk(chunked, "model.rows", (3, 0), lambda data: hostile(data) + b"\0" * 70_000)
    metadata = _metadata(chunked)
    del _chunks(metadata, "model.grid")[3]
    _rewrite(chunked, metadata)
    with pytest.raises(UnsafeCheckpointError) as caught:
        smartload.inspect(chunked)
    assert caught.value.globals == ["posix.system"]
    assert caught.value.detail.endswith(
        "; besides, tensor 'model.grid' of shape [6, 7]: its chunks cover 30 of its 42 "
        "elements (a gap)"
    )


def test_benign_tensor_items_stay_safe_and_are_walked_once_per_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 chunks (10 tensors of 100 rows, one row each): SAFE, naming torch's rebuild and
    storage; their data.pkl, alike, walked once; the directory opens in well under a second
    (~55 ms of CPU on a 2-core VM, 10 to 15 of them for the tensor items). 1,000 tensors of
    distinct shapes: each data.pkl (~150 bytes) walked once (~40 ms more in all). The
    safetensors layout has none to walk."""
    walked: list[int] = []
    walk_names = smartload._dcp_items.walk_names

    def counting(data: Any, start: int, named: list[tuple[str, str]]) -> int:
        end = walk_names(data, start, named)
        walked.append(end - start)
        return end

    monkeypatch.setattr(smartload._dcp_items, "walk_names", counting)
    sd = {f"w{i}": torch.randn(100, 4) for i in range(10)}
    rows: dict[str, list[Box]] = {key: [((r, 0), (1, 4)) for r in range(100)] for key in sd}
    alike = _save(tmp_path / "alike", sd, planner=ChunkingPlanner(rows))
    read(alike)  # the first reading pays for imports
    walked.clear()
    started = time.process_time()
    info = smartload.inspect(alike)
    seconds = time.process_time() - started
    assert (info.verdict, info.num_chunks, len(walked)) == ("SAFE", 1000, 1)
    float32 = _DCP_GLOBALS - {
        "torch.int64",
        f"{BytesStorageMetadata.__module__}.BytesStorageMetadata",
    }
    assert set(info.globals) == float32 | _ITEM_GLOBALS - {"torch.LongStorage"}
    assert seconds < 1.0

    walked.clear()
    distinct = _save(tmp_path / "distinct", {f"w{i}": torch.randn(i + 1) for i in range(1000)})
    assert (smartload.inspect(distinct).verdict, len(walked)) == ("SAFE", 1000)
    assert max(walked) < 200

    walked.clear()
    info = smartload.inspect(_save(tmp_path / "st", sd, safetensors=True))
    assert (info.verdict, info.num_chunks, walked) == ("SAFE", 10, [])
    assert set(info.globals) == float32


def test_read_tensor_records_are_kept_by_digest_not_by_bytes(chunked: Path) -> None:
    """What a chunk's data.pkl held is remembered by its BLAKE2b digest and length."""
    smartload.load(_holder(), chunked)
    kept = list(smartload._dcp._TENSORS)
    assert kept and all(
        type(digest) is bytes and len(digest) == 32 and type(length) is int
        for digest, length in kept
    )
    assert len(kept) <= smartload._dcp._TENSORS_KEPT
