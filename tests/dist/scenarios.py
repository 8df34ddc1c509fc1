"""Sharded loads, run on every rank by ``python -m torch.distributed.run --nproc-per-node N``.

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist/scenarios.py DIR``
writes ``DIR/rank{r}.json``: for each scenario, what the load did on that rank (error class and
message, or the report), whether every local shard equals the same box of a one-process load
with the same seed, whether the model was left untouched after a failure, and the bytes the rank
read as ``/proc/self/io`` counts them (from outside the loader). ``tests/test_sharded.py`` runs
it and checks the results. The backend is gloo on the CPU, or NCCL where
``SMARTLOAD_DIST_BACKEND=nccl`` (one GPU per rank).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import smartload

OLD_CLASSES = 1000
# rows from both halves of the old head, and two new classes
CLASS_MAP = [0, 999, 500, 3, None, 7, 600, 998, None, 1]
SEED = 1234
WIDE = 4097  # a body of 2.6 MB for counting bytes


class Net(nn.Module):
    """A body of uneven width (257 rows do not split evenly) and a class head."""

    def __init__(self, num_classes: int, width: int = 257) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 96))
        self.norm = nn.LayerNorm(96)
        self.head = nn.Linear(96, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


def _device() -> torch.device:
    if os.environ.get("SMARTLOAD_DIST_BACKEND") == "nccl":
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def build(num_classes: int, seed: int = 7, width: int = 257) -> Net:
    torch.manual_seed(seed)
    return Net(num_classes, width).to(_device())


def fsdp(model: Net) -> Net:
    mesh = init_device_mesh(_device().type, (dist.get_world_size(),))
    fully_shard(model.body, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def hsdp(model: Net) -> Net:
    """Replicated across pairs of ranks, sharded within each pair (4 ranks)."""
    world = dist.get_world_size()
    mesh = init_device_mesh(_device().type, (world // 2, 2), mesh_dim_names=("replicate", "shard"))
    fully_shard(model.body, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tensor_parallel(model: Net) -> Net:
    mesh = init_device_mesh(_device().type, (dist.get_world_size(),))
    plan = {"body.0": ColwiseParallel(), "body.2": RowwiseParallel(), "head": ColwiseParallel()}
    parallelize_module(model, mesh, plan)
    return model


# --------------------------------------------------------------------------------------------------
# checkpoints (written by rank 0)


def write_checkpoints(root: Path) -> None:
    sd = {k: v.cpu() for k, v in build(OLD_CLASSES, seed=3).state_dict().items()}
    torch.save({"model": sd, "epoch": 9}, root / "ckpt.pt")
    save_file(sd, root / "model.safetensors")
    index = root / "index"
    index.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, index / name)
        weight_map.update(dict.fromkeys(part, name))
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    bad = dict(sd)  # NaN in a class row the class map drops: only one rank's part holds it
    bad["head.weight"] = sd["head.weight"].clone()
    bad["head.weight"][700, 5] = float("nan")
    save_file(bad, root / "nan_dropped_row.safetensors")
    body_nan = dict(sd)  # NaN in a body row only rank 1's shard holds
    body_nan["body.0.weight"] = sd["body.0.weight"].clone()
    body_nan["body.0.weight"][200, 0] = float("nan")
    save_file(body_nan, root / "nan_rank1_rows.safetensors")
    same = {k: v.cpu() for k, v in build(10, seed=5, width=WIDE).state_dict().items()}
    save_file(same, root / "same_shape.safetensors")


class _Hostile:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def write_dcp(root: Path) -> None:
    """DCP directories saved by the sharded models themselves (every rank writes its chunks),
    as training scripts do: ``{"model": state_dict}``, and copies of one spoilt."""
    old = fsdp(build(OLD_CLASSES, seed=3))
    dcp.save({"model": old.state_dict()}, checkpoint_id=root / "dcp")
    same = fsdp(build(10, seed=5, width=WIDE))
    dcp.save(same.state_dict(), checkpoint_id=root / "dcp_same")
    dist.barrier()
    if dist.get_rank() != 0:
        return
    hostile = root / "dcp_hostile"
    shutil.copytree(root / "dcp", hostile)
    (hostile / ".metadata").write_bytes(pickle.dumps(_Hostile(), protocol=4))
    # the last rank's file garbled where its first chunk lies: only the rank reading it sees it
    broken = root / "dcp_broken"
    shutil.copytree(root / "dcp_same", broken)
    last = sorted(broken.glob("*.distcp"))[-1]
    data = bytearray(last.read_bytes())
    data[:64] = b"\0" * 64
    last.write_bytes(bytes(data))


def reference(path: Path, classes: int, **kwargs: Any) -> dict[str, torch.Tensor]:
    """A one-process load into an unsharded model of ``classes`` (the expected values)."""
    model = build(classes).cpu()
    smartload.load(model, path, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# checks


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _box(t: torch.Tensor) -> tuple[slice, ...]:
    if not isinstance(t, DTensor):
        return tuple(slice(None) for _ in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def shards_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> dict[str, bool]:
    out = {}
    for key, t in model.state_dict().items():
        local = _local(t).detach().cpu()
        out[key] = bool(torch.equal(local, expected[key][_box(t)]))
    return out


def local_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: _local(v).detach().clone() for k, v in model.state_dict().items()}


def untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Every tensor as it was (on the meta device: still there, still on meta)."""
    return all(
        _local(v).is_meta if before[k].is_meta else torch.equal(_local(v), before[k])
        for k, v in model.state_dict().items()
    )


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def run_load(model: nn.Module, path: Any, **kwargs: Any) -> dict[str, Any]:
    before = local_snapshot(model)
    start = rchar()
    try:
        report = smartload.load(model, path, **kwargs)
    except smartload.SmartloadError as exc:
        return {
            "error": type(exc).__name__,
            "message": str(exc),
            "ranks": getattr(exc, "ranks", None),
            "untouched": untouched(model, before),
        }
    return {
        "error": None,
        "bytes_outside": rchar() - start,
        "report": report.to_dict(),
        "text": str(report),
        "same_params": True,
    }


