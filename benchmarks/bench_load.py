"""Load speed and memory: smartload against the plain torch and safetensors paths, same files.

Builds an fp32 model of about ``--size-gb`` (a stack of 4096×4096 linears and a 1000-class head),
saves it as a torch zip and as safetensors, then times each loader in a fresh subprocess,
alternating them, ``--repeat`` times (warm page cache), and prints medians, min–max, the peak extra
anonymous memory (sampled from /proc/self/status) and ratios to the best plain path per case.

    .venv/bin/python benchmarks/bench_load.py              # 1.5 GB, 5 rounds
    .venv/bin/python benchmarks/bench_load.py --size-gb 0.2 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HIDDEN = 4096
DATA = Path(__file__).resolve().parent / ".data"

# (name, format, code run in the child: `model`, `path` and `num_classes` are defined there)
LOADERS = {
    "torch.load(mmap)+load_state_dict": ("pth", "plain"),
    "torch.load+load_state_dict": ("pth", "plain"),
    "safetensors load_model": ("safetensors", "plain"),
    "safetensors safe_open+copy_": ("safetensors", "plain"),
    "smartload.load": ("pth", "smartload"),
    "smartload.load (safetensors)": ("safetensors", "smartload"),
    "smartload.load (no NaN check)": ("pth", "smartload"),
}
INSPECTS = {"smartload.inspect": "pth", "smartload.inspect (safetensors)": "safetensors"}


def build_model(layers: int, num_classes: int):  # type: ignore[no-untyped-def]
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
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5)  # touch every page, so the model is in the baseline RSS
    return net


def child(loader: str, case: str, layers: int) -> None:
    import torch

    num_classes = 1000 if case == "same-shape" else 10
    model = build_model(layers, num_classes)
    fmt = LOADERS[loader][0] if loader in LOADERS else INSPECTS[loader]
    path = str(DATA / f"model-{layers}.{fmt}")
    if loader.startswith("smartload"):  # imports are not what we time
        import smartload._apply
        import smartload._plan  # noqa: F401
    anon = _Sampler()
    start = time.perf_counter()
    if loader in INSPECTS:
        import smartload

        smartload.inspect(path)
    elif loader.startswith("smartload.load"):
        import smartload

        kwargs = {"on_nonfinite": "allow"} if "no NaN" in loader else {}
        smartload.load(model, path, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
    else:
        if loader.startswith("torch.load"):
            sd = torch.load(path, mmap="mmap" in loader, weights_only=True)
        elif loader == "safetensors load_model" and case == "same-shape":
            from safetensors.torch import load_model

            load_model(model, path)
            sd = None
        else:
            from safetensors import safe_open

            sd = {}
            with safe_open(path, "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sd[key] = f.get_tensor(key)
        if sd is not None:
            if case == "head-changed":
                sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
            model.load_state_dict(sd, strict=case == "same-shape")
    wall = time.perf_counter() - start
    peak = anon.stop()
    print(json.dumps({"wall": wall, "peak_anon_mb": peak}))


class _Sampler:
    """Peak growth of RssAnon over the baseline, sampled every millisecond."""

    def __init__(self) -> None:
        self.base = _rss_anon()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_anon())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())
        return (self.peak - self.base) / 1024


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def make_files(layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    DATA.mkdir(exist_ok=True)
    pth, st = DATA / f"model-{layers}.pth", DATA / f"model-{layers}.safetensors"
    if pth.exists() and st.exists():
        return
    print(f"writing {pth.name} and {st.name} ...", file=sys.stderr)
    torch.manual_seed(0)
    model = build_model(layers, 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    sd = model.state_dict()
    torch.save(sd, pth)
    save_file(sd, str(st))


def run(loader: str, case: str, layers: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", loader, case, str(layers)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _cli_run(path: Path) -> tuple[float, float]:
    """Wall time and peak RSS (MB) of the console script on ``path``, output discarded."""
    script = Path(sys.executable).with_name("smartload")
    start = time.perf_counter()
    proc = subprocess.Popen([str(script), "inspect", str(path)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"smartload inspect {path} exited {proc.returncode}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        loader, case, layers = args.child
        child(loader, case, int(layers))
        return
    layers = max(1, round(args.size_gb * 1024**3 / (HIDDEN * HIDDEN * 4)))
    make_files(layers)
    size = (DATA / f"model-{layers}.pth").stat().st_size
    print(f"model: {layers} × Linear({HIDDEN}, {HIDDEN}) + head, {size / 1024**3:.2f} GB fp32")
    cases = ("same-shape", "head-changed")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for loader in LOADERS:  # warm the page cache and the children's imports
        run(loader, cases[0], layers)
    for i in range(args.repeat):
        print(f"round {i + 1}/{args.repeat}", file=sys.stderr)
        for case in cases:
            for loader in LOADERS:
                results.setdefault((loader, case), []).append(run(loader, case, layers))
        for loader in INSPECTS:
            results.setdefault((loader, "-"), []).append(run(loader, "-", layers))
    print(f"\n{'case':<13} {'loader':<34} {'median s':>9} {'min–max s':>14} "
          f"{'anon MB':>8} {'× best plain':>13}")  # fmt: skip
    for case in cases:
        best = min(
            statistics.median(r["wall"] for r in results[(loader, case)])
            for loader, (_, kind) in LOADERS.items()
            if kind == "plain"
        )
        for loader in LOADERS:
            rows = results[(loader, case)]
            walls = [r["wall"] for r in rows]
            med = statistics.median(walls)
            anon = max(r["peak_anon_mb"] for r in rows)
            print(
                f"{case:<13} {loader:<34} {med:9.3f} {min(walls):6.3f}–{max(walls):6.3f} "
                f"{anon:8.1f} {med / best:12.2f}×"
            )
    print()
    for fmt in ("pth", "safetensors"):
        cli = [_cli_run(DATA / f"model-{layers}.{fmt}") for _ in range(args.repeat)]
        walls = sorted(w for w, _ in cli)
        print(
            f"`smartload inspect model.{fmt}` as a user runs it (process start to exit): "
            f"median {statistics.median(walls) * 1000:.0f} ms, max RSS {max(r for _, r in cli):.0f} MB"
        )
    for loader in INSPECTS:
        walls = [r["wall"] for r in results[(loader, "-")]]
        print(f"{loader}: median {statistics.median(walls) * 1000:.1f} ms "
              f"(min {min(walls) * 1000:.1f}, max {max(walls) * 1000:.1f}) on {size / 1024**3:.2f} GB")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
