"""Load speed and memory: smartload against the plain torch, safetensors, fvcore and timm paths.

Builds the models and files (torch zip saved as ``{"model": state_dict}``, safetensors), then runs
every loader in a fresh subprocess, alternating loaders and rounds, and prints markdown tables:
median wall time of the load call, min–max, peak extra anonymous and file-backed RSS (sampled
every millisecond from /proc/self/status), the CPU other processes used meanwhile, and the ratio
to the best plain path on the same file.

Sections:
  loads    a 1.5 GB fp32 model (Linear(4096, 4096) blocks + a 1000-class head): same shapes, head
           changed to 10 classes, an fp16 file into the fp32 model, and a cold file (its pages
           evicted from the page cache before each run with posix_fadvise(DONTNEED))
  keys     detectron2-style nested models with 1,000 and 20,000 small tensors
  scaling  0.2 / 1.5 / 4 GB, same shapes
  inspect  smartload.inspect and the `smartload inspect` command on the 4 GB files

    bash benchmarks/run                       # everything (about 35 minutes, 14 GB of files)
    bash benchmarks/run --sections keys --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HIDDEN = 4096
DATA = Path(__file__).resolve().parent / ".data"
GB = 1024**3

# --------------------------------------------------------------------------------------------------
# loaders: run in the child. Each gets (model, path, case) and loads path into model.
# "plain" loaders are the peers; the best plain median per (case, file) is the ratio's base.


def _torch_sd(path: str, mmap: bool) -> dict[str, Any]:
    import torch

    return torch.load(path, mmap=mmap, weights_only=True)["model"]  # type: ignore[no-any-return]


def _finish(model: Any, sd: dict[str, Any], case: str) -> None:
    """load_state_dict as a user does it: head keys dropped when the head changed."""
    if case == "head-changed":
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    model.load_state_dict(sd, strict=case != "head-changed")


def torch_mmap(model: Any, path: str, case: str) -> None:
    _finish(model, _torch_sd(path, mmap=True), case)


def torch_full(model: Any, path: str, case: str) -> None:
    _finish(model, _torch_sd(path, mmap=False), case)


def fvcore_checkpointer(model: Any, path: str, case: str) -> None:
    import logging

    from fvcore.common.checkpoint import Checkpointer

    logging.getLogger("fvcore").setLevel(logging.ERROR)  # its shape-mismatch warnings
    Checkpointer(model).load(path)


def timm_load_checkpoint(model: Any, path: str, case: str) -> None:
    from timm.models import load_checkpoint

    if case == "head-changed":
        load_checkpoint(
            model,
            path,
            use_ema=False,
            strict=False,
            filter_fn=lambda sd, m: {k: v for k, v in sd.items() if not k.startswith("head.")},
        )
    else:
        load_checkpoint(model, path, use_ema=False)


def st_load_file(model: Any, path: str, case: str) -> None:
    from safetensors.torch import load_file

    _finish(model, load_file(path), case)


def st_load_model(model: Any, path: str, case: str) -> None:
    from safetensors.torch import load_model

    load_model(model, path, strict=case != "head-changed")


def st_safe_open(model: Any, path: str, case: str) -> None:
    import torch
    from safetensors import safe_open

    targets = model.state_dict()
    with safe_open(path, "pt") as f, torch.no_grad():
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            target = targets.get(key)
            if target is not None and (case != "head-changed" or not key.startswith("head.")):
                target.copy_(f.get_tensor(key))


def smartload_load(model: Any, path: str, case: str) -> None:
    import smartload

    num_classes = 10 if case == "head-changed" else None
    smartload.load(model, path, num_classes=num_classes)


def smartload_unchecked(model: Any, path: str, case: str) -> None:
    import smartload

    num_classes = 10 if case == "head-changed" else None
    smartload.load(model, path, num_classes=num_classes, on_nonfinite="allow")


def smartload_inspect(model: Any, path: str, case: str) -> None:
    import smartload

    smartload.inspect(path)


LOADERS: dict[str, tuple[str, str, Callable[[Any, str, str], None]]] = {
    # name: (file format, kind, function). A name is shown stripped: the same loader on the
    # other format is told apart by a trailing space, the table's format column says which.
    "torch.load(mmap) + load_state_dict": ("pth", "plain", torch_mmap),
    "torch.load + load_state_dict": ("pth", "plain", torch_full),
    "fvcore Checkpointer.load": ("pth", "plain", fvcore_checkpointer),
    "timm load_checkpoint": ("pth", "plain", timm_load_checkpoint),
    "smartload.load": ("pth", "smartload", smartload_load),
    "smartload.load(on_nonfinite='allow')": ("pth", "smartload", smartload_unchecked),
    "safetensors load_file + load_state_dict": ("safetensors", "plain", st_load_file),
    "safetensors load_model": ("safetensors", "plain", st_load_model),
    "safetensors safe_open + copy_": ("safetensors", "plain", st_safe_open),
    "smartload.load ": ("safetensors", "smartload", smartload_load),
    "smartload.load(on_nonfinite='allow') ": ("safetensors", "smartload", smartload_unchecked),
    "smartload.inspect": ("pth", "inspect", smartload_inspect),
    "smartload.inspect ": ("safetensors", "inspect", smartload_inspect),
}
# the loaders each section runs (names above); the rest of the matrix is in SECTIONS
FAST_PEERS = ["torch.load(mmap) + load_state_dict", "safetensors safe_open + copy_"]
SMARTLOAD = ["smartload.load", "smartload.load "]

# --------------------------------------------------------------------------------------------------
# models and files


def dense_model(layers: int, num_classes: int) -> Any:
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.Sequential(
                *(torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(layers))
            )
            self.head = torch.nn.Linear(HIDDEN, num_classes)

    with torch.device("meta"):
        net = Net()
    return net.to_empty(device="cpu")


def nested_model(blocks: int, num_classes: int) -> Any:
    """detectron2-style: backbone.bottom_up.res{2..5}.{i}.conv{1,2,3}.{weight, norm.*}."""
    import torch
    from torch import nn

    class ConvNorm(nn.Conv2d):
        def __init__(self, c: int) -> None:
            super().__init__(c, c, 1, bias=False)
            self.norm = nn.BatchNorm2d(c)

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1, self.conv2, self.conv3 = ConvNorm(c), ConvNorm(c), ConvNorm(c)

    net = nn.Module()
    net.backbone = nn.Module()
    net.backbone.bottom_up = nn.Module()
    for stage in range(4):
        stage_blocks = nn.Sequential(*(Block(8) for _ in range(blocks // 4)))
        setattr(net.backbone.bottom_up, f"res{stage + 2}", stage_blocks)
    net.head = nn.Linear(8, num_classes)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net


def dense_layers(size_gb: float) -> int:
    return max(1, round(size_gb * GB / (HIDDEN * HIDDEN * 4)))


def nested_blocks(keys: int) -> int:
    return max(4, round((keys - 2) / 18 / 4) * 4)  # 18 tensors per block


def build(model_spec: str, num_classes: int) -> Any:
    kind, n = model_spec.split(":")
    if kind == "dense":
        model = dense_model(int(n), num_classes)
        import torch

        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.5)  # touch every page, so the model is in the baseline RSS
        return model
    return nested_model(int(n), num_classes)


def file_path(model_spec: str, fmt: str, dtype: str = "float32") -> Path:
    kind, n = model_spec.split(":")
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return DATA / f"{kind}-{n}{suffix}.{fmt}"


def make_files(model_spec: str, dtype: str = "float32") -> None:
    import torch
    from safetensors.torch import save_file

    pth, st = file_path(model_spec, "pth", dtype), file_path(model_spec, "safetensors", dtype)
    if pth.exists() and st.exists():
        return
    print(f"writing {pth.name} and {st.name} ...", file=sys.stderr)
    DATA.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = build(model_spec, 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    sd = {
        k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    torch.save({"model": sd, "iteration": 1000}, pth)
    save_file(sd, str(st))


# --------------------------------------------------------------------------------------------------
# the child


def child(loader: str, model_spec: str, path: str, case: str) -> None:
    _, kind, fn = LOADERS[loader]
    model = None if kind == "inspect" else build(model_spec, 10 if case == "head-changed" else 1000)
    # imports are not what we time
    if kind == "plain":
        import timm.models  # noqa: F401
    else:
        import smartload._apply
        import smartload._plan  # noqa: F401
    sampler = _Sampler()
    start = time.perf_counter()
    fn(model, path, case)
    wall = time.perf_counter() - start
    anon, file_backed = sampler.stop()
    print(json.dumps({"wall": wall, "anon_mb": anon, "file_mb": file_backed}))


class _Sampler:
    """Peak growth of RssAnon and RssFile over the baseline, sampled every millisecond."""

    def __init__(self) -> None:
        self.base = _rss()
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self._sample()

    def _sample(self) -> None:
        now = _rss()
        self.peak = [max(p, n) for p, n in zip(self.peak, now, strict=True)]

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return (self.peak[0] - self.base[0]) / 1024, (self.peak[1] - self.base[1]) / 1024


def _rss() -> tuple[int, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                values[line.split(":")[0]] = int(line.split()[1])
    return values.get("RssAnon", 0), values.get("RssFile", 0)


# --------------------------------------------------------------------------------------------------
# the parent


def _cpu_busy() -> float:
    """Seconds of CPU time spent by the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run(loader: str, model_spec: str, path: Path, case: str, cold: bool) -> dict[str, float]:
    if cold:
        _evict(path)
    else:
        _cache(path)
    busy, children, start = _cpu_busy(), _children_cpu(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", loader, model_spec, str(path), case],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:  # a peer that cannot do this case: the table says why
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1].strip() if lines else f"exit {proc.returncode}"}  # type: ignore[dict-item]
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    others = max(0.0, (_cpu_busy() - busy) - (_children_cpu() - children))
    result["others_pct"] = 100 * others / (elapsed * (os.cpu_count() or 1))
    return result


