"""torchvision detection models: background-first heads, torchvision's label convention.

torchvision counts the background in ``num_classes`` (91 for COCO) and keeps it as class 0, in
every detector: the R-CNN box classifier has K+1 rows with the background row 0, the box regressor
4 rows per class with the background's block first, the mask predictor K+1 channels. The
single-stage heads follow the same labels: FCOS ``cls_logits`` has K+1 channels, RetinaNet and SSD
A*(K+1) (channel ``a*(K+1) + k``, one background channel per anchor). FCOS and RetinaNet score
with a sigmoid, so their channel 0 is never a positive target (a dead "background" channel);
torchvision keeps it, and so does smartload. ``class_map`` therefore always lists the K
foreground classes (torchvision label − 1); the background rows are always kept. ``num_classes``
passed to :func:`smartload.load` is torchvision's (with the background), as given to the model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import Adapter, HeadRule

__all__ = ["TorchvisionDetectionAdapter"]

_PRIOR_PROB = 0.01  # FCOS and RetinaNet: new class channels start at this probability


class TorchvisionDetectionAdapter(Adapter):
    name = "torchvision-detection"

    def head_rules(self, model: torch.nn.Module) -> list[HeadRule]:
        return _rcnn_rules(model) + _single_stage_rules(model)

    def num_classes(self, model: torch.nn.Module) -> int | None:
        box: Any = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
        if box is not None:
            return int(box.cls_score.out_features)
        found = _classification_head(model)
        return None if found is None else found[1]


def _rcnn_rules(model: torch.nn.Module) -> list[HeadRule]:
    """Faster/Mask/Keypoint R-CNN: ``roi_heads`` predictors."""
    roi: Any = getattr(model, "roi_heads", None)
    rules = []
    box: Any = getattr(roi, "box_predictor", None)
    if box is not None:
        rules.append(_rule("roi_heads.box_predictor.cls_score", std=0.01))
        if int(box.bbox_pred.out_features) == 4 * int(box.cls_score.out_features):
            rules.append(_rule("roi_heads.box_predictor.bbox_pred", block=4, std=0.001))
    if getattr(getattr(roi, "mask_predictor", None), "mask_fcn_logits", None) is not None:
        rules.append(_rule("roi_heads.mask_predictor.mask_fcn_logits", std=0.001))
    keypoints: Any = getattr(getattr(roi, "keypoint_predictor", None), "kps_score_lowres", None)
    if keypoints is not None:
        name = "roi_heads.keypoint_predictor.kps_score_lowres"
        rules.append(
            HeadRule(
                name=name,
                keys=(f"{name}.weight", f"{name}.bias"),
                dim=1,
                label_space="keypoints",
                std=_std(keypoints),
            )
        )
    return rules


def _single_stage_rules(model: torch.nn.Module) -> list[HeadRule]:
    """FCOS and RetinaNet ``cls_logits``; SSD and SSDlite: one class conv per feature level."""
    found = _classification_head(model)
    if found is None:
        return []
    head, num_classes = found
    prefix = "head.classification_head"
    if hasattr(head, "cls_logits"):  # FCOS, RetinaNet: normal(0.01) weights, bias at the prior
        prior = -math.log((1 - _PRIOR_PROB) / _PRIOR_PROB)
        return [_anchor_rule(f"{prefix}.cls_logits", head.cls_logits, num_classes, 0.01, prior)]
    rules = []
    for i, level in enumerate(head.module_list):  # SSD: a Conv2d; SSDlite: a block, then a Conv2d
        name, conv = f"{prefix}.module_list.{i}", level
        if isinstance(level, torch.nn.Sequential):
            name, conv = f"{name}.{len(level) - 1}", level[-1]
        rules.append(_anchor_rule(name, conv, num_classes, _std(conv), 0.0))  # xavier, 0.03
    return rules


def _anchor_rule(name: str, conv: Any, num_classes: int, std: float, bias: float) -> HeadRule:
    """A conv with (K+1) channels per anchor, each anchor's background channel first."""
    groups = int(conv.out_channels) // num_classes
    return _rule(name, groups=groups, background_per_group=True, std=std, bias=bias)


def _classification_head(model: torch.nn.Module) -> tuple[Any, int] | None:
    """``model.head.classification_head`` and its class count (background included)."""
    head: Any = getattr(getattr(model, "head", None), "classification_head", None)
    count = getattr(head, "num_classes", getattr(head, "num_columns", None))
    return None if head is None or not isinstance(count, int) else (head, count)


def _std(module: Any) -> float:
    """The std of a freshly built layer's weight: new rows are drawn like torchvision drew it."""
    return float(module.weight.detach().float().std())


def _rule(name: str, **kwargs: Any) -> HeadRule:
    return HeadRule(
        name=name, keys=(f"{name}.weight", f"{name}.bias"), background="first", **kwargs
    )
