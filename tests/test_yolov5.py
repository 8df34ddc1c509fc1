"""The original YOLOv5 (the ``yolov5`` package, which packages ultralytics/yolov5): real models from
its own model yamls, checkpoints saved the way its ``train.py`` saves them (whole-model pickles in
half precision beside optimizer state and ``opt``), loaded without running the file."""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import os
import sys
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# yolov5 (and ultralytics, which it imports) write settings on import: keep them out of $HOME
os.environ.setdefault("YOLOV5_CONFIG_DIR", tempfile.mkdtemp(prefix="smartload-yolov5-"))
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="smartload-yolo-"))

import pytest
import torch
import yaml
from conftest import assert_same_tensors, assert_unchanged, snapshot

import smartload
from smartload._replaced import module_notes
from smartload.adapters.yolov5 import build_model, find_config, new_class_bias

YOLOV5 = Path(str(importlib.util.find_spec("yolov5").origin)).parent  # type: ignore[union-attr]
COCO = [yaml.safe_load((YOLOV5 / "data/coco.yaml").read_text())["names"][i] for i in range(80)]
NEW = ["person", "car", "unicorn"]  # COCO 0, COCO 2, a class of its own


def build(cfg: str, nc: int, seed: int) -> Any:
    """A fresh copy of the model (built once: yolov5 profiles every model it builds)."""
    return copy.deepcopy(_built(cfg, nc, seed))


@functools.cache
def _built(cfg: str, nc: int, seed: int) -> Any:
    torch.manual_seed(seed)
    model = build_model(cfg, nc)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so copies are visible
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    return model


def save_like_train(model: Any, names: list[str], folder: Path, *, last: bool = False) -> Path:
    """``best.pt`` as yolov5's ``strip_optimizer`` leaves it (the EMA model in half precision,
    no optimizer); with ``last``, ``last.pt`` as its ``train.py`` writes it."""
    model.names = dict(enumerate(names))
    ckpt = {
        "epoch": -1, "best_fitness": None, "model": copy.deepcopy(model).half(), "ema": None,
        "updates": None, "optimizer": None, "opt": {"weights": "yolov5s.pt", "epochs": 4},
        "git": {"branch": "master"}, "date": "2024-11-05T10:00:00",
    }  # fmt: skip
    for p in ckpt["model"].parameters():
        p.requires_grad = False
    if last:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()  # momentum buffers in the optimizer state
        ckpt.update(
            epoch=3, best_fitness=0.5, model=copy.deepcopy(model).half(),
            ema=copy.deepcopy(model).half(), updates=120, optimizer=optimizer.state_dict(),
        )  # fmt: skip
    path = folder / ("last.pt" if last else "best.pt")
    torch.save(ckpt, path)
    return path


def checkpoint_weights(model: Any) -> dict[str, torch.Tensor]:
    """What the checkpoint holds: the model's weights through half precision."""
    return {
        k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()
    }


