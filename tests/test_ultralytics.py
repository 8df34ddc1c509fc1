"""Real YOLO checkpoints, built here from ultralytics' own model configs and saved the way its
trainer saves them (``last.pt``: the EMA model in half precision beside optimizer state and
``train_args``; ``best.pt``: ``strip_optimizer`` of it), loaded without running the file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from typing import Any

# ultralytics writes its settings file on import: keep it out of the user's home
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="smartload-yolo-"))

import pytest
import torch
from conftest import assert_same_tensors, assert_unchanged, snapshot
from safetensors.torch import load_file
from ultralytics import __version__ as ultralytics_version
from ultralytics.cfg import get_cfg
from ultralytics.nn.modules.utils import bias_init_with_prob
from ultralytics.nn.tasks import (
    ClassificationModel,
    DetectionModel,
    OBBModel,
    PoseModel,
    RTDETRDetectionModel,
    SegmentationModel,
    load_checkpoint,
)
from ultralytics.utils import ROOT, YAML
from ultralytics.utils.torch_utils import (
    convert_optimizer_state_dict_to_fp16,
    intersect_dicts,
    strip_optimizer,
)

import smartload
from smartload._replaced import module_notes

COCO = [YAML.load(ROOT / "cfg/datasets/coco.yaml")["names"][i] for i in range(80)]
MODELS = {
    "yolov8n.yaml": DetectionModel, "yolo11n.yaml": DetectionModel, "yolo26n.yaml": DetectionModel,
    "yolov5nu.yaml": DetectionModel, "yolo11n-seg.yaml": SegmentationModel,
    "yolo11n-pose.yaml": PoseModel, "yolo11n-cls.yaml": ClassificationModel,
    "yolov8s.yaml": DetectionModel, "yolo11s.yaml": DetectionModel,
    "yolov8n-seg.yaml": SegmentationModel, "yolo26n-seg.yaml": SegmentationModel,
    "yolo12n.yaml": DetectionModel, "yolo12n-pose.yaml": PoseModel,
    "yolo12n-seg.yaml": SegmentationModel, "yolo12n-obb.yaml": OBBModel,
    "yolo11n-obb.yaml": OBBModel, "rtdetr-l.yaml": RTDETRDetectionModel,
}  # fmt: skip


def build(cfg: str, nc: int, seed: int, ch: int = 3) -> Any:
    torch.manual_seed(seed)
    model = MODELS[cfg](cfg, ch=ch, nc=nc, verbose=False)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so copies are visible
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    return model


def save_like_trainer(model: Any, names: list[str], folder: Path) -> tuple[Path, Path]:
    """``last.pt`` as ``BaseTrainer.save_model`` writes it, and ``best.pt`` = ``strip_optimizer``."""
    model.names = dict(enumerate(names))
    model.args = get_cfg()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # momentum buffers in the optimizer state
    ema = deepcopy(model).eval().half()
    for p in ema.parameters():
        p.requires_grad_(False)
    last, best = folder / "last.pt", folder / "best.pt"
    torch.save(
        {
            "epoch": 0, "best_fitness": 0.5, "model": None, "ema": ema, "updates": 10,
            "optimizer": convert_optimizer_state_dict_to_fp16(deepcopy(optimizer.state_dict())),
            "scaler": None, "train_args": vars(get_cfg()), "train_metrics": {"fitness": 0.5},
            "train_results": {}, "date": datetime.now().isoformat(), "version": ultralytics_version,
            "license": "AGPL-3.0 (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com",
        },
        last,
    )  # fmt: skip
    strip_optimizer(last, best)
    return last, best


def save_best(model: Any, names: list[str], folder: Path) -> Path:
    """``best.pt`` as ``strip_optimizer`` leaves it, written directly (no ``last.pt`` first)."""
    model.names = dict(enumerate(names))
    model.args = get_cfg()
    ema = deepcopy(model).eval().half()
    for p in ema.parameters():
        p.requires_grad_(False)
    best = folder / "best.pt"
    torch.save(
        {
            "date": datetime.now().isoformat(), "version": ultralytics_version,
            "license": "AGPL-3.0 (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com",
            "epoch": -1, "model": ema, "train_args": vars(get_cfg()),
            "train_metrics": {"fitness": 0.5}, "train_results": {},
        },
        best,
    )  # fmt: skip
    return best


def checkpoint_weights(model: Any) -> dict[str, torch.Tensor]:
    """What the checkpoint holds: the model's weights through half precision."""
    return {
        k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()
    }


