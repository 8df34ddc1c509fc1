"""torchvision detection models: background-first heads, torchvision's num_classes convention."""

from __future__ import annotations

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
