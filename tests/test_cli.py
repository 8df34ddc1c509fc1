"""The smartload command line: in-process and as a subprocess, on real files."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_net
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_hostile import protocol0_eval, reduce_in_torch_zip

from smartload.cli import main


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": make_net(10).state_dict(), "epoch": 4}, path)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def test_inspect_prints_verdict_first_then_a_grouped_table(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "inspect", str(ckpt))
    assert code == 0
    assert lines(out)[:5] == [
        str(ckpt),
        "SAFE  torch-zip; nothing in the file can run; globals: collections.OrderedDict, "
        "torch._utils._rebuild_tensor_v2, torch.FloatStorage, torch.LongStorage",
        "state dict  state_dict: 9 tensors, 347 parameters, 1.4 KB (float32 ×8, int64 ×1)",
        "epoch       4",
        "head        fc.weight: 10 rows → 10 classes (classifier)",
    ]
    table = [" ".join(line.split()) for line in lines(out)[5:]]
    assert table == [
        "key shape dtype params",
        "conv.weight [8, 3, 3, 3] float32 216",
        "conv.bias [8] float32 8",
        "bn.{bias, running_mean, running_var, weight} [8] float32 32",
        "bn.num_batches_tracked [] int64 1",
        "fc.weight [10, 8] float32 80",
        "fc.bias [10] float32 10",
    ]


@pytest.mark.parametrize("fmt", ["torch-legacy", "safetensors", "pickle"])
def test_inspect_other_formats(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = make_net(10).state_dict()
    path = tmp_path / "weights.bin"
    if fmt == "torch-legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif fmt == "safetensors":
        save_file(sd, str(path))
    else:
        path.write_bytes(
            pickle.dumps({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "x"})
        )
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    data = json.loads(out)
    assert (code, data["format"], data["num_tensors"], data["num_params"]) == (0, fmt, 9, 347)


def test_inspect_json_field_by_field(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", str(ckpt), "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert {k: v for k, v in data.items() if k != "tensors"} == {
        "path": str(ckpt), "format": "torch-zip", "safe": True, "verdict": "SAFE",
        "unknown_globals": [], "state_dict_path": ["state_dict"], "other_state_dicts": [], "num_tensors": 9, "num_params": 347, "nbytes": 1392,
        "dtypes": {"float32": 8, "int64": 1},
        "heads": [{"key": "fc.weight", "rows": 10, "num_classes": 10, "kind": "classifier"}],
        "extras": {"epoch": "4"},
        "globals": ["collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "torch.LongStorage"],
        "inert_globals": [], "metadata": {}, "shared_storages": 0, "non_contiguous": [],
        "module_tree": None,
    }  # fmt: skip
    assert data["tensors"]["fc.weight"] == {"shape": [10, 8], "dtype": "float32"}


def test_hostile_file_exits_4_saying_what_it_would_have_run(
    tmp_path: Path, touch: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = reduce_in_torch_zip(tmp_path, touch)
    code, out, err = run(capsys, "inspect", str(path), "--json")
    assert code == 4
    data = json.loads(out)
    assert (data["safe"], data["verdict"], data["error"], data["globals"], data["calls"]) == (
        False, "UNSAFE", "unsafe", ["posix.system"], [f"posix.system('{touch}')"]
    )  # fmt: skip
    code, out, err = run(capsys, "inspect", str(path))
    assert (code, out) == (4, "")
    assert lines(err)[:4] == [
        f"UNSAFE {path}",
        "  hostile globals: posix.system",
        f"  would have run:  posix.system('{touch}')",
        "  nothing from the file was run",
    ]


def test_unreadable_file_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    code, out, err = run(capsys, "inspect", str(path))
    assert (code, out) == (3, "")
    assert (
        err == f"smartload: unreadable: {path}: empty file (0 bytes). The download or save failed\n"
    )


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "inspect")[0] == 2
    assert run(capsys, "diff", "x.pth")[0] == 2  # no --model and no second file
    assert run(capsys, "--version")[1] == "smartload 0.1.0\n"
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "2 usage, 3 unreadable file, 4 hostile file: UNSAFE" in out
    assert "6 inspect: UNKNOWN, the file names globals smartload does not know" in out


def test_large_checkpoints_collapse_unless_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.pth"
    torch.save({f"blocks.{i}.attn.qkv.weight": torch.zeros(1, i + 1) for i in range(1200)}, path)
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0
    assert "  ... 1160 more groups (--all shows them)" in lines(out)
    assert len(lines(out)) == 3 + 1 + 30 + 1 + 10  # facts, header, rows, "...", rows
    code, out, _ = run(capsys, "inspect", str(path), "--all")
    assert len(lines(out)) == 3 + 1 + 1200


def test_scan_reports_nonfinite_and_all_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = dict(make_net(10).state_dict())
    sd["conv.weight"][0, 0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    sd["fc.bias"] = torch.zeros(10)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    code, out, _ = run(capsys, "inspect", str(path), "--scan", "--json")
    assert code == 0
    assert json.loads(out)["scan"] == {
        "tensors": 9,
        "nonfinite": {"conv.weight": {"nan": 1, "inf": 1}},
        "all_zero": ["bn.bias", "fc.bias"],  # BatchNorm's bias starts at zero
    }
    code, out, _ = run(capsys, "inspect", str(path), "--scan")
    assert lines(out)[-4:] == [
        "scan: 9 tensors read; 1 with NaN/Inf, 2 all zero",
        "  non-finite  conv.weight: 1 NaN, 1 Inf",
        "  all zero    bn.bias",
        "  all zero    fc.bias",
    ]


def test_diff_timm_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    path = tmp_path / "r18.pth.tar"
    torch.save({"state_dict": timm.create_model("resnet18").state_dict()}, path)
    code, out, _ = run(
        capsys, "diff", str(path), "--model", "timm:resnet18", "--num-classes", "10", "--json"
    )
    data = json.loads(out)
    assert code == 0
    assert data["adapter"] == "timm"
    assert data["summary"] == {
        "copy": 120, "slice": 0, "reinit-normal": 2, "skip": 0, "unused": 0,
        "reused_params": 11186132, "model_params": 11191262,
    }  # fmt: skip
    code, out, _ = run(capsys, "diff", str(path), "--model", "timm:resnet18", "--num-classes", "3",
                       "--class-map", "1,none,2", "--source-classes", "imagenet-1k")  # fmt: skip
    assert code == 0
    assert lines(out)[:3] == [
        f"plan for {path} (torch-zip, state dict: state_dict, adapter: timm)",
        "reused 11,187,158/11,187,671 parameters (99.9%) from r18.pth.tar: 120 copy, 2 slice",
        "head fc: 1000 → 3 classes, 2 taken from the checkpoint",
    ]


def test_diff_that_would_fail_exits_5_listing_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    code, out, err = run(capsys, "diff", str(path), "--model", "torchvision:resnet18:", "--json")
    assert code == 2 and "--model" in err  # a malformed name is a usage error
    code, out, err = run(capsys, "diff", str(path), "--model", "torchvision:resnet34", "--json")
    assert code == 0  # resnet34 keys are a superset: missing ones are skipped, none mismatch
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), path)
    code, out, err = run(capsys, "diff", str(path), "--model", "torchvision:resnet18", "--json")
    assert code == 5
    assert json.loads(out)["mismatches"] == [
        {"key": "fc.weight", "ckpt_shape": [5, 512], "model_shape": [1000, 512]},
        {"key": "fc.bias", "ckpt_shape": [5], "model_shape": [1000]},
    ]
    assert "smartload: incompatible: cannot load 2 key(s)" in err


def test_diff_detectron2_config_with_class_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("detectron2")
    from test_detectron2 import FASTER, make_model

    path = tmp_path / "model_final.pth"
    torch.save({"model": make_model(FASTER).state_dict(), "iteration": 1}, path)
    code, out, _ = run(capsys, "diff", str(path), "--model", f"d2:{FASTER}", "--num-classes", "3",
                       "--class-map", "person,car,dog", "--source-classes", "coco_2017_train", "--json")  # fmt: skip
    data = json.loads(out)
    assert code == 0
    assert [(h["name"], h["class_map"]) for h in data["heads"]] == [
        ("roi_heads.box_predictor.cls_score", [0, 2, 16]),
        ("roi_heads.box_predictor.bbox_pred", [0, 2, 16]),
    ]
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    assert json.loads(out)["heads"] == [
        {"key": "roi_heads.box_predictor.cls_score.weight", "rows": 81, "num_classes": 80,
         "kind": "detectron2 (background last)"}
    ]  # fmt: skip


def test_diff_two_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.pth", tmp_path / "b.safetensors"
    sd = make_net(10).state_dict()
    torch.save(sd, a)
    other = {k: v for k, v in make_net(5).state_dict().items() if not k.startswith("bn.running")}
    other["conv.weight"] = other["conv.weight"].half()
    other["extra"] = torch.zeros(1)
    save_file(other, str(b))
    code, out, _ = run(capsys, "diff", str(a), str(b), "--json")
    assert code == 1
    assert json.loads(out) == {
        "a": str(a), "b": str(b), "identical": False, "same": 4,
        "only_in_a": ["bn.running_mean", "bn.running_var"], "only_in_b": ["extra"],
        "shape_differs": {"fc.weight": [[10, 8], [5, 8]], "fc.bias": [[10], [5]]},
        "dtype_differs": {"conv.weight": ["float32", "float16"]}, "value_differs": {},
        "rename_hint": None,
    }  # fmt: skip


def test_diff_two_checkpoints_compares_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys of equal shape and dtype are compared by value (chunk by chunk; NaN meeting NaN is no
    difference); exit 0 only when the state dicts are identical, 1 otherwise."""
    import smartload._compare

    monkeypatch.setattr(smartload._compare, "CHUNK", 3)  # several chunks per tensor
    sd = make_net(10).state_dict()
    sd["fc.bias"] = torch.arange(10, dtype=torch.float32)
    sd["conv.bias"][5] = float("nan")
    a, b = tmp_path / "a.pth", tmp_path / "b.safetensors"
    torch.save({"state_dict": sd}, a)
    other = {k: v.clone() for k, v in sd.items()}
    other["fc.bias"][[1, 8]] += torch.tensor([0.5, -2.0])
    other["bn.num_batches_tracked"] += 3
    other["bn.weight"][7] = float("nan")
    save_file(other, str(b))
    code, out, _ = run(capsys, "diff", str(a), str(b))
    assert code == 1
    assert out.splitlines() == [
        f"{a}  vs  {b}",
        "6 keys alike, 3 of other values, 0 of another shape, 0 of another dtype, "
        "0 only in the first, 0 only in the second",
        "  value  bn.weight: 1 of 8 elements differ, max |a - b| nan",
        "  value  bn.num_batches_tracked: 1 of 1 elements differ, max |a - b| 3",
        "  value  fc.bias: 2 of 10 elements differ, max |a - b| 2",
    ]
    code, out, _ = run(capsys, "diff", str(a), str(b), "--json")
    assert code == 1
    assert json.loads(out)["value_differs"] == {
        "bn.weight": {"elements": 1, "numel": 8, "max_abs_diff": "nan"},
        "bn.num_batches_tracked": {"elements": 1, "numel": 1, "max_abs_diff": 3.0},
        "fc.bias": {"elements": 2, "numel": 10, "max_abs_diff": 2.0},
    }
    save_file(sd, str(b))
    code, out, _ = run(capsys, "diff", str(a), str(b))
    assert code == 0
    assert out.splitlines()[1] == (
        "9 keys alike, 0 of other values, 0 of another shape, 0 of another dtype, "
        "0 only in the first, 0 only in the second (identical)"
    )
    code, out, _ = run(capsys, "diff", "--help")
    assert "diff A B: 0 identical (same keys, shapes, dtypes and values), 1 they differ" in out


