"""Sharded load speed and bytes read: smartload against torch.distributed.checkpoint on FSDP2 ranks.

Writes a model's checkpoint twice into a temporary folder under /tmp (a full ``.safetensors``
file, and a DCP directory saved by 2 FSDP2 ranks with ``dcp.save(model.state_dict())``), then
launches ``python -m torch.distributed.run --standalone --nproc-per-node N`` (gloo, CPU) once per
world size and round, alternating the loaders' order between rounds. In each launch every loader
gets a freshly sharded model (built on the meta device, ``fully_shard`` per block and at the root,
``to_empty``, zeroed). Each rank times the load call alone, after a barrier, and counts the bytes
it read as the growth of ``rchar`` in ``/proc/self/io`` around the call; after the call it checks
its shards against the file. The table gives, per case and loader, the median over rounds of the
slowest rank's time, min–max, the largest rank's bytes as a share of the checkpoint's size on disk
(and smartload's own ``bytes_read``), and the ratio to the peer.

Cases (model: ``--layers`` Linear(hidden, hidden) blocks + a 1000-class head, 226 MB by default):
  same     the DCP directory into 2 ranks: ``dcp.load(model.state_dict())`` vs smartload.load
           (and smartload.load(on_nonfinite="allow"), which skips the NaN/Inf check)
  reshard  the same 2-rank DCP save into 3 ranks
  full     the .safetensors file into 2 ranks: rank 0 ``load_file`` + ``set_model_state_dict(
           full_state_dict=True, broadcast_from_rank0=True)`` vs smartload.load
  head     a 10-class model (class map) from the 1000-class checkpoints: the peers refuse

    bash benchmarks/run sharded                  # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_sharded.py --runs 1 --cases same full
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OLD_CLASSES = 1000
# new class → old class: rows from both halves of the old head (each saved by another rank), and
# two new classes
CLASS_MAP = [0, 999, 500, 3, None, 7, 600, 998, None, 1]
SEED = 1234

DCP = "dcp.load"
BROADCAST = "set_model_state_dict(broadcast)"
SMARTLOAD = "smartload.load"
UNCHECKED = "smartload.load(on_nonfinite='allow')"

# case → (label, ranks, classes, [(loader, checkpoint)]); the first loader is the ratio's base
# unless it is smartload
CASES: dict[str, tuple[str, int, int, list[tuple[str, str]]]] = {
    "same": ("same shapes, DCP dir (2-rank save)", 2, OLD_CLASSES,
             [(DCP, "dcp"), (SMARTLOAD, "dcp"), (UNCHECKED, "dcp")]),
    "reshard": ("resharding: 2-rank DCP save → 3 ranks", 3, OLD_CLASSES,
                [(DCP, "dcp"), (SMARTLOAD, "dcp")]),
    "full": ("full .safetensors file", 2, OLD_CLASSES,
             [(BROADCAST, "safetensors"), (SMARTLOAD, "safetensors")]),
    "head": ("head changed (1000 → 10 classes, class map)", 2, len(CLASS_MAP),
             [(DCP, "dcp"), (BROADCAST, "safetensors"), (SMARTLOAD, "safetensors"),
              (SMARTLOAD, "dcp")]),
}  # fmt: skip
CHECKPOINT_NAMES = {"dcp": "DCP dir", "safetensors": ".safetensors"}

# --------------------------------------------------------------------------------------------------
# the model (built in the workers)


def build(layers: int, hidden: int, classes: int, sharded: bool) -> Any:
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*(nn.Linear(hidden, hidden) for _ in range(layers)))
            self.head = nn.Linear(hidden, classes)

    if not sharded:
        return Net()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with torch.device("meta"):
        net = Net()
    shard(net, init_device_mesh("cpu", (dist.get_world_size(),)))
    net.to_empty(device="cpu")
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()  # touch every page: the model is allocated before the timed call
    return net


def shard(net: Any, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in net.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


# --------------------------------------------------------------------------------------------------
# loaders: run on every rank. Each gets (model, checkpoint path, case) and loads.


def dcp_load(model: Any, path: str, case: str) -> Any:
    import torch.distributed.checkpoint as dcp

    sd = model.state_dict()  # DTensors that share the parameters' storage: loaded in place
    dcp.load(sd, checkpoint_id=path)


def broadcast_load(model: Any, path: str, case: str) -> Any:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = load_file(path) if dist.get_rank() == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)


def smartload_load(model: Any, path: str, case: str, on_nonfinite: str = "error") -> Any:
    import smartload

    if case == "head":
        return smartload.load(
            model,
            path,
            num_classes=len(CLASS_MAP),
            class_map=CLASS_MAP,
            init_seed=SEED,
            on_nonfinite=on_nonfinite,
        )
    return smartload.load(model, path, init_seed=SEED, on_nonfinite=on_nonfinite)


def smartload_unchecked(model: Any, path: str, case: str) -> Any:
    return smartload_load(model, path, case, on_nonfinite="allow")


LOADERS = {
    DCP: dcp_load,
    BROADCAST: broadcast_load,
    SMARTLOAD: smartload_load,
    UNCHECKED: smartload_unchecked,
}

# --------------------------------------------------------------------------------------------------
# the workers (torch.distributed.run runs one per rank)


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def error_line(exc: BaseException) -> str:
    """The first line of the first error (a CheckpointException holds each rank's)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))[0]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def wrong_keys(model: Any, safetensors_path: str, case: str) -> list[str]:
    """The keys whose local shard differs from the same box of the file (head rows that the
    class map leaves new are not checked)."""
    import torch
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    wrong = []
    with safe_open(safetensors_path, "pt") as f:
        for key, t in model.state_dict().items():
            if not isinstance(t, DTensor):
                wrong.append(f"{key} (not a DTensor)")
                continue
            local = t.to_local().detach()
            shape, offset = compute_local_shape_and_global_offset(
                t.shape, t.device_mesh, t.placements
            )
            box = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
            if case == "head" and key.startswith("head."):
                rows = CLASS_MAP[box[0].start : box[0].stop]
                full = f.get_tensor(key)
                same = all(
                    torch.equal(local[i], full[old])
                    for i, old in enumerate(rows)
                    if old is not None
                )
            else:
                same = torch.equal(local, f.get_slice(key)[box])
            if not same:
                wrong.append(key)
    return wrong


def worker(root: str, out: str, layers: int, hidden: int, items: list[str]) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    # imports are not what we time
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    from safetensors.torch import load_file  # noqa: F401

    import smartload  # noqa: F401
    import smartload._apply
    import smartload._boxread
    import smartload._plan
    import smartload._sharded  # noqa: F401

    try:
        import smartload._dcp  # noqa: F401
    except ImportError:
        pass
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    checkpoints = {"dcp": f"{root}/dcp", "safetensors": f"{root}/model.safetensors"}
    for item in items:
        case, loader, checkpoint = item.split("|")
        model = build(layers, hidden, CASES[case][2], sharded=True)
        result: dict[str, Any] = {"rank": rank, "error": None}
        dist.barrier()
        bytes_before, start = rchar(), time.perf_counter()
        try:
            report = LOADERS[loader](model, checkpoints[checkpoint], case)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # dcp's CheckpointException is a BaseException
            report, result["error"] = None, error_line(exc)
        result["wall"] = time.perf_counter() - start
        result["bytes"] = rchar() - bytes_before
        if report is not None:
            ranks = report.to_dict().get("distributed", {}).get("ranks", [])
            mine = [r["bytes_read"] for r in ranks if r.get("rank") == rank]
            result["report_bytes"] = mine[0] if mine else None
        if result["error"] is None:
            result["wrong"] = wrong_keys(model, checkpoints["safetensors"], case)
        del model
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(out, "a") as f:
                f.write(json.dumps({"item": item, "ranks": gathered}) + "\n")
    torch.distributed.destroy_process_group()


def prepare(root: str, layers: int, hidden: int) -> None:
    """Every rank builds the same model (same seed); rank 0 saves it whole, then both save it
    sharded with DCP."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = build(layers, hidden, OLD_CLASSES, sharded=False)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    if dist.get_rank() == 0:
        save_file(net.state_dict(), f"{root}/model.safetensors")
    shard(net, init_device_mesh("cpu", (dist.get_world_size(),)))
    dcp.save(net.state_dict(), checkpoint_id=f"{root}/dcp")
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# the driver


def launch(ranks: int, args: list[str], timeout: float) -> tuple[int | None, str]:
    """torchrun this script on ``ranks`` gloo ranks: (exit status or None on timeout, stderr)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={ranks}", __file__, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and the ranks it started (its own session)
        _, err = proc.communicate()
        return None, err


def _last_error(stderr: str) -> str:
    lines = [
        line.strip()
        for line in stderr.splitlines()
        if "Error" in line or "Exception" in line or "error" in line
    ]
    return lines[-1] if lines else "no output"


def _cache(paths: list[Path]) -> None:
    """Read the checkpoints once, so every launch starts with them in the page cache."""
    buffer = bytearray(16 * 1024 * 1024)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--runs", type=int, default=5, help="rounds (fresh launches) per case")
    parser.add_argument("--layers", type=int, default=13, help="Linear(hidden, hidden) blocks")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per launch")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        root, out, *items = args.worker
        worker(root, out, args.layers, args.hidden, items)
        return
    if args.prepare:
        prepare(args.prepare, args.layers, args.hidden)
        return

    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="smartload-bench-sharded-", dir="/tmp"))
    try:
        shape = ["--layers", str(args.layers), "--hidden", str(args.hidden)]
        print(f"writing the checkpoints under {root} ...", file=sys.stderr)
        status, err = launch(2, [*shape, "--prepare", str(root)], args.timeout)
        if status != 0:
            raise SystemExit(f"writing the checkpoints failed:\n{err[-3000:]}")
        sizes = {"dcp": _size(root / "dcp"), "safetensors": _size(root / "model.safetensors")}
        results = rounds(root, args, shape)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(args, sizes, results, time.perf_counter() - began)