# --------------------------------------------------------------------------------------------------
# scenarios: name → function(root) → result dict


def _head_load(name: str) -> Callable[[Path], dict[str, Any]]:
    def scenario(root: Path) -> dict[str, Any]:
        parallel, file_name = HEAD_LOADS[name]
        path = root / file_name
        kwargs: dict[str, Any] = {"num_classes": 10, "class_map": CLASS_MAP, "init_seed": SEED}
        if file_name in ("ckpt.pt", "dcp"):
            kwargs["state_dict_path"] = ["model"]
        model = parallel(build(10))
        ids = [id(p) for p in model.parameters()]
        result = run_load(model, path, **kwargs)
        result["equal"] = shards_equal(model, reference(path, 10, **kwargs))
        result["same_params"] = ids == [id(p) for p in model.parameters()]
        return result

    return scenario


def forward_after_fsdp_load(root: Path) -> dict[str, Any]:
    model = fsdp(build(10))
    kwargs = {"num_classes": 10, "class_map": CLASS_MAP, "init_seed": SEED}
    result = run_load(model, root / "model.safetensors", **kwargs)
    plain = build(10).cpu()
    smartload.load(plain, root / "model.safetensors", **kwargs)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result["forward_equal"] = bool(torch.equal(model(x.to(_device())).cpu(), plain(x)))
    return result


def default_seed_follows_manual_seed(root: Path) -> dict[str, Any]:
    """``init_seed=None``: one number from the default generator (rank 0's)."""
    model, plain = fsdp(build(10)), build(10).cpu()
    path, kwargs = root / "model.safetensors", {"num_classes": 10, "class_map": CLASS_MAP}
    torch.manual_seed(99 + dist.get_rank())  # the ranks' generators differ: rank 0's counts
    result = run_load(model, path, **kwargs)
    torch.manual_seed(99)
    smartload.load(plain, path, **kwargs)
    result["equal"] = shards_equal(model, plain.state_dict())
    return result


def tiny_head(root: Path) -> dict[str, Any]:
    """One class over more ranks than rows: some ranks hold an empty shard of the head."""
    model = fsdp(build(1))
    kwargs = {"num_classes": 1, "class_map": [998], "init_seed": SEED}
    result = run_load(model, root / "model.safetensors", **kwargs)
    result["local_rows"] = int(_local(model.head.weight).shape[0])
    result["equal"] = shards_equal(model, reference(root / "model.safetensors", 1, **kwargs))
    return result


def nan_in_dropped_row(root: Path) -> dict[str, Any]:
    model = fsdp(build(10))
    return run_load(
        model, root / "nan_dropped_row.safetensors", num_classes=10, class_map=CLASS_MAP
    )


def nan_in_rank1_rows(root: Path) -> dict[str, Any]:
    model = fsdp(build(10))
    return run_load(model, root / "nan_rank1_rows.safetensors", num_classes=10, class_map=CLASS_MAP)