def check_report_against_tensors(
    report: smartload.LoadReport,
    target: Any,
    saved: dict[str, torch.Tensor],
    before: dict[str, torch.Tensor],
) -> None:
    got = target.state_dict()
    for e in report.entries:
        if e.action == "copy":
            assert torch.equal(got[e.key], saved[e.key]), e.key
        elif e.action == "skip":
            assert torch.equal(got[e.key], before[e.key]), e.key


def test_coco_nano_detector_into_3_classes_rebuilds_the_resized_class_branch(
    tmp_path: Path,
) -> None:
    source = build("yolov8n.yaml", 80, seed=1)
    _, best = save_like_trainer(source, COCO, tmp_path)
    saved = checkpoint_weights(source)
    target = build("yolov8n.yaml", 3, seed=2)
    before = snapshot(target)

    # nano: the class branch is max(64, min(nc, 100)) wide: 80 channels for COCO, 64 for 3 classes;
    # the plan is made with it rebuilt (as load does), and the model keeps its own modules
    branch = target.model[22].cv3
    plan = smartload.diff(target, best, target_classes=["person", "car", "dog"])
    counts = {k: v for k, v in plan.summary.items() if not k.endswith("_params")}
    assert counts == {"copy": 349, "slice": 6, "reinit-normal": 0, "skip": 0, "unused": 0}
    assert plan.notes[-1].startswith(
        "15 module(s) would be rebuilt (dry run) at the checkpoint's shapes by the ultralytics"
    )
    assert target.model[22].cv3 is branch
    assert_unchanged(target, before)

    # load rebuilds the branch at the checkpoint's width, as ultralytics' own load does
    report = smartload.load(target, best, target_classes=["person", "car", "dog"])

    assert report.adapter == "ultralytics"
    counts = {k: v for k, v in report.summary.items() if not k.endswith("_params")}
    assert counts == {"copy": 349, "slice": 6, "reinit-normal": 0, "skip": 0, "unused": 0}
    assert [(h.name, h.old_classes, h.new_classes, h.class_map) for h in report.heads] == [
        (f"model.22.cv3.{i}.2", 80, 3, (0, 2, 16)) for i in range(3)
    ]
    assert [seq[2].in_channels for seq in target.model[22].cv3] == [80, 80, 80]
    assert report.notes[-1] == (
        "15 module(s) rebuilt at the checkpoint's shapes by the ultralytics adapter, as the "
        "framework's own loading does: new objects, so build the optimizer after loading "
        "(model.22.cv3.0.0.bn, model.22.cv3.0.0.conv, model.22.cv3.0.1.bn, model.22.cv3.0.1.conv ...)"
    )
    check_report_against_tensors(report, target, saved, before)
    # the backbone and the box branch exactly, from float16
    assert torch.equal(target.model[0].conv.weight, saved["model.0.conv.weight"])
    assert torch.equal(target.model[22].cv2[2][2].bias, saved["model.22.cv2.2.2.bias"])
    assert (
        "checkpoint class names (80) read from the pickled model's names attribute" in report.notes
    )