def rounds(root: Path, args: Any, shape: list[str]) -> dict[str, list[dict[str, Any]]]:
    """item → one result per round: its ranks' results, or {"error": ...}."""
    by_world: dict[int, list[str]] = {}
    for case in args.cases:
        _, world, _, loaders = CASES[case]
        by_world.setdefault(world, []).extend(f"{case}|{name}|{ckpt}" for name, ckpt in loaders)
    results: dict[str, list[dict[str, Any]]] = {}
    failed: set[str] = set()  # a loader that failed once is not run again
    for i in range(args.runs):
        for world, all_items in by_world.items():
            items = [item for item in all_items if item not in failed]
            if not items:
                continue
            items = items if i % 2 == 0 else items[::-1]
            print(f"round {i + 1}/{args.runs}: {world} ranks, {len(items)} loads", file=sys.stderr)
            _cache([root / "model.safetensors", *sorted((root / "dcp").iterdir())])
            out = root / f"round{i}-{world}.jsonl"
            status, err = launch(world, [*shape, "--worker", str(root), str(out), *items],
                                 args.timeout)  # fmt: skip
            done = {}
            if out.exists():
                for line in out.read_text().splitlines():
                    row = json.loads(line)
                    done[row["item"]] = {"ranks": row["ranks"]}
            for item in items:
                if item not in done:  # the launch died or hung during (or before) this item
                    why = "timed out" if status is None else f"launch failed: {_last_error(err)}"
                    done[item] = {"error": why}
                    print(f"  {item}: {why}\n{err[-2000:]}", file=sys.stderr)
                errors = [r["error"] for r in done[item].get("ranks", []) if r["error"]]
                if "error" in done[item] or errors:
                    failed.add(item)
                results.setdefault(item, []).append(done[item])
    return results


