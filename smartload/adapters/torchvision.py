"""torchvision detection models (Faster/Mask/Keypoint R-CNN): background-first heads.

torchvision counts the background in ``num_classes`` (91 for COCO) and keeps it first: the box
classifier has K+1 rows with the background row 0, the box regressor 4 rows per class with the
background's block first, the mask predictor K+1 channels. ``class_map`` therefore lists the K
foreground classes (torchvision label − 1); the background rows are always kept. ``num_classes``
passed to :func:`smartload.load` is torchvision's (with the background), as given to the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import Adapter, HeadRule

if TYPE_CHECKING:
    import torch

__all__ = ["TorchvisionDetectionAdapter"]


class TorchvisionDetectionAdapter(Adapter):
    name = "torchvision-detection"

    def head_rules(self, model: torch.nn.Module) -> list[HeadRule]:
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
            std = float(keypoints.weight.detach().float().std())
            rules.append(
                HeadRule(
                    name="roi_heads.keypoint_predictor.kps_score_lowres",
                    keys=tuple(
                        f"roi_heads.keypoint_predictor.kps_score_lowres.{p}"
                        for p in ("weight", "bias")
                    ),
                    dim=1,
                    label_space="keypoints",
                    std=std,
                )
            )
        return rules

    def num_classes(self, model: torch.nn.Module) -> int | None:
        box: Any = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
        return None if box is None else int(box.cls_score.out_features)


def _rule(name: str, **kwargs: Any) -> HeadRule:
    return HeadRule(
        name=name, keys=(f"{name}.weight", f"{name}.bias"), background="first", **kwargs
    )
