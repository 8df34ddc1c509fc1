"""Ultralytics YOLO models: Detect heads (YOLOv5u, v8, 11, 12, 26) and their Segment, Pose and OBB
subclasses, the Classify head, and RT-DETR's decoder.

A Detect head predicts classes in its ``cv3`` branch: one ``Sequential`` per feature level whose last
``Conv2d`` has one output channel per class (``model.22.cv3.0.2``); end-to-end heads (YOLOv10,
YOLO26) have a second such branch, ``one2one_cv3``. Those last convs are the class-count heads:
their rows follow ``class_map``, and new rows start as ``Detect.bias_init`` starts them (bias
``log(5 / nc / (640 / stride)²)``, weights with the spread of a default ``Conv2d`` init).

The hidden convs of the class branch are ``c3 = max(ch[0], min(nc, 100))`` channels wide, so in small
models (nano: ``ch[0] = 64``) the width itself changes with the class count (80 classes: 80 channels;
3 classes: 64). ``smartload.load`` copies into the model's own parameters, so there the branch keeps
the model's initialisation and the report says why. ultralytics' own ``BaseModel.load`` (8.4)
instead rebuilds the branch at the checkpoint's width and copies it; so does ``smartload.load``,
through :meth:`UltralyticsAdapter.rebuild_modules` (new module objects: build the optimizer after
loading).

The first conv (``model.0.conv``) of a model built for other input channels is adapted as
ultralytics' own load adapts it: RGB filters summed for one channel, else the channels both have.

Across tasks (a detection checkpoint into a pose, segmentation or OBB model, or back) the heads
share their box (``cv2``) and class (``cv3``) branches; the task's own branches (``cv4``: keypoints,
mask coefficients or angle; ``proto``) are missing on one side and keep the model's
initialisation (or go unused).

RT-DETR (``RTDETRDecoder``) scores classes with sigmoid focal heads, no background row: the
encoder's ``enc_score_head``, each decoder layer's ``dec_score_head.{i}`` (Linear, new rows with a
default Linear's spread and the bias ``_reset_parameters`` gives, ``bias_init_with_prob(0.01) /
80 * nc``) and the denoising queries' ``denoising_class_embed`` (an Embedding, one row per class,
new rows ``normal(0, 1)`` as ``nn.Embedding`` starts them).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, cast

from . import Adapter, Conversion, HeadRule

if TYPE_CHECKING:
    import torch

    from .._report import LoadPlan

__all__ = ["UltralyticsAdapter"]

_BRANCHES = ("cv3", "one2one_cv3")
_RESIZED = "class branch resized with the class count"
_RTDETR_PRIOR = 0.01  # RTDETRDecoder: bias_init_with_prob(0.01)


class UltralyticsAdapter(Adapter):
    name = "ultralytics"

    def head_rules(self, model: torch.nn.Module) -> list[HeadRule]:
        return [_rule(name, conv, bias) for name, conv, bias in _class_convs(model)]

    def rebuild_modules(self, model: torch.nn.Module, plan: Any) -> dict[str, torch.nn.Module]:
        return _rebuilt_modules(model, plan)

    def num_classes(self, model: torch.nn.Module) -> int | None:
        found = _head(model)
        if found is None:
            return None
        head = found[1]
        return int(head.linear.out_features) if hasattr(head, "linear") else int(head.nc)

    def convert(
        self,
        model: torch.nn.Module,
        key: str,
        ckpt_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
    ) -> Conversion | None:
        """The first conv of a model built for other input channels, as ultralytics adapts it."""
        found = _layers(model)
        if found is None or key != f"{found[0]}.0.conv.weight":
            return None
        if len(ckpt_shape) != 4 or (ckpt_shape[0], *ckpt_shape[2:]) != (
            model_shape[0],
            *model_shape[2:],
        ):
            return None  # ultralytics would copy part of the filters; the rest could not load
        weight = model.get_parameter(key)
        return _first_conv(weight, ckpt_shape[1], model_shape[1])

    def keep_initialised(
        self,
        model: torch.nn.Module,
        key: str,
        ckpt_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
    ) -> str | None:
        c3 = _resized_branch_width(model, key, ckpt_shape, model_shape)
        if c3 is None:
            return None
        return (
            f"{_RESIZED} (c3 = max(ch0, min(nc, 100)) = {c3}): kept as initialised "
            "unless smartload.load can rebuild the branch at the checkpoint's width, as "
            "ultralytics' own load does"
        )


def _rebuilt_modules(model: torch.nn.Module, plan: LoadPlan) -> dict[str, torch.nn.Module]:
    """For each leaf of a class branch the plan keeps initialised for its width, a new module
    of the checkpoint's shape (the class conv keeps the model's class count); empty when any
    such leaf cannot be rebuilt (then the plan stands)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in plan.entries:
        if entry.action == "skip" and entry.reason.startswith(_RESIZED):
            name, _, param = entry.key.rpartition(".")
            if param in ("weight", "running_mean") and entry.ckpt_shape is not None:
                shapes.setdefault(name, entry.ckpt_shape)
    if not shapes:
        return {}
    class_convs = {name: bias for name, _, bias in _class_convs(model)}
    rebuilt = {}
    for name, shape in shapes.items():
        module = _resized(model.get_submodule(name), shape, class_convs.get(name))
        if module is None:
            return {}
        rebuilt[name] = module
    return rebuilt