def print_table(
    args: Any, sizes: dict[str, int], results: dict[str, list[dict[str, Any]]], total: float
) -> None:
    import platform

    print(
        f"\n{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}, gloo on CPU, medians of {args.runs} runs in fresh "
        f"launches, {args.layers} × Linear({args.hidden}, {args.hidden}) + a 1000-class head: "
        f".safetensors {sizes['safetensors'] / 1e6:.0f} MB, DCP dir {sizes['dcp'] / 1e6:.0f} MB\n"
    )
    print(
        "| case | loader | ranks | median s (max over ranks) | min–max s | bytes per rank (max) | × peer |"
    )
    print("|---|---|---|---|---|---|---|")  # fmt: skip
    notes = []
    for case in args.cases:
        label, world, _, loaders = CASES[case]
        medians: dict[str, float] = {}
        for loader, checkpoint in loaders:
            item = f"{case}|{loader}|{checkpoint}"
            name = f"{loader} ({CHECKPOINT_NAMES[checkpoint]})" if case == "head" else loader
            runs = results.get(item, [])
            errors = [r["error"] for r in runs if "error" in r]
            errors += [rk["error"] for r in runs for rk in r.get("ranks", []) if rk["error"]]
            if errors:
                print(f"| {label} | {name} | {world} | fails: {errors[0][:160]} | | | |")
                continue
            if not runs:
                continue
            walls = [max(rk["wall"] for rk in r["ranks"]) for r in runs]
            size = sizes[checkpoint]
            share = max(rk["bytes"] for r in runs for rk in r["ranks"]) / size
            cell = f"{100 * share:.1f} %"
            reported = [rk.get("report_bytes") for r in runs for rk in r["ranks"]]
            if loader == BROADCAST:
                cell += " (+ the file mapped on rank 0)"
            if loader in (SMARTLOAD, UNCHECKED):
                known = [b for b in reported if b is not None]
                cell += f" (report {100 * max(known) / size:.1f} %)" if known else " (no report)"
            medians[loader] = statistics.median(walls)
            base = loaders[0][0]
            ratio = (
                f"{medians[loader] / medians[base]:.2f}×"
                if base not in (SMARTLOAD, UNCHECKED) and base in medians
                else "–"
            )
            print(
                f"| {label} | {name} | {world} | {_t(medians[loader])} "
                f"| {_t(min(walls))}–{_t(max(walls))} | {cell} | {ratio} |"
            )
            for r in runs:
                for rk in r["ranks"]:
                    if rk.get("wrong"):
                        notes.append(
                            f"{label}, {name}, rank {rk['rank']}: wrong values in "
                            f"{len(rk['wrong'])} keys ({', '.join(rk['wrong'][:3])})"
                        )
    print(
        "\nTargets: a same-shape load no slower than dcp.load (aim: 0.8×), and never more than "
        "1/N + 5 % of the checkpoint's bytes read per rank (N ranks: 55 % at 2, 38.3 % at 3).\n"
        "Bytes are the growth of rchar in /proc/self/io around the call (read() and the like, "
        "on each rank): neither what a rank receives through gloo collectives nor the pages of "
        "a file it maps count (rank 0's safetensors load_file maps the whole file)."
    )
    print(
        "Values: every rank's shards were compared with the file after each load"
        + (":\n- " + "\n- ".join(dict.fromkeys(notes)) if notes else ": all equal.")
    )
    print(f"\n(benchmark took {total:.0f} s)")


def _t(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds:.3f}"


if __name__ == "__main__":
    main()
