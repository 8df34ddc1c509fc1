"""Coverage-guided fuzzing of the reader (atheris): only SmartloadError may escape.

    bash scripts/fuzz [FORMAT ...] [--seconds N]      # FORMAT: zip legacy safetensors pkl index

For each format a valid seed checkpoint is written, then atheris mutates it and every input goes
through ``smartload.inspect`` and ``smartload.load``. Any other exception, a hang (10 s) or
memory past 4 GB is a finding: libFuzzer stops and leaves the input in ``fuzz-findings/``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["smartload"]):
    import smartload
    import smartload._apply  # noqa: F401  (imported lazily by load: instrument it too)
    import smartload._plan  # noqa: F401

import torch
from safetensors.torch import save_file

FORMATS = ("zip", "legacy", "safetensors", "pkl", "index")
ROOT = Path(__file__).resolve().parent.parent


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)


def seed(fmt: str, folder: Path) -> Path:
    """A valid checkpoint of the format, the file the fuzzer mutates."""
    torch.manual_seed(0)
    sd = _Net().state_dict()
    path = folder / "seed"
    if fmt == "zip":
        torch.save({"state_dict": sd, "epoch": 3, "args": argparse.Namespace(lr=0.1)}, path)
    elif fmt == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "pkl":
        data = {
            "model": {k: v.numpy() for k, v in sd.items()},
            "__author__": "Detectron2 Model Zoo",
        }
        path.write_bytes(pickle.dumps(data, protocol=2))
    else:  # an HF-style index over two safetensors shards
        keys = sorted(sd)
        save_file({k: sd[k] for k in keys[:3]}, str(folder / "a.safetensors"))
        save_file({k: sd[k] for k in keys[3:]}, str(folder / "b.safetensors"))
        weight_map = {k: "a.safetensors" if i < 3 else "b.safetensors" for i, k in enumerate(keys)}
        path.write_text(json.dumps({"weight_map": weight_map}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("format", choices=FORMATS)
    parser.add_argument("--seconds", type=int, default=600)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"smartload-fuzz-{args.format}-"))
    corpus = work / "corpus"
    corpus.mkdir()
    seed_path = seed(args.format, work)
    (corpus / "seed").write_bytes(seed_path.read_bytes())
    target = work / "input"  # beside the shards, for the index format
    model = _Net()
    findings = ROOT / "fuzz-findings" / args.format
    findings.mkdir(parents=True, exist_ok=True)

    def one_input(data: bytes) -> None:
        target.write_bytes(data)
        try:
            smartload.inspect(target)
        except smartload.SmartloadError:
            pass
        try:
            smartload.load(model, target)
        except smartload.SmartloadError:
            pass

    atheris.Setup(
        [
            sys.argv[0],
            str(corpus),
            f"-max_total_time={args.seconds}",
            "-rss_limit_mb=4096",
            "-timeout=10",
            "-print_final_stats=1",
            f"-artifact_prefix={findings}{os.sep}",
        ],
        one_input,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
