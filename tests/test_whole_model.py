"""Whole-model pickles (``torch.save(model)``): weights extracted without the model's code.

The models' classes live in a module written for the test, imported once to build and save the
model, then removed from ``sys.modules`` and ``sys.path`` and deleted: loading must not need it, and
the module's sentinel (written on import and on ``__setstate__``) proves none of its code ran.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import assert_same_tensors, assert_unchanged, snapshot
from torch import nn

import smartload
from smartload import InvalidArgumentError
from smartload.cli import main

ZOO = textwrap.dedent(
    """
    import os

    import torch
    from torch import nn

    def mark(what):
        with open(os.environ["SMARTLOAD_TEST_SENTINEL"], "a") as f:
            f.write(f"{__name__}: {what}\\n")

    mark("imported")

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(c)
            self.act = nn.SiLU()
            self.register_buffer("scale", torch.full((c,), 2.0))
            self.register_buffer("cache", torch.zeros(3), persistent=False)

        def __setstate__(self, state):
            mark("setstate")
            super().__setstate__(state)

    class ZooNet(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3)
            self.blocks = nn.Sequential(Block(8), Block(8))
            self.heads = nn.ModuleList([nn.Linear(8, 4), nn.Linear(8, num_classes)])  # classifier last
            self.shared = self.blocks[0]  # one module under two names: state_dict lists both
            self.names = {i: f"class{i}" for i in range(num_classes)}
            self.note = "built by the test zoo"
    """
)


def _import(folder: Path, name: str) -> ModuleType:
    (folder / f"{name}.py").write_text(ZOO)
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


@pytest.fixture
def zoo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ModuleType, ModuleType, Path]]:
    """(the saving module, removed once the test has saved with it; a twin to load into; sentinel)."""
    sentinel = tmp_path / "sentinel.txt"
    monkeypatch.setenv("SMARTLOAD_TEST_SENTINEL", str(sentinel))
    saving, twin = _import(tmp_path, "sl_zoo_saving"), _import(tmp_path, "sl_zoo_twin")
    yield saving, twin, sentinel
    for name in ("sl_zoo_saving", "sl_zoo_twin"):
        sys.modules.pop(name, None)


def _forget(module: ModuleType, sentinel: Path) -> None:
    """The saving module's code is gone: not importable, not imported, its file deleted."""
    sys.modules.pop(module.__name__)
    Path(module.__file__ or "").unlink()
    sentinel.unlink()


