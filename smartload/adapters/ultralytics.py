"""Ultralytics YOLO models: Detect heads (YOLOv5u, v8, 11, 26) and their Segment, Pose and OBB
subclasses, and the Classify head.

A Detect head predicts classes in its ``cv3`` branch: one ``Sequential`` per feature level whose last
``Conv2d`` has one output channel per class (``model.22.cv3.0.2``); end-to-end heads (YOLOv10,
YOLO26) have a second such branch, ``one2one_cv3``. Those last convs are the class-count heads:
their rows follow ``class_map``, and new rows start as ``Detect.bias_init`` starts them (bias
``log(5 / nc / (640 / stride)²)``, weights with the spread of a default ``Conv2d`` init).

The hidden convs of the class branch are ``c3 = max(ch[0], min(nc, 100))`` channels wide, so in small
models (nano: ``ch[0] = 64``) the width itself changes with the class count (80 classes: 80 channels;
3 classes: 64). Then no checkpoint row fits the new branch: the whole branch keeps the model's own
initialisation, as ultralytics' own transfer (``intersect_dicts``) does, and the report says why.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from . import Adapter, HeadRule

if TYPE_CHECKING:
    import torch

__all__ = ["UltralyticsAdapter"]

_BRANCHES = ("cv3", "one2one_cv3")


class UltralyticsAdapter(Adapter):
    name = "ultralytics"

    def head_rules(self, model: torch.nn.Module) -> list[HeadRule]:
        found = _head(model)
        if found is None:
            return []
        prefix, head = found
        if hasattr(head, "linear"):  # Classify
            return [_rule(f"{prefix}.linear", head.linear.in_features, bias=0.0)]
        rules = []
        nc = int(head.nc)
        for branch in _BRANCHES:
            for level, seq in enumerate(getattr(head, branch, None) or ()):
                last = seq[-1]
                if getattr(last, "out_channels", None) != nc:  # YOLO-World/YOLOE: embeddings
                    continue
                stride = float(head.stride[level]) if level < len(head.stride) else 0.0
                # Detect.bias_init; a head whose strides are not set yet starts at 0
                bias = math.log(5 / nc / (640 / stride) ** 2) if stride > 0 else 0.0
                fan_in = last.in_channels * math.prod(last.kernel_size) // last.groups
                rules.append(_rule(f"{prefix}.{branch}.{level}.{len(seq) - 1}", fan_in, bias))
        return rules

    def num_classes(self, model: torch.nn.Module) -> int | None:
        found = _head(model)
        if found is None:
            return None
        head = found[1]
        return int(head.linear.out_features) if hasattr(head, "linear") else int(head.nc)

    def keep_initialised(
        self,
        model: torch.nn.Module,
        key: str,
        ckpt_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
    ) -> str | None:
        found = _head(model)
        if found is None:
            return None
        prefix, head = found
        branches = "|".join(_BRANCHES)
        match = re.match(rf"{re.escape(prefix)}\.({branches})\.(\d+)\.", key)
        if match is None or not hasattr(head, "cv3"):
            return None
        branch = getattr(head, match.group(1))
        if int(match.group(2)) >= len(branch):
            return None
        # only sizes that follow the class count may differ: the hidden width c3 and nc itself
        c3 = int(branch[int(match.group(2))][-1].in_channels)
        follows = {c3, int(head.nc)}
        if len(ckpt_shape) != len(model_shape) or any(
            m not in follows for c, m in zip(ckpt_shape, model_shape, strict=True) if c != m
        ):
            return None
        return (
            f"class branch resized with the class count (c3 = max(ch0, min(nc, 100)) = {c3}): "
            "kept as initialised"
        )


def _head(model: torch.nn.Module) -> tuple[str, Any] | None:
    """(key prefix, module) of the model's last layer when it is a class-count head; through
    the ``YOLO(...)`` wrapper too (its keys start ``model.model.``)."""
    from torch import nn

    prefix, layers = "model", getattr(model, "model", None)
    inner = getattr(layers, "model", None)
    if isinstance(inner, nn.Sequential):  # YOLO(...) wraps its DetectionModel
        prefix, layers = "model.model", inner
    if not isinstance(layers, nn.Sequential) or not len(layers):
        return None
    head = layers[-1]
    if (hasattr(head, "nc") and hasattr(head, "cv3")) or hasattr(head, "linear"):
        return f"{prefix}.{len(layers) - 1}", head
    return None


def _rule(name: str, fan_in: int, bias: float) -> HeadRule:
    # a default Conv2d/Linear init is uniform(±1/sqrt(fan_in)): this std
    return HeadRule(
        name=name,
        keys=(f"{name}.weight", f"{name}.bias"),
        std=1 / math.sqrt(3 * max(fan_in, 1)),
        bias=bias,
    )