def path_missing_on_rank1(root: Path) -> dict[str, Any]:
    model = fsdp(build(10))
    name = "model.safetensors" if dist.get_rank() == 0 else "gone.safetensors"
    return run_load(model, root / name, num_classes=10, class_map=CLASS_MAP)


def different_plans(root: Path) -> dict[str, Any]:
    model = fsdp(build(10))
    cmap = CLASS_MAP if dist.get_rank() == 0 else list(reversed(CLASS_MAP))
    return run_load(model, root / "model.safetensors", num_classes=10, class_map=cmap)


def partial_placement(root: Path) -> dict[str, Any]:
    model = fsdp(build(10))
    mesh = model.head.weight.device_mesh
    local = torch.zeros(10, device=_device())
    model.head.bias = nn.Parameter(DTensor.from_local(local, mesh, [Partial()]))
    return run_load(model, root / "model.safetensors", num_classes=10, class_map=CLASS_MAP)


def same_shape_bytes(root: Path) -> dict[str, Any]:
    return _bytes_outside(root, "same_shape.safetensors")


def _bytes_outside(root: Path, name: str) -> dict[str, Any]:
    """A same-shape load of ``name`` (a file or a DCP directory), with the bytes the rank read
    by read() calls, as /proc/self/io counts them (every checked value is read that way, a few
    MB at a time, before the ranks agree; the copy into the shards then takes the same pages
    from the page cache), and whether every shard equals what torch itself reads there."""
    path = root / name
    model = fsdp(build(10, width=WIDE))
    result = run_load(model, path, init_seed=SEED)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    result["file_bytes"] = sum(f.stat().st_size for f in files if f.suffix != ".metadata")
    result["equal_to_torch"] = shards_equal(model, _read_by_torch(path))
    return result


def _read_by_torch(path: Path) -> dict[str, torch.Tensor]:
    """The whole tensors as torch reads them: safetensors' ``load_file``, or ``dcp.load`` into
    an unsharded model's state dict (on every rank: it is collective)."""
    if not path.is_dir():
        return load_file(path)
    state = build(10, width=WIDE).cpu().state_dict()
    dcp.load(state, checkpoint_id=path)
    return state


def ddp_group_missing_path(root: Path) -> dict[str, Any]:
    """A replicated (unsharded) model with process_group given: all or nothing too."""
    model = build(10)
    name = "model.safetensors" if dist.get_rank() == 0 else "gone.safetensors"
    result = run_load(model, root / name, num_classes=10, process_group=dist.group.WORLD)
    return result


def ddp_group_load(root: Path) -> dict[str, Any]:
    model = build(10)
    kwargs = {"num_classes": 10, "class_map": CLASS_MAP, "init_seed": SEED}
    result = run_load(model, root / "model.safetensors", process_group=dist.group.WORLD, **kwargs)
    result["equal"] = shards_equal(model, reference(root / "model.safetensors", 10, **kwargs))
    return result


def dcp_same_shape_bytes(root: Path) -> dict[str, Any]:
    """The layout of the save: each rank reads its own chunks."""
    return _bytes_outside(root, "dcp_same")


def dcp_hostile_metadata(root: Path) -> dict[str, Any]:
    return run_load(fsdp(build(10)), root / "dcp_hostile", num_classes=10)


def dcp_chunk_broken_on_last_rank(root: Path) -> dict[str, Any]:
    return run_load(fsdp(build(10, width=WIDE)), root / "dcp_broken")


def half_precision_sums_overflow(root: Path) -> dict[str, Any]:
    """Finite float16 values whose float16 sum overflows: loaded, not taken for Inf."""
    torch.manual_seed(0)
    model = nn.Linear(200, 200).half().to(_device())
    path = root / "twos_fp16.safetensors"
    if dist.get_rank() == 0:
        save_file({"weight": torch.full((200, 200), 2.0).half(), "bias": torch.zeros(200).half()},
                  path)  # fmt: skip
    dist.barrier()
    result = run_load(model, path, process_group=dist.group.WORLD)
    result["all_twos"] = bool((model.weight == 2).all())
    return result


def meta_model_with_a_group(root: Path) -> dict[str, Any]:
    with torch.device("meta"):
        model = Net(10)
    return run_load(model, root / "model.safetensors", num_classes=10,
                    process_group=dist.group.WORLD)  # fmt: skip


def dry_run_on_rank1_only(root: Path) -> dict[str, Any]:
    model = fsdp(build(10))
    return run_load(model, root / "model.safetensors", num_classes=10,
                    dry_run=dist.get_rank() == 1)  # fmt: skip


