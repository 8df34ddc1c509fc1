"""torchvision detection models: background-first heads, torchvision's num_classes convention."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torchvision.models import detection

import smartload

PERSON_CAR_DOG = [0, 2, 17]  # torchvision COCO labels 1, 3, 18, as foreground indices


def _rows(head: str, old_k: int, new_map: list[int]) -> list[int]:
    block = 4 if head.endswith("bbox_pred") else 1
    rows = list(range(block))  # the background's rows, always first
    for k in new_map:
        rows.extend(block * (1 + k) + j for j in range(block))
    return rows


@pytest.mark.parametrize(
    ("builder", "heads"),
    [
        (detection.fasterrcnn_mobilenet_v3_large_320_fpn,
         ["roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"]),
        (detection.maskrcnn_resnet50_fpn,
         ["roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
          "roi_heads.mask_predictor.mask_fcn_logits"]),
    ],
)  # fmt: skip
def test_coco_91_into_4_classes(tmp_path: Path, builder, heads: list[str]) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    source = builder(weights=None, weights_backbone=None)
    sd = source.state_dict()
    path = tmp_path / "coco.pth"
    torch.save(sd, path)
    model = builder(weights=None, weights_backbone=None, num_classes=4)
    report = smartload.load(model, path, num_classes=4, class_map=PERSON_CAR_DOG)
    assert report.adapter == "torchvision-detection"
    assert [(h.name, h.old_classes, h.new_classes) for h in report.heads] == [
        (h, 90, 3) for h in heads
    ]
    got = model.state_dict()
    for head in heads:
        rows = _rows(head, 90, PERSON_CAR_DOG)
        for p in ("weight", "bias"):
            assert torch.equal(got[f"{head}.{p}"], sd[f"{head}.{p}"][rows]), (head, p)
    for key, value in sd.items():
        if key.rpartition(".")[0] not in heads:
            assert torch.equal(got[key], value), key
    with pytest.raises(
        smartload.IncompatibleCheckpointError, match="num_classes=3, but the model's head has 4"
    ):
        smartload.diff(model, path, num_classes=3)


def test_keypoint_count_is_dim_1(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sd = detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    path = tmp_path / "kp.pth"
    torch.save(sd, path)
    model = detection.keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_keypoints=14
    )
    report = smartload.load(model, path)
    entry = next(
        e for e in report.entries if e.key == "roi_heads.keypoint_predictor.kps_score_lowres.weight"
    )
    assert (entry.action, entry.ckpt_shape, entry.model_shape) == (
        "reinit-normal",
        (512, 17, 4, 4),
        (512, 14, 4, 4),
    )
    assert torch.equal(
        model.state_dict()["roi_heads.box_predictor.cls_score.weight"],
        sd["roi_heads.box_predictor.cls_score.weight"],
    )


def _anchor_rows(groups: int, old_k: int, new_map: list[int | None]) -> list[int | None]:
    """Per anchor: its background channel (kept), then the mapped classes (channel a*(K+1) + k)."""
    rows: list[int | None] = []
    for a in range(groups):
        rows.append(a * (old_k + 1))
        rows.extend(None if k is None else a * (old_k + 1) + 1 + k for k in new_map)
    return rows


SINGLE_STAGE = {
    detection.fcos_resnet50_fpn: {"head.classification_head.cls_logits": 1},
    detection.retinanet_resnet50_fpn: {"head.classification_head.cls_logits": 9},
    detection.ssd300_vgg16: {
        f"head.classification_head.module_list.{i}": a for i, a in enumerate([4, 6, 6, 6, 4, 4])
    },
    detection.ssdlite320_mobilenet_v3_large: {
        f"head.classification_head.module_list.{i}.1": 6 for i in range(6)
    },
}


@pytest.mark.parametrize("builder", list(SINGLE_STAGE), ids=lambda b: b.__name__)
def test_single_stage_heads_take_a_foreground_class_map(tmp_path: Path, builder) -> None:  # type: ignore[no-untyped-def]
    """FCOS, RetinaNet, SSD and SSDlite: the class map lists foreground classes as for R-CNN;
    each anchor's background channel is kept, every other key copied."""
    torch.manual_seed(0)
    sd = builder(weights=None, weights_backbone=None).state_dict()
    path = tmp_path / "coco.pth"
    torch.save(sd, path)
    model = builder(weights=None, weights_backbone=None, num_classes=4)
    report = smartload.load(model, path, num_classes=4, class_map=PERSON_CAR_DOG)
    heads = SINGLE_STAGE[builder]
    assert report.adapter == "torchvision-detection"
    assert [(h.name, h.old_classes, h.new_classes, h.class_map) for h in report.heads] == [
        (h, 90, 3, tuple(PERSON_CAR_DOG)) for h in heads
    ]
    got = model.state_dict()
    for head, anchors in heads.items():
        rows = _anchor_rows(anchors, 90, PERSON_CAR_DOG)
        for p in ("weight", "bias"):
            assert torch.equal(got[f"{head}.{p}"], sd[f"{head}.{p}"][rows]), (head, p)
    for key, value in sd.items():
        if key.rpartition(".")[0] not in heads:
            assert torch.equal(got[key], value), key


def test_fcos_new_class_starts_at_the_focal_prior(tmp_path: Path) -> None:
    """A class the checkpoint lacks gets torchvision's init (bias -log(99)); a class map that
    counts the background is refused, as for R-CNN."""
    torch.manual_seed(0)
    sd = detection.fcos_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    path = tmp_path / "fcos.pth"
    torch.save(sd, path)
    model = detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    report = smartload.load(model, path, num_classes=4, class_map=[17, None, 0])
    key = "head.classification_head.cls_logits"
    entry = next(e for e in report.entries if e.key == f"{key}.bias")
    assert (entry.action, entry.reason) == (
        "slice",
        f"head {key}: 90 → 3 classes, 3 of 4 rows kept by class map",
    )
    got = model.state_dict()
    assert torch.equal(got[f"{key}.weight"][[0, 1, 3]], sd[f"{key}.weight"][[0, 18, 1]])
    bias = got[f"{key}.bias"]
    assert torch.equal(bias[[0, 1, 3]], sd[f"{key}.bias"][[0, 18, 1]])
    assert bias[2].item() == pytest.approx(-math.log(99))
    with pytest.raises(
        smartload.InvalidArgumentError,
        match=r"class_map has 4 entries but the model \(head head.classification_head.cls_logits\) "
        "has 3 classes",
    ):
        smartload.diff(model, path, num_classes=4, class_map=[0, 1, 3, 18])
