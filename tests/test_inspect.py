"""``smartload.inspect``: which keys it calls class heads, which globals it calls inert."""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import pytest
import torch

import smartload
from smartload._hostile import is_plain_data
from smartload.cli import main


def test_one_output_layers_are_not_class_heads(tmp_path: Path) -> None:
    """A 1-row `fc`/`head` regresses a value: no head guess; a 2-row detectron2 box classifier
    (one class and the background) and a 2-row classifier still are heads."""
    path = tmp_path / "heads.pth"
    torch.save(
        {
            "fc.weight": torch.zeros(1, 8),
            "fc.bias": torch.zeros(1),
            "head.weight": torch.zeros(1, 16),
            "aux.classifier.weight": torch.zeros(2, 8),
            "roi_heads.box_predictor.cls_score.weight": torch.zeros(2, 4),
        },
        path,
    )
    info = smartload.inspect(path)
    assert [(h.key, h.rows, h.num_classes, h.kind) for h in info.heads] == [
        ("aux.classifier.weight", 2, 2, "classifier"),
        ("roi_heads.box_predictor.cls_score.weight", 2, 1, "detectron2 (background last)"),
    ]


def test_plain_builtins_are_data_not_inert_globals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`builtins.set/int/slice/...` name the pickle's own kinds of data: only real classes
    (`collections.defaultdict`, `argparse.Namespace`) are listed as inert stand-ins."""
    path = tmp_path / "train.pth"
    torch.save(
        {
            "state_dict": {"w": torch.zeros(2)},
            "counts": collections.defaultdict(int, a=1),
            "tags": {1, 2},
            "frozen": frozenset([3]),
            "window": slice(1, 2),
            "steps": range(3),
            "z": complex(1, 2),
            "raw": bytearray(b"x"),
            "args": argparse.Namespace(lr=1),
        },
        path,
    )
    info = smartload.inspect(path)
    builtins = {g for g in info.globals if g.startswith("builtins.")}
    assert builtins == {
        "builtins.int", "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.range",
        "builtins.complex", "builtins.bytearray",
    }  # fmt: skip
    assert info.inert_globals == ("collections.defaultdict", "argparse.Namespace")
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inert_globals"] == ["collections.defaultdict", "argparse.Namespace"]


@pytest.mark.parametrize(
    ("qualname", "plain"),
    [
        ("builtins.dict", True),
        ("builtins.object", True),
        ("__builtin__.set", True),
        ("__builtin__.unicode", True),
        ("builtins.eval", False),
        ("builtins.getattr", False),
        ("collections.OrderedDict", False),
        ("mybuiltins.dict", False),
    ],
)
def test_is_plain_data(qualname: str, plain: bool) -> None:
    assert is_plain_data(qualname) is plain


def test_the_unknown_verdict_names_at_most_eight_globals() -> None:
    """The verdict line stays one line; the JSON and ``unknown_globals`` keep every name."""
    from smartload._inspect import CheckpointInfo

    names = tuple(f"zoo.C{i}" for i in range(10))
    info = CheckpointInfo("x.pth", "torch-zip", (), {}, unknown_globals=names)
    assert (info.verdict, info.to_dict()["unknown_globals"]) == ("UNKNOWN", list(names))
    assert info.verdict_reason == (
        "names 10 globals smartload does not know (zoo.C0, zoo.C1, zoo.C2, zoo.C3, zoo.C4, "
        "zoo.C5, zoo.C6, zoo.C7, ... 2 more); nothing was run; `torch.load` without "
        "weights_only would import them"
    )
    assert CheckpointInfo("y.pth", "safetensors", (), {}).verdict == "SAFE"