@pytest.fixture(scope="module")
def yolov5s(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """``best.pt`` of a COCO yolov5s, and its weights."""
    source = build("yolov5s.yaml", 80, seed=1)
    best = save_like_train(source, COCO, tmp_path_factory.mktemp("yolov5s"))
    return best, checkpoint_weights(source)


def assert_anchor_blocks(
    got: torch.Tensor,
    saved: torch.Tensor,
    kept: dict[int, int],
    old_k: int,
    new_k: int,
    extra: int = 0,
) -> None:
    """Per anchor: the 4 box rows and the objectness row, the classes of ``kept`` (new class →
    old class) and the ``extra`` rows after the classes (mask coefficients) are the
    checkpoint's rows of that anchor."""
    old_no, new_no = 5 + old_k + extra, 5 + new_k + extra
    assert got.shape[0] == 3 * new_no and saved.shape[0] == 3 * old_no
    for a in range(3):
        new, old = got[a * new_no : (a + 1) * new_no], saved[a * old_no : (a + 1) * old_no]
        assert torch.equal(new[:5], old[:5]), f"anchor {a}: box and objectness rows"
        for k, o in kept.items():
            assert torch.equal(new[5 + k], old[5 + o]), f"anchor {a}: class {k} ← {o}"
        assert torch.equal(new[5 + new_k :], old[5 + old_k :]), f"anchor {a}: mask rows"


def test_yolov5s_into_the_transformer_model_with_3_classes(
    yolov5s: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """The founding case: a yolov5s checkpoint into ``yolov5s-transformer.yaml`` (C3 → C3TR at
    layer 8) with 3 classes. Everything that matches is copied exactly, the transformer keeps its
    initialisation, the anchor head keeps box and objectness rows and the classes found by name,
    and the new class starts as yolov5 starts it."""
    best, saved = yolov5s
    target = build("models/hub/yolov5s-transformer.yaml", 3, seed=2)
    before = snapshot(target)

    report = smartload.load(target, best, target_classes=NEW)

    assert report.adapter == "yolov5" and report.state_dict_path == ("model",)
    counts = {k: v for k, v in report.summary.items() if not k.endswith("_params")}
    assert counts == {"copy": 331, "slice": 6, "reinit-normal": 0, "skip": 11, "unused": 12}
    assert [(h.name, h.old_classes, h.new_classes, h.class_map) for h in report.heads] == [
        (f"model.24.m.{i}", 80, 3, (0, 2, None)) for i in range(3)
    ]
    assert "checkpoint class names (80) read from the pickled model's names attribute" in (
        report.notes
    )
    got = target.state_dict()
    for e in report.entries:
        if e.action == "copy":  # backbone, neck, anchors: bit-exact from float16
            assert torch.equal(got[e.key], saved[e.key]), e.key
    skipped = {e.key for e in report.entries if e.action == "skip"}
    assert skipped == {k for k in got if k.startswith("model.8.m.")}
    assert {e.reason for e in report.entries if e.action == "skip"} == {"missing"}
    for key in skipped:  # the transformer block keeps its initialisation
        assert torch.equal(got[key], before[key]), key
    assert set(report.unused) == {k for k in saved if k.startswith("model.8.m.0.")}
    for i, stride in enumerate((8, 16, 32)):
        for part in ("weight", "bias"):
            key = f"model.24.m.{i}.{part}"
            assert_anchor_blocks(got[key], saved[key], {0: 0, 1: 2}, 80, 3)
        bias, weight = got[f"model.24.m.{i}.bias"], got[f"model.24.m.{i}.weight"]
        for a in range(3):  # the new class: yolov5's class bias, fresh weights
            assert bias[a * 8 + 7].item() == pytest.approx(math.log(0.6 / (3 - 0.99999)))
            assert not torch.equal(weight[a * 8 + 7], before[f"model.24.m.{i}.weight"][a * 8 + 7])
        entry = next(e for e in report.entries if e.key == f"model.24.m.{i}.bias")
        assert entry.reason.startswith(f"head model.24.m.{i}: 80 → 3 classes, 21 of 24 rows kept")
        assert stride == int(target.model[24].stride[i])
    target.eval()
    with torch.no_grad():
        assert target(torch.zeros(1, 3, 64, 64))[0].shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 8)


def test_without_a_class_map_the_boxes_are_kept_and_the_class_rows_are_new(
    yolov5s: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """No class names for the new classes: per anchor, the box and objectness rows still come
    from the checkpoint (the same anchors, the same strides); only the class rows start fresh,
    as yolov5 starts them."""
    best, saved = yolov5s
    target = build("yolov5s.yaml", 3, seed=2)

    report = smartload.load(target, best, num_classes=3)

    assert report.summary["slice"] == 6 and report.summary["reinit-normal"] == 0
    assert [(h.name, h.class_map) for h in report.heads] == [
        (f"model.24.m.{i}", None) for i in range(3)
    ]
    got = target.state_dict()
    for i in range(3):
        for part in ("weight", "bias"):
            key = f"model.24.m.{i}.{part}"
            assert_anchor_blocks(got[key], saved[key], {}, 80, 3)
        bias = got[f"model.24.m.{i}.bias"].view(3, 8)
        assert bias[:, 5:].flatten().tolist() == pytest.approx([new_class_bias(3)] * 9)
        entry = next(e for e in report.entries if e.key == f"model.24.m.{i}.bias")
        assert entry.reason == (
            f"head model.24.m.{i}: 80 → 3 classes, 15 of 24 rows kept "
            "(no class map: the class rows are new)"
        )


def test_inspect_names_the_anchor_head_and_its_class_count(
    yolov5s: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    best, _ = yolov5s
    assert [vars(h) for h in smartload.inspect(best).heads] == [
        {"key": "model.24.m.0.weight", "rows": 255, "num_classes": 80,
         "kind": "yolov5 Detect (3 anchors)"},
    ]  # fmt: skip


def test_the_replaced_module_is_said_in_one_line(
    yolov5s: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """Which module was replaced (C3 → C3TR), with what, and how many parameters start fresh:
    one line, from the plan and the checkpoint's module tree (recorded, never imported)."""
    best, _ = yolov5s
    target = build("models/hub/yolov5s-transformer.yaml", 3, seed=2)
    plan = smartload.diff(target, best, num_classes=3)
    tree = smartload.inspect(best).module_tree

    fresh = sum(p.numel() for p in target.model[8].m.parameters())
    assert module_notes(target, plan.entries, plan.unused, tree) == [
        f"model.8 is C3TR here, C3 in the checkpoint: model.8.m (TransformerBlock, 11 tensors, "
        f"{fresh:,} parameters) keeps its initialisation; the checkpoint's model.8.m "
        "(Sequential of Bottleneck, 12 tensors) is unused"
    ]
    assert fresh == 656_640
    # from a plain state dict (no module tree), the same without the class names
    assert module_notes(target, plan.entries, plan.unused) == [
        "model.8.m (TransformerBlock, 11 tensors, 656,640 parameters) keeps its initialisation; "
        "the checkpoint's model.8.m (12 tensors) is unused"
    ]


def test_new_class_rows_start_as_yolov5_initialize_biases(
    yolov5s: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """The class bias is what yolov5's own ``_initialize_biases`` adds to a zero bias."""
    best, _ = yolov5s
    target = build("yolov5s.yaml", 3, seed=2)
    reference = build("yolov5s.yaml", 3, seed=3)
    with torch.no_grad():
        for conv in reference.model[24].m:
            conv.bias.zero_()
    reference._initialize_biases()

    smartload.load(target, best, target_classes=["unicorn", "person", "dragon"])

    for i in range(3):
        ours = target.model[24].m[i].bias.view(3, 8)
        theirs = reference.model[24].m[i].bias.view(3, 8)
        assert torch.equal(ours[:, [5, 7]], theirs[:, [5, 7]])
        assert ours[0, 5].item() == pytest.approx(new_class_bias(3))


def test_a_nan_checkpoint_is_refused_before_loading(tmp_path: Path) -> None:
    """A diverged run (NaN weights) is refused with the key named and nothing loaded; the user
    may still load it knowingly."""
    source = build("yolov5s.yaml", 80, seed=1)
    with torch.no_grad():
        source.model[6].m[0].cv2.conv.weight[0, 0, 1, 1] = float("nan")
    best = save_like_train(source, COCO, tmp_path)
    target = build("models/hub/yolov5s-transformer.yaml", 3, seed=2)
    before = snapshot(target)

    with pytest.raises(smartload.CheckpointFormatError) as caught:
        smartload.load(target, best, target_classes=NEW)

    assert "non-finite values in 1 tensor(s): model.6.m.0.cv2.conv.weight (1 NaN)" in str(
        caught.value
    )
    assert "on_nonfinite='allow'" in str(caught.value)
    assert_unchanged(target, before)
    report = smartload.load(target, best, target_classes=NEW, on_nonfinite="allow")
    assert torch.isnan(target.model[6].m[0].cv2.conv.weight[0, 0, 1, 1])
    assert report.summary["slice"] == 6


def test_a_wrong_class_count_loads_nothing(yolov5s: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """num_classes that is not the model's, or a class map of the wrong length: an error, and
    the model is unchanged."""
    best, _ = yolov5s
    target = build("yolov5s.yaml", 3, seed=2)
    before = snapshot(target)

    with pytest.raises(smartload.IncompatibleCheckpointError, match="model's head has 3 classes"):
        smartload.load(target, best, num_classes=5)
    with pytest.raises(smartload.InvalidArgumentError, match="class_map has 2 entries"):
        smartload.load(target, best, class_map=["person", "car"])
    with pytest.raises(smartload.InvalidArgumentError, match="not one of the checkpoint's"):
        smartload.load(target, best, class_map=["person", "car", "unicorn"])

    assert_unchanged(target, before)


def test_segment_head_keeps_mask_rows_and_proto(tmp_path: Path) -> None:
    """``Segment``: per anchor 5 + K + 32 rows; the mask-coefficient rows after the classes are
    kept like the box rows, and the proto branch is copied. Its ``self.detect = Detect.forward``
    (``getattr(Detect, "forward")`` at torch.save's protocol 2) is a method reference: UNKNOWN,
    as yolov5's classes are, and an inert record when loading."""
    source = build("yolov5n-seg.yaml", 80, seed=1)
    best = save_like_train(source, COCO, tmp_path)
    saved = checkpoint_weights(source)
    target = build("yolov5n-seg.yaml", 3, seed=2)

    info = smartload.inspect(best)
    assert info.verdict == "UNKNOWN"
    assert "yolov5.models.yolo.Detect.forward" in info.unknown_globals
    assert "builtins.getattr" not in info.globals
    assert [vars(h) for h in info.heads] == [
        {"key": "model.24.m.0.weight", "rows": 3 * (5 + 80 + 32), "num_classes": 80,
         "kind": "yolov5 Segment (3 anchors)"},
    ]  # fmt: skip
    report = smartload.load(target, best, target_classes=["dog", "unicorn", "person"])

    assert [(h.name, h.class_map) for h in report.heads] == [
        (f"model.24.m.{i}", (16, None, 0)) for i in range(3)
    ]
    got = target.state_dict()
    for i in range(3):
        for part in ("weight", "bias"):
            key = f"model.24.m.{i}.{part}"
            assert_anchor_blocks(got[key], saved[key], {0: 16, 2: 0}, 80, 3, extra=32)
    proto = [k for k in got if k.startswith("model.24.proto.")]
    assert proto and all(torch.equal(got[k], saved[k]) for k in proto)
    assert report.summary["slice"] == 6 and report.summary["skip"] == 0


def test_classification_model_head_sliced(tmp_path: Path) -> None:
    """yolov5's classification model (``Classify`` at the cut, ``model.9.linear``), saved as
    ``classify/train.py`` saves it."""
    source = build("yolov5n-cls.yaml", 10, seed=1)
    source.names = {i: f"c{i}" for i in range(10)}
    torch.save({"epoch": 9, "model": copy.deepcopy(source).half(), "ema": None}, tmp_path / "b.pt")
    saved = checkpoint_weights(source)
    target = build("yolov5n-cls.yaml", 3, seed=2)

    report = smartload.load(target, tmp_path / "b.pt", target_classes=["c9", "c0", "new"])

    assert [(h.name, h.old_classes, h.new_classes, h.class_map) for h in report.heads] == [
        ("model.9.linear", 10, 3, (9, 0, None))
    ]
    linear = target.model[9].linear
    assert torch.equal(linear.weight[:2], saved["model.9.linear.weight"][[9, 0]])
    assert torch.equal(linear.bias[:2], saved["model.9.linear.bias"][[9, 0]])
    assert linear.bias[2].item() == 0.0
    assert report.summary["copy"] == len(saved) - 2


@contextmanager
def pickled_as_the_repository() -> Iterator[None]:
    """yolov5's classes named as a clone of the repository names them (``models.yolo.Detect``),
    the way real ``yolov5s.pt`` files were pickled."""
    import yolov5.models.common as common
    import yolov5.models.yolo as yolo

    classes = {  # by identity: the module also names a class twice (Model = DetectionModel)
        c: c.__module__
        for m in (yolo, common)
        for c in vars(m).values()
        if isinstance(c, type) and c.__module__ == m.__name__
    }
    aliases = {"models": types.ModuleType("models"), "models.yolo": yolo, "models.common": common}
    saved = {name: sys.modules.get(name) for name in aliases}
    for c in classes:
        c.__module__ = c.__module__.removeprefix("yolov5.")
    sys.modules.update(aliases)
    try:
        yield
    finally:
        for c, module in classes.items():
            c.__module__ = module
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_a_checkpoint_and_model_from_a_clone_of_the_repository(tmp_path: Path) -> None:
    """Classes named ``models.yolo.*`` (a clone of the repository, not the package): read
    without importing them, and such a model is served by the same adapter."""
    source = build("yolov5n.yaml", 80, seed=1)
    with pickled_as_the_repository():
        best = save_like_train(source, COCO, tmp_path)
        target = build("yolov5n.yaml", 3, seed=2)
        assert type(target).__module__ == "models.yolo"
        report = smartload.load(target, best, target_classes=NEW)

    info = smartload.inspect(best)
    assert info.module_tree is not None
    assert info.module_tree.root.qualname == "models.yolo.DetectionModel"
    assert "models.yolo.Detect" in info.module_tree.classes
    assert report.adapter == "yolov5"
    assert [h.class_map for h in report.heads] == [(0, 2, None)] * 3
    assert report.summary["copy"] == 343 and report.summary["slice"] == 6


def test_training_checkpoint_loads_the_raw_model_or_the_ema(tmp_path: Path) -> None:
    """``last.pt`` holds the model and its EMA: ``model`` by default (as ``train.py
    --weights last.pt`` takes it), ``ema=True`` for the EMA."""
    source = build("yolov5n.yaml", 80, seed=1)
    last = save_like_train(source, COCO, tmp_path, last=True)
    target = build("yolov5n.yaml", 80, seed=2)

    report = smartload.load(target, last)
    assert report.state_dict_path == ("model",) and report.summary["copy"] == 349
    assert_same_tensors(target.state_dict(), checkpoint_weights(source))
    report = smartload.load(target, last, ema=True)
    assert report.state_dict_path == ("ema",)
    assert {"optimizer", "opt", "git", "date", "epoch"} <= set(report.extras)


def test_build_model_finds_the_package_configs() -> None:
    """``--model yolov5:CONFIG`` takes a path in the package, a bare name, or a file; the model
    class follows the yaml's head (or the ``-cls`` name)."""
    path = YOLOV5 / "models/hub/yolov5s-transformer.yaml"
    for given in ("models/hub/yolov5s-transformer.yaml", "yolov5s-transformer.yaml", str(path)):
        assert find_config(given) == path
    model = build_model("yolov5s-transformer.yaml", 3)
    assert type(model).__name__ == "DetectionModel" and model.model[24].nc == 3
    assert type(model.model[8]).__name__ == "C3TR"
    assert type(build("yolov5n-seg.yaml", 3, seed=2)).__name__ == "SegmentationModel"
    assert type(build("yolov5n-cls.yaml", 3, seed=2)).__name__ == "ClassificationModel"
    with pytest.raises(smartload.InvalidArgumentError) as missing:
        build_model("yolov9.yaml")
    assert str(missing.value).startswith(
        "yolov9.yaml: no such file, nor a YOLOv5 model yaml of that name; give the path of a "
        "model yaml, or one of: anchors.yaml, "
    )
    assert "yolov5s.yaml" in str(missing.value)
    for not_a_config in ("*.yaml", "hub", ""):  # names, not glob patterns; files, not folders
        with pytest.raises(smartload.InvalidArgumentError, match="no such file, nor a YOLOv5"):
            find_config(not_a_config)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("nc: 3\n", ": not a YOLOv5 model yaml: it needs a head"),
        ("head: 3\n", ": not a YOLOv5 model yaml: it needs a head"),
        ("head: []\n", ": not a YOLOv5 model yaml: it needs a head"),
        ("head: [[-1, 1]]\n", ": not a YOLOv5 model yaml: it needs a head"),
        ("head: [[-1, 1, 7, []]]\n", ": not a YOLOv5 model yaml: it needs a head"),
        ("head: [[-1, 1, {x: 1}, []]]\n", ": not a YOLOv5 model yaml: it needs a head"),
        ("nc: [\n", ": not read as a YOLOv5 model yaml (while parsing a flow node expected"),
        ("[" * 100_000, ": not read as a YOLOv5 model yaml (maximum recursion depth exceeded"),
        ("nc: 3\nhead: [[-1, 1, Detect, [nc]]]\n", ": yolov5 cannot build a model of this yaml"),
    ],
)
def test_a_malformed_config_is_an_invalid_argument(tmp_path: Path, text: str, problem: str) -> None:
    """A yaml that is not a YOLOv5 model's (no head, a malformed last layer, unparseable,
    nested 100,000 deep, missing what yolov5 needs) is refused naming the file and what to give,
    as :class:`InvalidArgumentError`, never as yolov5's or yaml's own error."""
    path = tmp_path / "model.yaml"
    path.write_text(text)
    with pytest.raises(smartload.InvalidArgumentError) as refused:
        build_model(str(path), 3)
    message = str(refused.value)
    assert message.startswith(f"{path}{problem}")
    assert message.endswith("give a model yaml such as yolov5s.yaml, or the path of one")