def report_path_unwritable_on_rank0(root: Path) -> dict[str, Any]:
    model = fsdp(build(10))
    blocked = root / "not_a_directory"
    blocked.touch()
    return run_load(model, root / "model.safetensors", num_classes=10,
                    report_path=blocked / "report.json")  # fmt: skip


def dcp_bit_flip_with_checksums(root: Path) -> dict[str, Any]:
    """One flipped bit in a chunk: verify_checksums finds it (each chunk archive has a CRC)."""
    flipped = root / "dcp_flipped"
    if dist.get_rank() == 0 and not flipped.exists():
        shutil.copytree(root / "dcp_same", flipped)
        first = sorted(flipped.glob("*.distcp"))[0]
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 0x40
        first.write_bytes(bytes(data))
    dist.barrier()
    model = fsdp(build(10, width=WIDE))
    return run_load(model, flipped, init_seed=SEED, verify_checksums=True)


class _OwnLoading(nn.Linear):
    """A module with a loader of its own (a conversion in ``_load_from_state_dict``)."""

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)


def own_loader_module(root: Path) -> dict[str, Any]:
    model = build(10)
    model.norm = _OwnLoading(96, 96).to(_device())
    return run_load(model, root / "model.safetensors", num_classes=10,
                    policies={"norm.*": "skip"}, process_group=dist.group.WORLD)  # fmt: skip


def report_file(root: Path) -> dict[str, Any]:
    model = fsdp(build(10))
    path = root / "report.json"
    result = run_load(model, root / "model.safetensors", num_classes=10, class_map=CLASS_MAP,
                      init_seed=SEED, report_path=path)  # fmt: skip
    dist.barrier()
    result["file"] = json.loads(path.read_text())
    result["leftovers"] = sorted(p.name for p in root.glob(".smartload-*"))
    return result


# head loads: name → (how the model is sharded, checkpoint under the checkpoint directory)
HEAD_LOADS: dict[str, tuple[Callable[[Net], Net], str]] = {
    f"{kind}_{label}": (parallel, name)
    for kind, parallel in (("fsdp", fsdp), ("tp", tensor_parallel), ("hsdp", hsdp))
    for label, name in (
        ("torch", "ckpt.pt"),
        ("safetensors", "model.safetensors"),
        ("index", "index"),
        ("dcp", "dcp"),
    )
}

SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "warm_up": forward_after_fsdp_load,  # imports and first reads, before bytes are counted
    **{name: _head_load(name) for name in HEAD_LOADS},
    "forward_after_fsdp_load": forward_after_fsdp_load,
    "default_seed_follows_manual_seed": default_seed_follows_manual_seed,
    "tiny_head": tiny_head,
    "nan_in_dropped_row": nan_in_dropped_row,
    "nan_in_rank1_rows": nan_in_rank1_rows,
    "path_missing_on_rank1": path_missing_on_rank1,
    "different_plans": different_plans,
    "partial_placement": partial_placement,
    "same_shape_bytes": same_shape_bytes,
    "ddp_group_missing_path": ddp_group_missing_path,
    "ddp_group_load": ddp_group_load,
    "dcp_same_shape_bytes": dcp_same_shape_bytes,
    "dcp_hostile_metadata": dcp_hostile_metadata,
    "dcp_chunk_broken_on_last_rank": dcp_chunk_broken_on_last_rank,
    "report_file": report_file,
    "half_precision_sums_overflow": half_precision_sums_overflow,
    "meta_model_with_a_group": meta_model_with_a_group,
    "dry_run_on_rank1_only": dry_run_on_rank1_only,
    "report_path_unwritable_on_rank0": report_path_unwritable_on_rank0,
    "dcp_bit_flip_with_checksums": dcp_bit_flip_with_checksums,
    "own_loader_module": own_loader_module,
}


def main() -> None:
    out = Path(sys.argv[1])
    backend = os.environ.get("SMARTLOAD_DIST_BACKEND", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    rank = dist.get_rank()
    root = out / "checkpoints"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        write_checkpoints(root)
    dist.barrier()
    write_dcp(root)
    dist.barrier()
    results: dict[str, Any] = {"world_size": dist.get_world_size(), "checkpoints": str(root)}
    only = set(sys.argv[2:])  # default: every scenario but those needing 4 ranks
    for name, scenario in SCENARIOS.items():
        if name != "warm_up" and (name not in only if only else name.startswith("hsdp")):
            continue
        try:
            results[name] = scenario(root)
        except Exception:
            results[name] = {"crash": traceback.format_exc()}
        dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1, default=str))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