@pytest.mark.parametrize("cfg", ["yolo11n-seg.yaml", "yolo26n.yaml", "yolov5nu.yaml"])
def test_class_rows_follow_the_class_names(cfg: str, tmp_path: Path) -> None:
    names = [f"class{i}" for i in range(20)]
    source = build(cfg, 20, seed=1)
    _, best = save_like_trainer(source, names, tmp_path)
    saved = checkpoint_weights(source)
    target = build(cfg, 3, seed=2)
    before = snapshot(target)

    report = smartload.load(target, best, target_classes=["class7", "unicorn", "class2"])

    head = target.model[-1]
    branches = ["cv3", "one2one_cv3"] if cfg == "yolo26n.yaml" else ["cv3"]
    prefix = f"model.{len(target.model) - 1}"
    assert [h.name for h in report.heads] == [
        f"{prefix}.{b}.{i}.2" for b in branches for i in range(3)
    ]
    assert {h.class_map for h in report.heads} == {(7, None, 2)}
    assert report.summary["slice"] == 2 * 3 * len(branches)
    assert report.summary["skip"] == report.summary["reinit-normal"] == 0
    for branch in branches:
        for level in range(3):
            key = f"{prefix}.{branch}.{level}.2"
            w, b = target.state_dict()[f"{key}.weight"], target.state_dict()[f"{key}.bias"]
            assert torch.equal(w[0], saved[f"{key}.weight"][7])
            assert torch.equal(w[2], saved[f"{key}.weight"][2])
            assert torch.equal(b[[0, 2]], saved[f"{key}.bias"][[7, 2]])
            # a new class starts as Detect.bias_init starts it
            stride = float(head.stride[level])
            assert b[1].item() == pytest.approx(math.log(5 / 3 / (640 / stride) ** 2))
            assert not torch.equal(w[1], before[f"{key}.weight"][1])
    check_report_against_tensors(report, target, saved, before)


def test_pose_model_same_classes_loads_exactly(tmp_path: Path) -> None:
    source = build("yolo11n-pose.yaml", 1, seed=1)
    _, best = save_like_trainer(source, ["person"], tmp_path)
    target = build("yolo11n-pose.yaml", 1, seed=2)

    report = smartload.load(target, best)

    assert report.summary["copy"] == len(target.state_dict()) == 541
    assert_same_tensors(target.state_dict(), checkpoint_weights(source))


def test_classifier_head_sliced_by_index(tmp_path: Path) -> None:
    source = build("yolo11n-cls.yaml", 10, seed=1)
    _, best = save_like_trainer(source, [f"c{i}" for i in range(10)], tmp_path)
    saved = checkpoint_weights(source)
    target = build("yolo11n-cls.yaml", 3, seed=2)

    report = smartload.load(target, best, num_classes=3, class_map=[9, 0, None])

    assert [(h.name, h.old_classes, h.new_classes) for h in report.heads] == [
        ("model.10.linear", 10, 3)
    ]
    assert torch.equal(target.model[10].linear.weight[:2], saved["model.10.linear.weight"][[9, 0]])
    assert target.model[10].linear.bias[2].item() == 0.0


def test_training_checkpoint_holds_only_ema_weights(tmp_path: Path) -> None:
    source = build("yolo11n.yaml", 80, seed=1)
    last, _ = save_like_trainer(source, COCO, tmp_path)
    target = build("yolo11n.yaml", 80, seed=2)

    with pytest.raises(smartload.InvalidArgumentError, match="pass ema=True"):
        smartload.load(target, last)
    report = smartload.load(target, last, ema=True)

    assert report.state_dict_path == ("ema",) and report.summary["copy"] == 499
    momentum = len(list(source.parameters()))  # one buffer per parameter in the SGD state
    assert (momentum, report.extras["optimizer"]) == (256, "dict with 2 entries, 256 tensors")
    assert_same_tensors(target.state_dict(), checkpoint_weights(source))


