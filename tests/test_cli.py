"""The smartload command line: in-process and as a subprocess, on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_net
from test_hostile import protocol0_eval, reduce_in_torch_zip

from smartload.cli import main


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": make_net(10).state_dict(), "epoch": 4}, path)
    return path


def test_inspect_prints_a_readable_summary(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(ckpt)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [
        str(ckpt),
        "  format      torch-zip",
        "  safety      safe: nothing in the file can run; globals: collections.OrderedDict, "
        "torch._utils._rebuild_tensor_v2, torch.FloatStorage, torch.LongStorage",
        "  state dict  state_dict: 9 tensors, 347 parameters, 1.4 KB (float32 ×8, int64 ×1)",
        "  epoch       4",
    ]
    assert "  head        fc.weight: 10 rows → 10 classes (classifier)" in lines
    assert "  bn.{bias, running_mean, running_var, weight}  [8]                float32" in lines


def test_inspect_json(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(ckpt), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {k: data[k] for k in ("format", "safe", "state_dict_path", "num_tensors", "num_params")} == {
        "format": "torch-zip", "safe": True, "state_dict_path": ["state_dict"],
        "num_tensors": 9, "num_params": 347,
    }  # fmt: skip
    assert data["tensors"]["fc.weight"] == {"shape": [10, 8], "dtype": "float32"}
    assert data["extras"] == {"epoch": "4"}
    assert data["dtypes"] == {"float32": 8, "int64": 1}


def test_hostile_file_exits_4_naming_the_globals(
    tmp_path: Path, touch: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = reduce_in_torch_zip(tmp_path, touch)
    assert main(["inspect", str(path), "--json"]) == 4
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert (data["safe"], data["error"], data["globals"]) == (False, "unsafe", ["posix.system"])
    assert captured.err.startswith(
        f"smartload: unsafe: {path}:archive/data.pkl: refusing a hostile checkpoint: it names posix.system"
    )


def test_unreadable_file_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert main(["inspect", str(path)]) == 3
    assert (
        capsys.readouterr().err
        == f"smartload: unreadable: {path}: empty file (0 bytes). The download or save failed\n"
    )


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == "smartload 0.1.0\n"


def test_large_checkpoints_collapse_unless_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.pth"
    torch.save({f"blocks.{i}.attn.qkv.weight": torch.zeros(1, i + 1) for i in range(1200)}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  ... 1160 more groups (--all shows them)" in out.splitlines()
    assert len(out.splitlines()) < 60
    assert main(["inspect", str(path), "--all"]) == 0
    assert "blocks.600.attn.qkv.weight" in capsys.readouterr().out


def test_subprocess_never_imports_torch_and_runs_nothing(
    tmp_path: Path, ckpt: Path, touch: str
) -> None:
    """`python -m smartload inspect` equals the console script, imports no torch, runs no payload."""
    hostile = protocol0_eval(tmp_path, touch)
    code = (
        "import sys; from smartload.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    ok = subprocess.run(
        [sys.executable, "-c", code, "inspect", str(ckpt)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "smartload", "inspect", str(hostile)], capture_output=True, text=True
    )
    assert bad.returncode == 4
    assert "builtins.eval" in bad.stderr
    script = Path(sys.executable).with_name("smartload")
    same = subprocess.run([str(script), "inspect", str(ckpt)], capture_output=True, text=True)
    via_module = subprocess.run(
        [sys.executable, "-m", "smartload", "inspect", str(ckpt)], capture_output=True, text=True
    )
    assert same.returncode == 0 and same.stdout == via_module.stdout