def _built(cls: type[nn.Module], num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(num_classes)
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.uniform_(1, 2)
            else:
                buf.fill_(seed)
    return model.eval()


@pytest.mark.parametrize("layout", ["torch.save(model)", '{"model": model.half()}'])
def test_weights_come_out_exactly_without_the_models_code(
    zoo: tuple[ModuleType, ModuleType, Path], tmp_path: Path, layout: str
) -> None:
    saving, twin, sentinel = zoo
    source = _built(saving.ZooNet, 5, seed=1)
    path = tmp_path / "model.pt"
    if layout == "torch.save(model)":
        torch.save(source, path)
        expected = source.state_dict()
    else:
        torch.save({"model": source.half(), "epoch": 7}, path)
        expected = {
            k: v.float() if v.is_floating_point() else v for k, v in source.state_dict().items()
        }
    target = _built(twin.ZooNet, 5, seed=2)
    _forget(saving, sentinel)

    report = smartload.load(target, path)

    assert not sentinel.exists(), sentinel.read_text()  # nothing imported, no __setstate__
    assert "sl_zoo_saving" not in sys.modules
    got = target.state_dict()
    assert list(got) == list(expected)  # same keys, same order, shared module listed twice
    assert "blocks.0.cache" not in got and "shared.conv.weight" in got
    assert_same_tensors(got, expected)
    assert report.summary["copy"] == len(expected) == 27
    assert report.state_dict_path == (() if layout == "torch.save(model)" else ("model",))
    assert report.notes[-1] == (
        "weights extracted from a pickled sl_zoo_saving.ZooNet (14 modules): no class of it was "
        "imported and nothing in the file was executed"
    )
    assert "sl_zoo_saving.Block" in report.inert_globals
    if layout != "torch.save(model)":  # same-shape copies with an exact cast: a row per module
        rows = re.findall(r"\n  copy +blocks\.\* +(.*)", str(report))
        assert rows == [
            "2 tensor(s), same shape",
            "12 tensor(s), same shape, cast float16 → float32 (exact)",
        ]


def test_class_names_come_from_the_pickled_model(
    zoo: tuple[ModuleType, ModuleType, Path], tmp_path: Path
) -> None:
    saving, twin, sentinel = zoo
    source = _built(saving.ZooNet, 5, seed=1)
    path = tmp_path / "model.pt"
    torch.save(source, path)
    target = _built(twin.ZooNet, 3, seed=2)
    before = snapshot(target)
    _forget(saving, sentinel)

    report = smartload.load(target, path, num_classes=3, target_classes=["class3", "new", "class0"])

    w, b = target.heads[1].weight, target.heads[1].bias
    assert torch.equal(w[0], source.heads[1].weight[3]) and torch.equal(
        w[2], source.heads[1].weight[0]
    )
    assert not torch.equal(w[1], before["heads.1.weight"][1])  # re-initialised, normal(0, 0.01)
    assert b[1].item() == 0.0
    assert report.heads[0].class_map == (3, None, 0)
    assert report.heads[0].unmatched == ("new",)
    assert (
        "checkpoint class names (5) read from the pickled model's names attribute" in report.notes
    )


def test_inspect_shows_the_module_tree_marked_not_executed(
    zoo: tuple[ModuleType, ModuleType, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saving, _, sentinel = zoo
    path = tmp_path / "model.pt"
    torch.save({"model": _built(saving.ZooNet, 5, seed=1), "date": "2026-11-25"}, path)
    _forget(saving, sentinel)

    assert main(["inspect", str(path), "--json"]) == 6  # UNKNOWN: classes torch.load would import
    data = json.loads(capsys.readouterr().out)
    tree = data["module_tree"]
    assert (data["verdict"], set(data["unknown_globals"])) == ("UNKNOWN", set(tree["classes"]))
    assert tree["executed"] is False
    assert tree["root"]["class"] == "sl_zoo_saving.ZooNet"
    assert tree["root"]["children"]["blocks"]["children"]["0"]["class"] == "sl_zoo_saving.Block"
    assert tree["modules"] == 14
    assert tree["classes"] == {
        "sl_zoo_saving.Block": 2, "torch.nn.modules.conv.Conv2d": 3,
        "torch.nn.modules.batchnorm.BatchNorm2d": 2, "torch.nn.modules.activation.SiLU": 2,
        "torch.nn.modules.linear.Linear": 2, "sl_zoo_saving.ZooNet": 1,
        "torch.nn.modules.container.Sequential": 1, "torch.nn.modules.container.ModuleList": 1,
    }  # fmt: skip
    assert tree["attributes"] == {"names": "dict with 5 entries", "note": "'built by the test zoo'"}
    assert tree["class_names"] == ["class0", "class1", "class2", "class3", "class4"]
    assert (data["state_dict_path"], data["num_tensors"], data["extras"]) == (
        ["model"],
        27,
        {"date": "'2026-11-25'"},
    )

    assert main(["inspect", str(path)]) == 6
    text = capsys.readouterr().out
    assert (
        "sl_zoo_saving.ZooNet, 14 modules (inert records: no class imported, nothing executed"
        in text
    )
    assert re.search(
        r"\n names \s+ 5 \ classes: \ class0, \ class1, \ class2, \ class3, \ class4", text, re.X
    )
    assert re.search(r"\n \s+ blocks: \ Sequential \ \[0 \ Block, \ 1 \ Block\]", text, re.X)
    assert not sentinel.exists()


def test_ema_only_training_checkpoint_asks_for_ema(
    zoo: tuple[ModuleType, ModuleType, Path], tmp_path: Path
) -> None:
    saving, twin, sentinel = zoo
    source = _built(saving.ZooNet, 5, seed=1)
    path = tmp_path / "last.pt"
    torch.save({"model": None, "ema": source, "updates": 3}, path)  # as YOLO's trainer saves
    target = _built(twin.ZooNet, 5, seed=2)
    before = snapshot(target)
    _forget(saving, sentinel)

    with pytest.raises(
        InvalidArgumentError, match=r"holds only EMA weights \(\['ema'\]\); pass ema=True"
    ):
        smartload.load(target, path)
    assert_unchanged(target, before)
    report = smartload.load(target, path, ema=True)
    assert report.ema and report.state_dict_path == ("ema",)
    assert torch.equal(target.state_dict()["stem.weight"], source.stem.weight)


def test_convert_writes_the_extracted_weights_as_safetensors(
    zoo: tuple[ModuleType, ModuleType, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    saving, _, sentinel = zoo
    source = _built(saving.ZooNet, 5, seed=1)
    path, out = tmp_path / "model.pt", tmp_path / "model.safetensors"
    torch.save(source, path)
    _forget(saving, sentinel)

    assert main(["convert", str(path), str(out)]) == 0
    assert_same_tensors(load_file(out), source.state_dict())


def test_module_records_outside_the_weights_stay_inert(tmp_path: Path) -> None:
    """A module-like record where no weights are looked for is described, never refused."""
    from pickle_asm import Build, Global, New, assemble, tensor, torch_zip

    odd = Build(New(Global("zoo", "Net")), (None, {"_parameters": {}}))  # tuple state
    data = assemble({"weights": {"w": tensor("0", 4, (2, 2), (2, 1))}, "optimizer": odd})
    path = torch_zip(tmp_path / "odd.pt", data, {"0": b"\x00" * 16})

    info = smartload.inspect(path)

    assert (info.state_dict_path, info.module_tree) == (("weights",), None)
    assert info.extras == {"optimizer": "zoo.Net module object [inert, not executed]"}