def test_inspect_and_convert_without_ultralytics(tmp_path: Path) -> None:
    source = build("yolov8n.yaml", 80, seed=1)
    _, best = save_like_trainer(source, COCO, tmp_path)
    out = tmp_path / "yolov8n.safetensors"
    script = (
        "import sys, json\n"
        "sys.modules['ultralytics'] = None  # not importable\n"
        "from smartload.cli import main\n"
        f"assert main(['convert', {str(best)!r}, {str(out)!r}]) == 0\n"
        f"code = main(['inspect', {str(best)!r}, '--json'])\n"
        "assert [m for m in sys.modules if m.startswith('ultralytics')] == ['ultralytics']\n"
        "assert sys.modules['ultralytics'] is None\n"
        "raise SystemExit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    from smartload.cli import EXIT_UNKNOWN

    # readable and nothing run, but the module classes are globals smartload does not know
    assert done.returncode == EXIT_UNKNOWN, done.stderr
    data = json.loads(done.stdout[done.stdout.index("{") :])
    assert data["safe"] is True and data["state_dict_path"] == ["model"]
    assert data["verdict"] == "UNKNOWN"
    assert "ultralytics.nn.modules.head.Detect" in data["unknown_globals"]
    assert data["module_tree"]["root"]["class"] == "ultralytics.nn.tasks.DetectionModel"
    assert data["module_tree"]["executed"] is False
    assert data["module_tree"]["class_names"] == COCO
    assert data["module_tree"]["classes"]["ultralytics.nn.modules.head.Detect"] == 1
    detect = data["module_tree"]["root"]["children"]["model"]["children"]["22"]
    assert detect["class"] == "ultralytics.nn.modules.head.Detect"
    assert detect["children"]["cv3"] == {
        "class": "torch.nn.modules.container.ModuleList",
        "num_children": 3,
    }
    assert data["heads"] == [
        {"key": "model.22.cv3.0.2.weight", "rows": 80, "num_classes": 80,
         "kind": "ultralytics Detect class branch"},
    ]  # fmt: skip
    assert {"train_args", "date", "version"} <= set(data["extras"])
    assert data["extras"]["version"] == repr(ultralytics_version)
    assert data["dtypes"] == {"float16": 298, "int64": 57}
    expected = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    assert_same_tensors(load_file(out), expected)


def test_cli_diff_builds_the_yolo_model_from_its_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from smartload.cli import main

    _, best = save_like_trainer(
        build("yolo11n.yaml", 20, seed=1), [f"class{i}" for i in range(20)], tmp_path
    )
    args = ["diff", str(best), "--model", "yolo:yolo11n.yaml", "--num-classes", "3"]

    assert main([*args, "--class-map", "class7,none,class2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)  # nothing but JSON on stdout
    assert plan["adapter"] == "ultralytics"
    assert [(h["name"], h["class_map"]) for h in plan["heads"]] == [
        (f"model.23.cv3.{i}.2", [7, None, 2]) for i in range(3)
    ]
    assert main(["diff", str(best), "--model", "yolo:yolo11n-cls.yaml", "--json"]) == 5


def test_the_yolo_wrapper_has_the_same_heads(tmp_path: Path) -> None:
    from ultralytics import YOLO

    source = build("yolov8n.yaml", 20, seed=1)
    _, best = save_like_trainer(source, [f"class{i}" for i in range(20)], tmp_path)
    saved = checkpoint_weights(source)
    wrapper = YOLO("yolov8n.yaml")
    wrapper.model = build("yolov8n.yaml", 3, seed=2)  # keys: model.model.*

    report = smartload.load(wrapper, best, target_classes=["class4", "class0", "class9"])

    assert [h.name for h in report.heads] == [f"model.model.22.cv3.{i}.2" for i in range(3)]
    assert report.summary["copy"] == 349 and report.summary["slice"] == 6
    weight = wrapper.model.model[22].cv3[1][2].weight
    assert torch.equal(weight, saved["model.22.cv3.1.2.weight"][[4, 0, 9]])


def test_a_policy_keeps_its_key_when_the_branch_is_rebuilt(tmp_path: Path) -> None:
    source = build("yolov8n.yaml", 80, seed=1)
    _, best = save_like_trainer(source, COCO, tmp_path)
    target = build("yolov8n.yaml", 3, seed=2)

    plan = smartload.diff(target, best, policies={"model.22.cv3.0.2.bias": "reinit-normal"})

    actions = {e.key: (e.action, e.reason) for e in plan.entries}
    assert actions["model.22.cv3.0.2.bias"] == ("reinit-normal", "policy 'model.22.cv3.0.2.bias'")
    assert actions["model.22.cv3.1.2.bias"] == (
        "reinit-normal",
        "head model.22.cv3.1.2: 80 → 3 classes, no class map",
    )
    assert actions["model.22.cv3.1.1.conv.weight"][0] == "copy"  # the branch at COCO's width
    assert plan.notes[-1].startswith("15 module(s) would be rebuilt (dry run)")


# (config, tensors ultralytics' own load copies whole, class-count layers): COCO into 3 classes
LIKE_ULTRALYTICS = [
    ("yolov8n.yaml", 349, 3), ("yolov8s.yaml", 349, 3), ("yolo11n.yaml", 493, 3),
    ("yolo11s.yaml", 493, 3), ("yolov5nu.yaml", 421, 3), ("yolov8n-seg.yaml", 411, 3),
    ("yolo11n-pose.yaml", 535, 3), ("yolo11n-cls.yaml", 234, 1),
    ("yolo26n-seg.yaml", 830, 7),  # end-to-end: one2one_cv3 too; and proto.semseg
]  # fmt: skip
NEW = ["person", "car", "unicorn"]


Coco = Callable[[str], tuple[Path, dict[str, torch.Tensor]]]


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Coco:
    """``best.pt`` of an 80-class COCO model, and its weights, made once per config."""
    made: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}

    def get(cfg: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if cfg not in made:
            source = build(cfg, 80, seed=1)
            folder = tmp_path_factory.mktemp(cfg.removesuffix(".yaml"))
            made[cfg] = (save_like_trainer(source, COCO, folder)[1], checkpoint_weights(source))
        return made[cfg]

    return get


def ultralytics_load(cfg: str, best: Path, names: list[str], ch: int = 3) -> Any:
    """ultralytics' own transfer, as its trainer runs it: names set, then ``model.load``."""
    model = build(cfg, len(names), seed=2, ch=ch)
    model.names = dict(enumerate(names))
    weights, _ = load_checkpoint(best)
    model.load(weights, verbose=False)
    return model, intersect_dicts(weights.float().state_dict(), model.state_dict())


@pytest.mark.parametrize(("cfg", "whole", "heads"), LIKE_ULTRALYTICS)
def test_keeps_everything_ultralytics_own_load_keeps(
    cfg: str, whole: int, heads: int, coco: Coco
) -> None:
    """Nano or small, detect, segment, pose or classify: every tensor ultralytics' own load
    copies is smartload's too, and the rows of the classes kept by name."""
    best, saved = coco(cfg)
    reference, copied = ultralytics_load(cfg, best, NEW)
    target = build(cfg, 3, seed=2)

    report = smartload.load(target, best, target_classes=NEW)

    got, expected = target.state_dict(), reference.state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    assert len(copied) == whole and len(got) == whole + 2 * heads
    for key in copied:
        assert torch.equal(got[key], expected[key]), key
    rows = [h.name for h in report.heads]
    assert len(rows) == heads and {h.class_map for h in report.heads} == {(0, 2, None)}
    for name in rows:
        weight = got[f"{name}.weight"]
        assert torch.equal(weight[:2], saved[f"{name}.weight"][[0, 2]]), name
        if not name.endswith(".linear"):  # ultralytics remaps these rows by name too
            assert torch.equal(weight[:2], expected[f"{name}.weight"][:2]), name
        if "cv3." in name:  # and a new class starts as Detect.bias_init starts it
            assert torch.equal(got[f"{name}.bias"], expected[f"{name}.bias"]), name
    counts = {k: v for k, v in report.summary.items() if not k.endswith("_params")}
    assert counts == {"copy": whole, "slice": 2 * heads, "reinit-normal": 0, "skip": 0, "unused": 0}


@pytest.mark.parametrize("ch", [1, 2, 4])
def test_first_conv_for_other_input_channels_as_ultralytics(ch: int, coco: Coco) -> None:
    """A model built for 1, 2 or 4 input channels: every tensor as ultralytics' own load gives
    it (filters summed for one channel, else the channels both have, the rest as initialised)."""
    best, _ = coco("yolo11n.yaml")
    reference, _ = ultralytics_load("yolo11n.yaml", best, COCO, ch=ch)
    target = build("yolo11n.yaml", 80, seed=2, ch=ch)

    report = smartload.load(target, best)

    assert_same_tensors(target.state_dict(), reference.state_dict())
    how = {
        1: "filters summed",
        2: "the first 2 channels",
        4: "the first 3 channels, channels 3..3 kept as initialised",
    }[ch]
    entry = next(e for e in report.entries if e.key == "model.0.conv.weight")
    assert (entry.action, entry.reason) == (
        "copy",
        f"input conv 3 → {ch} channels ({how}, as ultralytics' own load)",
    )


def test_rebuilt_branch_is_all_or_nothing(coco: Coco) -> None:
    """A dry run or a failed load leaves the model's own modules and values; a load rebuilds
    the 15 convs and norms of the branch, and the model runs."""
    best, _ = coco("yolov8n.yaml")
    target = build("yolov8n.yaml", 3, seed=2)
    modules, before = list(target.modules()), snapshot(target)

    dry = smartload.load(target, best, dry_run=True)
    with pytest.raises(smartload.InvalidArgumentError, match="on_nonfinite must be one of"):
        smartload.load(target, best, on_nonfinite="sometimes")

    assert all(a is b for a, b in zip(target.modules(), modules, strict=True))
    assert_unchanged(target, before)
    assert (dry.dry_run, dry.summary["copy"], dry.summary["reinit-normal"]) == (True, 349, 6)
    assert dry.notes[-1].startswith(
        "15 module(s) would be rebuilt (dry run) at the checkpoint's shapes by the ultralytics "
        "adapter"
    )
    report = smartload.load(target, best)
    assert report.summary["copy"] == 349
    assert [seq[2].in_channels for seq in target.model[22].cv3] == [80, 80, 80]
    target.eval()
    with torch.no_grad():
        assert target(torch.zeros(1, 3, 64, 64))[0].shape == (1, 4 + 3, 84)


# (family, checkpoint task, model task): "" is detection
CROSS_TASK = [
    (family, source, target)
    for family in ("yolo12n", "yolo11n")
    for source, target in (("", "-pose"), ("", "-seg"), ("", "-obb"), ("-pose", ""))
]
TASK_BRANCHES = {"": (), "-pose": ("cv4",), "-seg": ("cv4", "proto"), "-obb": ("cv4",)}


@pytest.fixture(scope="module")
def pose(tmp_path_factory: pytest.TempPathFactory) -> Coco:
    """``best.pt`` of a one-class (person) pose model, and its weights, made once per config."""
    made: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}

    def get(cfg: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if cfg not in made:
            source = build(cfg, 1, seed=1)
            folder = tmp_path_factory.mktemp(cfg.removesuffix(".yaml"))
            made[cfg] = (
                save_like_trainer(source, ["person"], folder)[1],
                checkpoint_weights(source),
            )
        return made[cfg]

    return get


@pytest.mark.parametrize(("family", "source", "target"), CROSS_TASK)
def test_across_tasks_the_shared_branches_are_copied(
    family: str, source: str, target: str, coco: Coco, pose: Coco
) -> None:
    """A detection checkpoint into a pose, segmentation or OBB model, and a pose checkpoint into
    a detection model (YOLO12 and YOLO11): backbone, neck and box branch copied exactly, the
    task's own branches (keypoints, mask coefficients and proto, angle) keep their
    initialisation (or go unused), class rows by name."""
    best, saved = (pose if source else coco)(f"{family}{source}.yaml")
    names = ["person"] if target == "-pose" else ["car", "person", "unicorn"]
    model = build(f"{family}{target}.yaml", len(names), seed=2)
    before = snapshot(model)
    head = f"model.{len(model.model) - 1}"

    report = smartload.load(model, best, target_classes=names)

    got = model.state_dict()
    own = {k for k in got if any(k.startswith(f"{head}.{b}.") for b in TASK_BRANCHES[target])}
    theirs = {k for k in saved if any(k.startswith(f"{head}.{b}.") for b in TASK_BRANCHES[source])}
    assert own or theirs
    for e in report.entries:
        if e.key in own:  # the model's task branch: not in the checkpoint
            assert (e.action, e.reason) == ("skip", "missing"), e.key
            assert torch.equal(got[e.key], before[e.key]), e.key
        elif e.head is None:  # everything else, the box branch included, bit-exact
            assert e.action == "copy" and torch.equal(got[e.key], saved[e.key]), e.key
    assert set(report.unused) == theirs
    assert any(k.startswith(f"{head}.cv2.") for k in got)  # the box branch was among the copies
    old = {"person": 0, "car": 2} if not source else {"person": 0}
    kept = {i: old[n] for i, n in enumerate(names) if n in old}
    assert {h.class_map for h in report.heads} == {tuple(old.get(n) for n in names)}
    for h in report.heads:
        weight = got[f"{h.name}.weight"]
        for new, was in kept.items():
            assert torch.equal(weight[new], saved[f"{h.name}.weight"][was]), h.name
    assert report.summary["slice"] == 2 * len(report.heads) == 6
    tree = smartload.inspect(best).module_tree
    notes = module_notes(model, report.entries, report.unused, tree)
    if own:  # one line for the task's branches (keypoints; mask coefficients and proto; angle)
        branches = [
            f"{head}.{b} ({type(getattr(model.model[-1], b)).__name__}, "
            for b in TASK_BRANCHES[target]
        ]
        assert len(notes) == 1 and "not in the checkpoint" in notes[0], notes
        assert all(b in notes[0] for b in branches), notes
    else:
        assert notes == [
            f"the checkpoint's {head}.cv4 (ModuleList of 3 Sequential, 42 tensors) has no place "
            "in the model: unused"
        ]


def test_rtdetr_class_heads_follow_the_names(tmp_path: Path) -> None:
    """RT-DETR (rtdetr-l): the encoder's and every decoder layer's score head and the denoising
    class embedding hold one row per class, no background; ``target_classes`` alone is
    enough; new score rows start at RT-DETR's focal prior bias, as the model's own init."""
    source = build("rtdetr-l.yaml", 80, seed=1)
    best = save_best(source, COCO, tmp_path)
    saved = checkpoint_weights(source)
    target = build("rtdetr-l.yaml", 3, seed=2)
    before = snapshot(target)

    report = smartload.load(target, best, target_classes=NEW)

    heads = ["denoising_class_embed", "enc_score_head", *(f"dec_score_head.{i}" for i in range(6))]
    assert [(h.name, h.old_classes, h.new_classes, h.class_map) for h in report.heads] == [
        (f"model.28.{name}", 80, 3, (0, 2, None)) for name in heads
    ]
    counts = {k: v for k, v in report.summary.items() if not k.endswith("_params")}
    assert counts == {"copy": 926, "slice": 15, "reinit-normal": 0, "skip": 0, "unused": 0}
    got = target.state_dict()
    for e in report.entries:
        if e.action == "copy":
            assert torch.equal(got[e.key], saved[e.key]), e.key
    prior = bias_init_with_prob(0.01) / 80 * 3  # RTDETRDecoder._reset_parameters
    for name in heads:
        key = f"model.28.{name}"
        weight = got[f"{key}.weight"]
        assert torch.equal(weight[:2], saved[f"{key}.weight"][[0, 2]]), key
        assert not torch.equal(weight[2], before[f"{key}.weight"][2]), key  # drawn anew
        if name != "denoising_class_embed":
            assert torch.equal(got[f"{key}.bias"][:2], saved[f"{key}.bias"][[0, 2]]), key
            assert got[f"{key}.bias"][2].item() == pytest.approx(prior, rel=1e-6), key
            assert torch.equal(got[f"{key}.bias"][2], before[f"{key}.bias"][2]), key
    with torch.no_grad():  # new embedding rows are drawn as nn.Embedding draws them: N(0, 1)
        assert 0.8 < float(got["model.28.denoising_class_embed.weight"][2].std()) < 1.2

    with pytest.raises(smartload.IncompatibleCheckpointError, match="model's head has 3 classes"):
        smartload.load(target, best, num_classes=4)