def _resized(
    module: torch.nn.Module, shape: tuple[int, ...], class_bias: float | None
) -> torch.nn.Module | None:
    """A fresh copy of ``module`` (a Conv2d or BatchNorm2d) with the checkpoint's ``shape``; a
    class conv (``class_bias`` given) keeps the model's class count and starts at that bias."""
    from torch import nn

    new: nn.Module
    if type(module) is nn.Conv2d and len(shape) == 4:  # not a subclass: it would lose its type
        out = module.out_channels if class_bias is not None else shape[0]
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if (module.groups > 1 and not depthwise) or tuple(shape[2:]) != module.kernel_size:
            return None
        groups = out if depthwise else 1
        conv = nn.Conv2d(
            shape[1] * groups,
            out,
            cast("tuple[int, int]", module.kernel_size),
            cast("tuple[int, int]", module.stride),
            cast("tuple[int, int]", module.padding),
            cast("tuple[int, int]", module.dilation),
            groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
        if class_bias is not None and conv.bias is not None:
            nn.init.constant_(conv.bias, class_bias)  # as Detect.bias_init starts it
        new = conv
    elif type(module) is nn.BatchNorm2d and len(shape) == 1:
        new = nn.BatchNorm2d(
            shape[0], module.eps, module.momentum, module.affine, module.track_running_stats
        )
    else:
        return None
    like = next(iter(module.parameters()), None)
    if like is not None:
        new.to(like.device, like.dtype)
        for param in new.parameters():
            param.requires_grad_(like.requires_grad)
    return new.train(module.training)


def _first_conv(weight: torch.Tensor, given: int, wanted: int) -> Conversion:
    """ultralytics' ``BaseModel.load``: ``w[:, :c] = src.sum(1)`` when either side has one
    channel, else ``src[:, :c]`` (``c = min(given, wanted)``); other channels keep the model's."""
    summed = min(given, wanted) == 1

    def adapt(source: torch.Tensor) -> torch.Tensor:
        source = source.float()  # ultralytics reads the checkpoint as FP32
        part = source.sum(1, keepdim=True) if summed else source[:, :wanted]
        if wanted <= given:
            return part
        value = weight.detach().float().clone()
        value[:, :given] = part
        return value

    how = "filters summed" if summed else f"the first {min(given, wanted)} channels"
    rest = f", channels {given}..{wanted - 1} kept as initialised" if wanted > given else ""
    return Conversion(
        f"input conv {given} → {wanted} channels ({how}{rest}, as ultralytics' own load)", adapt
    )


def _resized_branch_width(
    model: torch.nn.Module,
    key: str,
    ckpt_shape: tuple[int, ...],
    model_shape: tuple[int, ...],
) -> int | None:
    """The model's class-branch width c3 when ``key`` is in a class branch and its shapes
    differ only in sizes that follow the class count (c3 and nc), else None."""
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
    c3 = int(branch[int(match.group(2))][-1].in_channels)
    follows = {c3, int(head.nc)}
    if len(ckpt_shape) != len(model_shape) or any(
        m not in follows for c, m in zip(ckpt_shape, model_shape, strict=True) if c != m
    ):
        return None
    return c3


def _layers(model: torch.nn.Module) -> tuple[str, torch.nn.Sequential] | None:
    """(key prefix, layers) of a YOLO model; through the ``YOLO(...)`` wrapper too (its keys
    start ``model.model.``)."""
    from torch import nn

    prefix, layers = "model", getattr(model, "model", None)
    inner = getattr(layers, "model", None)
    if isinstance(inner, nn.Sequential):  # YOLO(...) wraps its DetectionModel
        prefix, layers = "model.model", inner
    if not isinstance(layers, nn.Sequential) or not len(layers):
        return None
    return prefix, layers


def _head(model: torch.nn.Module) -> tuple[str, Any] | None:
    """(key prefix, module) of the model's last layer when it is a class-count head."""
    found = _layers(model)
    if found is None:
        return None
    prefix, layers = found
    head = layers[-1]
    if hasattr(head, "linear") or (
        hasattr(head, "nc") and _has_any(head, "cv3", "one2one_cv3", "classifier", "dec_score_head")
    ):
        return f"{prefix}.{len(layers) - 1}", head
    return None


def _has_any(module: Any, *names: str) -> bool:
    return any(getattr(module, name, None) is not None for name in names)


def _class_convs(model: torch.nn.Module) -> list[tuple[str, Any, float]]:
    """(key prefix, module, bias of a new row) of each layer with one row per class: the
    Classify ``linear``, each class branch's last conv (bias as ``Detect.bias_init``), YOLO26
    segmentation's semantic branch (``proto.semseg``) and a SemanticSegment head's
    ``classifier`` and ``aux_head`` (bias 0); RT-DETR's score heads and class embedding."""
    found = _head(model)
    if found is None:
        return []
    prefix, head = found
    if hasattr(head, "linear"):  # Classify
        return [(f"{prefix}.linear", head.linear, 0.0)]
    if hasattr(head, "dec_score_head"):  # RTDETRDecoder
        return _rtdetr_class_layers(prefix, head)
    convs = [
        (f"{prefix}.{branch}.{level}.{len(seq) - 1}", seq[-1], _bias_init(head, level))
        for branch, level, seq in _class_branches(head)
    ]
    for path in ("proto.semseg", "classifier", "aux_head"):
        seq = _attribute(head, path)
        if seq is not None and getattr(seq[-1], "out_channels", None) == int(head.nc):
            convs.append((f"{prefix}.{path}.{len(seq) - 1}", seq[-1], 0.0))
    return convs


def _rtdetr_class_layers(prefix: str, head: Any) -> list[tuple[str, Any, float]]:
    """RT-DETR's layers with one row per class; new score rows start at the bias
    ``RTDETRDecoder._reset_parameters`` gives (``bias_init_with_prob(0.01) / 80 * nc``)."""
    nc = int(head.nc)
    prior = -math.log((1 - _RTDETR_PRIOR) / _RTDETR_PRIOR) / 80 * nc
    layers = [(f"{prefix}.enc_score_head", head.enc_score_head, prior)]
    layers += [
        (f"{prefix}.dec_score_head.{i}", lin, prior) for i, lin in enumerate(head.dec_score_head)
    ]
    embed = getattr(head, "denoising_class_embed", None)
    if embed is not None and int(embed.num_embeddings) == nc:
        layers.append((f"{prefix}.denoising_class_embed", embed, 0.0))
    return [(name, layer, bias) for name, layer, bias in layers if _rows(layer) == nc]


def _rows(layer: Any) -> int | None:
    for size in ("out_features", "out_channels", "num_embeddings"):
        if hasattr(layer, size):
            return int(getattr(layer, size))
    return None


def _attribute(module: Any, path: str) -> Any:
    """``module.a.b`` for ``"a.b"``, or None where a step is missing."""
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _class_branches(head: Any) -> list[tuple[str, int, Any]]:
    """(branch, level, Sequential) of each class branch: its last conv has one row per class
    (YOLO-World/YOLOE branches give embeddings instead)."""
    nc = int(head.nc)
    return [
        (branch, level, seq)
        for branch in _BRANCHES
        for level, seq in enumerate(getattr(head, branch, None) or ())
        if getattr(seq[-1], "out_channels", None) == nc
    ]


def _bias_init(head: Any, level: int) -> float:
    """``Detect.bias_init``'s class bias; a head whose strides are not set yet starts at 0."""
    stride = float(head.stride[level]) if level < len(head.stride) else 0.0
    return math.log(5 / int(head.nc) / (640 / stride) ** 2) if stride > 0 else 0.0


def _rule(name: str, layer: Any, bias: float) -> HeadRule:
    """A head whose new rows have the spread of a default Conv2d/Linear init,
    uniform(±1/sqrt(fan_in)), and the given bias; an Embedding's, normal(0, 1)."""
    if hasattr(layer, "num_embeddings"):
        return HeadRule(name=name, keys=(f"{name}.weight",), std=1.0)
    if hasattr(layer, "in_features"):
        fan_in = int(layer.in_features)
    else:
        fan_in = layer.in_channels * math.prod(layer.kernel_size) // layer.groups
    return HeadRule(
        name=name,
        keys=(f"{name}.weight", f"{name}.bias"),
        std=1 / math.sqrt(3 * max(fan_in, 1)),
        bias=bias,
    )