def test_human_output_has_no_trailing_whitespace(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """rich pads table cells to the column width; no line of the output keeps that padding."""
    import argparse

    path = tmp_path / "train.pth"
    torch.save({"model": make_net(3).state_dict(), "args": argparse.Namespace(lr=1)}, path)
    outputs = [
        run(capsys, "inspect", str(ckpt))[1],
        run(capsys, "inspect", str(path), "--scan")[1],
        run(capsys, "diff", str(ckpt), str(path))[1],
    ]
    for out in outputs:
        assert len(out.splitlines()) > 3
        assert [line for line in out.splitlines() if line != line.rstrip()] == []


def test_convert_to_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"a": base[1:3], "b": base.t(), "c": base, "h": torch.ones(3, dtype=torch.bfloat16)}
    src, out = tmp_path / "views.pth", tmp_path / "out.safetensors"
    torch.save({"model": sd, "epoch": 1}, src)
    code, stdout, _ = run(capsys, "convert", str(src), str(out), "--json")
    assert code == 0
    assert json.loads(stdout)["tensors"] == 4
    loaded = load_file(str(out))
    assert loaded.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype, key
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "source": "views.pth", "state_dict_path": "model",
                                "converted_by": "smartload 0.1.0"}  # fmt: skip


def test_convert_refuses_what_load_refuses(
    tmp_path: Path, touch: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.safetensors"
    hostile = reduce_in_torch_zip(tmp_path, touch)
    assert run(capsys, "convert", str(hostile), str(out))[0] == 4
    sd = make_net(10).state_dict()
    sd["fc.bias"][0] = float("nan")
    broken = tmp_path / "nan.pth"
    torch.save(sd, broken)
    code, _, err = run(capsys, "convert", str(broken), str(out))
    assert code == 3 and "non-finite values in 1 tensor(s): fc.bias" in err
    assert not out.exists() and list(tmp_path.glob(".smartload-*")) == []
    assert run(capsys, "convert", str(broken), str(out), "--allow-nonfinite")[0] == 0
    assert np.isnan(load_file(str(out))["fc.bias"][0].item())


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
    assert "\x1b[" not in same.stdout  # no colours when piped


def test_text_from_the_file_is_never_read_as_markup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    path = tmp_path / "train.pth"
    torch.save({"state_dict": {"[bold]w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, path)
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0
    assert "args        argparse.Namespace [inert, not executed]" in lines(out)
    assert any(line.startswith("  [bold]w") for line in lines(out))


def test_float8_files_scan_and_convert_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch has no isnan/isfinite for float8 on the CPU: the scan and convert upcast."""
    path = tmp_path / "f8.pth"
    nan = torch.tensor([float("nan"), 1.0]).to(torch.float8_e5m2)
    torch.save({"a": torch.ones(4).to(torch.float8_e4m3fn), "b": nan}, path)
    assert main(["inspect", str(path), "--scan"]) == 0
    assert "  non-finite  b: 1 NaN, 0 Inf" in capsys.readouterr().out
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 3
    assert "non-finite" in capsys.readouterr().err


def test_an_output_folder_that_does_not_exist_is_unreadable_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(make_net().state_dict(), path)
    assert main(["convert", str(path), str(tmp_path / "missing" / "out.safetensors")]) == 3
    assert "smartload: unreadable:" in capsys.readouterr().err