def _children_cpu() -> float:
    """CPU seconds used by the children that have exited so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _evict(path: Path) -> None:
    """Drop the file's pages from the page cache (no root needed: posix_fadvise DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cache(path: Path) -> None:
    """Read the file once, so every warm run starts with all of it in the page cache (with 13 GB
    of files and a 4 GB model in 24 GB of memory, earlier runs may have evicted some). Before a
    file of 2 GB or more, the other files are evicted: the model it needs takes as much again."""
    if path.stat().st_size >= 2 * GB:
        for other in DATA.iterdir():
            if other != path:
                _evict(other)
    buffer = bytearray(16 * 1024 * 1024)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def _cases() -> dict[str, list[tuple[str, str, str, str, list[str]]]]:
    """section → [(row label, model spec, case, file dtype, loaders)]."""
    big = f"dense:{dense_layers(1.5)}"
    pth_all = [n for n, (fmt, kind, _) in LOADERS.items() if fmt == "pth" and kind != "inspect"]
    st_all = [
        n for n, (fmt, kind, _) in LOADERS.items() if fmt == "safetensors" and kind != "inspect"
    ]
    nested_loaders = [
        "torch.load(mmap) + load_state_dict",
        "torch.load + load_state_dict",
        "fvcore Checkpointer.load",
        "smartload.load",
        "safetensors safe_open + copy_",
        "safetensors load_model",
        "smartload.load ",
    ]
    return {
        "loads": [
            ("same shapes", big, "same-shape", "float32", pth_all + st_all),
            ("head changed (1000 → 10 classes)", big, "head-changed", "float32", pth_all + st_all),
            ("fp16 file into the fp32 model", big, "same-shape", "float16", pth_all + st_all),
            ("cold file (evicted before each run)", big, "cold", "float32", pth_all + st_all),
        ],
        "keys": [
            (f"{keys:,} keys, nested", f"nested:{nested_blocks(keys)}", "same-shape", "float32", nested_loaders)
            for keys in (1_000, 20_000)
        ],
        "scaling": [
            (f"{size} GB", f"dense:{dense_layers(size)}", "same-shape", "float32", FAST_PEERS + SMARTLOAD)
            for size in (0.2, 1.5, 4.0)
        ],
        "inspect": [
            ("4 GB", f"dense:{dense_layers(4.0)}", "inspect", "float32", ["smartload.inspect", "smartload.inspect "]),
        ],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", default=["loads", "keys", "scaling", "inspect"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--make-files", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.make_files:
        make_files(*args.make_files)
        return
    cases = {s: rows for s, rows in _cases().items() if s in args.sections}
    for rows in cases.values():
        for _, spec, _, dtype, _ in rows:
            # in a child: the parent stays small (a forked child's max RSS counts the parent's)
            subprocess.run([sys.executable, __file__, "--make-files", spec, dtype], check=True)
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    plan = [
        (section, label, spec, case, dtype, loader)
        for section, rows in cases.items()
        for label, spec, case, dtype, loaders in rows
        for loader in loaders
    ]
    # one warm-up run per file (page cache, imports), then alternating rounds
    warm_ups = {
        (spec, dtype, LOADERS[loader][0]): (spec, case, dtype, loader)
        for _, _, spec, case, dtype, loader in plan
    }
    for spec, case, dtype, loader in warm_ups.values():
        _run_one(loader, spec, case, dtype)
    for i in range(args.repeat):
        order = plan if i % 2 == 0 else plan[::-1]
        for n, (section, label, spec, case, dtype, loader) in enumerate(order, 1):
            print(
                f"round {i + 1}/{args.repeat} [{n}/{len(order)}] {label}: {loader}", file=sys.stderr
            )
            results.setdefault((section, label, loader), []).append(
                _run_one(loader, spec, case, dtype)
            )
    _print_tables(cases, results, args.repeat)
    if "inspect" in cases:
        _print_cli(cases["inspect"][0][1])


def _run_one(loader: str, spec: str, case: str, dtype: str) -> dict[str, float]:
    fmt = LOADERS[loader][0]
    path = file_path(spec, fmt, dtype)
    return run(loader, spec, path, "same-shape" if case == "cold" else case, cold=case == "cold")


def _print_tables(
    cases: dict[str, list[tuple[str, str, str, str, list[str]]]],
    results: dict[tuple[str, str, str], list[dict[str, float]]],
    repeat: int,
) -> None:
    import platform

    print(
        f"\n{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}, medians of {repeat} runs in fresh processes\n"
    )
    for section, rows in cases.items():
        print(f"### {section}\n")
        print(
            "| case | loader | file | median s | min–max s | anon MB | file MB | others' CPU | × best plain |"
        )
        print("|---|---|---|---|---|---|---|---|---|")  # fmt: skip
        for label, _, _, _, loaders in rows:
            best: dict[str, float] = {}
            for loader in loaders:
                fmt, kind, _ = LOADERS[loader]
                rs = [r for r in results[(section, label, loader)] if "error" not in r]
                if kind == "plain" and rs:
                    med = statistics.median(r["wall"] for r in rs)
                    best[fmt] = min(best.get(fmt, med), med)
            for loader in loaders:
                fmt, kind, _ = LOADERS[loader]
                rs = results[(section, label, loader)]
                if any("error" in r for r in rs):
                    error = next(str(r["error"]) for r in rs if "error" in r)
                    print(f"| {label} | {loader.strip()} | {fmt} | fails: {error[:90]} | | | | | |")
                    continue
                walls = [r["wall"] for r in rs]
                med = statistics.median(walls)
                ratio = f"{med / best[fmt]:.2f}×" if fmt in best else "–"
                print(
                    f"| {label} | {loader.strip()} | {fmt} | {_t(med)} | {_t(min(walls))}–{_t(max(walls))} "
                    f"| {max(r['anon_mb'] for r in rs):.0f} | {max(r['file_mb'] for r in rs):.0f} "
                    f"| {max(r['others_pct'] for r in rs):.0f} % | {ratio} |"
                )  # fmt: skip
        print()


def _t(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds:.3f}"


def _print_cli(spec: str) -> None:
    script = Path(sys.executable).with_name("smartload")
    for fmt in ("pth", "safetensors"):
        path = file_path(spec, fmt)
        walls, rss = [], []
        for _ in range(5):
            start = time.perf_counter()
            proc = subprocess.Popen([str(script), "inspect", str(path)], stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            walls.append(time.perf_counter() - start)
            rss.append(usage.ru_maxrss / 1024)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"smartload inspect {path} failed")
        print(
            f"`smartload inspect {path.name}` ({path.stat().st_size / GB:.2f} GB), process start "
            f"to exit: median {statistics.median(walls) * 1000:.0f} ms, max RSS {max(rss):.0f} MB"
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
