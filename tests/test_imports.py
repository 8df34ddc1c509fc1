"""The public surface, and what `import smartload` pulls in."""

from __future__ import annotations

import subprocess
import sys

import smartload


def test_import_smartload_imports_no_framework() -> None:
    code = (
        "import sys, smartload; "
        "print(' '.join(m for m in ('torch', 'timm', 'detectron2', 'torchvision', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_is_one_sorted_all() -> None:
    assert smartload.__all__ == sorted(smartload.__all__)
    assert set(smartload.__all__) == {
        "CheckpointFormatError", "CheckpointInfo", "IncompatibleCheckpointError",
        "InvalidArgumentError", "LoadPlan", "LoadReport", "PlanEntry", "SmartloadError",
        "UnsafeCheckpointError", "__version__", "class_map_by_names", "diff", "inspect", "load",
    }  # fmt: skip
    for name in smartload.__all__:
        assert getattr(smartload, name) is not None


def test_error_tree() -> None:
    for name in (
        "CheckpointFormatError",
        "UnsafeCheckpointError",
        "IncompatibleCheckpointError",
        "InvalidArgumentError",
    ):
        assert issubclass(getattr(smartload, name), smartload.SmartloadError)


def test_a_plain_load_imports_no_distributed_tensor() -> None:
    """``torch.distributed.tensor`` costs half a second to import: a load looks for DTensors
    only when something has imported it (a model cannot hold one otherwise)."""
    code = (
        "import os, sys, tempfile, torch, smartload\n"
        "m = torch.nn.Linear(4, 4)\n"
        "p = os.path.join(tempfile.mkdtemp(), 'a.pt')\n"
        "torch.save(m.state_dict(), p)\n"
        "smartload.load(m, p)\n"
        "print('torch.distributed.tensor' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
