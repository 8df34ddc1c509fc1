"""The original YOLOv5 (github.com/ultralytics/yolov5, packaged on PyPI as ``yolov5``): the anchor
heads ``Detect`` and ``Segment``, and the ``Classify`` head of its classification models.

A ``Detect`` head has one 1×1 conv per feature level (``model.24.m.{0,1,2}``) with ``na × (5 + K)``
output rows: per anchor, 4 box rows, 1 objectness row, then K class rows (a ``Segment`` head adds
``nm`` mask-coefficient rows after the classes, and a ``proto`` branch that does not depend on K).
Only the class rows follow ``class_map``: box, objectness and mask rows are kept for every anchor.
New class rows start as ``DetectionModel._initialize_biases`` starts them: bias
``log(0.6 / (K − 0.99999))`` (K: the model's class count), weights with the spread of a default
``Conv2d`` init. The objectness bias that function sets (``log(8 / (640 / stride)²)``) is that of
a row the checkpoint always has, so it is copied, never made.

Nothing here imports yolov5 except :func:`build_model` (the CLI's ``--model yolov5:CONFIG``): the
rules read the model's structure, so models built from a clone of the repository (``models.yolo``)
and from the package (``yolov5.models.yolo``) are served alike. Checkpoints are whole-model
pickles (``{"model": DetectionModel.half(), "ema", "optimizer", "opt", ...}``); smartload reads their
weights without importing or running anything, and the class names from the pickled model's
``names``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from . import Adapter, HeadRule

if TYPE_CHECKING:
    import torch

__all__ = ["Yolov5Adapter", "build_model", "find_config", "is_yolov5", "new_class_bias"]

# where the classes live: the repository's own layout, and the PyPI package's
_MODULES = frozenset({"models.yolo", "models.common", "yolov5.models.yolo", "yolov5.models.common"})
_MODELS = frozenset(
    {"Model", "BaseModel", "DetectionModel", "SegmentationModel", "ClassificationModel"}
)
_WRAPPERS = frozenset({"AutoShape", "DetectMultiBackend"})  # yolov5.load() / torch.hub wrappers
_BOX_AND_OBJECTNESS = 5  # rows of each anchor block before its classes


def is_yolov5(model: torch.nn.Module) -> bool:
    """Whether ``model`` is one of YOLOv5's models (or the wrappers of ``yolov5.load``)."""
    cls = type(model)
    return cls.__module__ in _MODULES and cls.__name__ in _MODELS | _WRAPPERS


def new_class_bias(num_classes: int) -> float:
    """``DetectionModel._initialize_biases``' class bias, ``log(0.6 / (K − 0.99999))``."""
    return math.log(0.6 / (num_classes - 0.99999))


class Yolov5Adapter(Adapter):
    name = "yolov5"

    def head_rules(self, model: torch.nn.Module) -> list[HeadRule]:
        found = _head(model)
        if found is None:
            return []
        prefix, head = found
        if _is_classify(head):
            linear = head.linear
            name = f"{prefix}.linear"
            return [_rule(name, std=_default_std(int(linear.in_features)), bias=0.0)]
        nc = int(head.nc)
        trail = int(head.no) - _BOX_AND_OBJECTNESS - nc  # Segment: mask coefficients
        return [
            _rule(
                f"{prefix}.m.{i}",
                std=_default_std(int(conv.in_channels) * math.prod(conv.kernel_size)),
                bias=new_class_bias(nc),
                groups=int(head.na),
                group_lead=_BOX_AND_OBJECTNESS,
                group_trail=trail,
            )
            for i, conv in enumerate(head.m)
        ]

    def num_classes(self, model: torch.nn.Module) -> int | None:
        found = _head(model)
        if found is None:
            return None
        head = found[1]
        return int(head.linear.out_features) if _is_classify(head) else int(head.nc)


def _rule(name: str, **fields: Any) -> HeadRule:
    return HeadRule(name=name, keys=(f"{name}.weight", f"{name}.bias"), **fields)


def _default_std(fan_in: int) -> float:
    """The std of a default Conv2d/Linear init, uniform(±1/sqrt(fan_in))."""
    return 1 / math.sqrt(3 * max(fan_in, 1))


def _is_detect(module: Any) -> bool:
    """A ``Detect`` or ``Segment`` head: anchors, ``na``, ``nc``, ``no`` and one conv per level."""
    return (
        type(module).__module__ in _MODULES
        and all(hasattr(module, a) for a in ("na", "nc", "no", "m", "anchors"))
        and int(module.no) >= _BOX_AND_OBJECTNESS + int(module.nc)
        and all(int(conv.out_channels) == int(module.na) * int(module.no) for conv in module.m)
    )


def _is_classify(module: Any) -> bool:
    return type(module).__name__ == "Classify" and hasattr(module, "linear")


def _head(model: torch.nn.Module) -> tuple[str, Any] | None:
    """(key prefix, module) of the model's Detect/Segment head, or of a classification model's
    last layer when it is ``Classify``; through wrappers (their keys start ``model.model.``)."""
    from torch import nn

    for name, module in model.named_modules():
        if _is_detect(module):
            return name, module
        layers = getattr(module, "model", None)
        if (
            type(module).__name__ == "ClassificationModel"
            and isinstance(layers, nn.Sequential)
            and len(layers)
            and _is_classify(layers[-1])
        ):
            prefix = f"{name}.model" if name else "model"
            return f"{prefix}.{len(layers) - 1}", layers[-1]
    return None


def build_model(config: str, num_classes: int | None = None) -> torch.nn.Module:
    """A YOLOv5 model from a model yaml, as ``train.py --cfg CONFIG`` builds it (no weights):
    ``DetectionModel`` or ``SegmentationModel`` after the yaml's head, with ``num_classes``
    overriding the yaml's ``nc``. ``config`` is a path, a path inside the package
    (``models/hub/yolov5s-transformer.yaml``) or a file name found there (``yolov5s.yaml``,
    ``yolov5s-seg.yaml``). A name ending ``-cls.yaml`` gives the classification model that
    ``classify/train.py`` makes of the detection model without it (cut at layer 10).

    Raises :class:`~smartload.errors.InvalidArgumentError` when the package is missing, or the
    config is not found or is no YOLOv5 model yaml."""
    try:
        with warnings.catch_warnings():  # its import of pkg_resources warns
            warnings.simplefilter("ignore")
            yolo = importlib.import_module("yolov5.models.yolo")
            yaml = importlib.import_module("yaml")  # a dependency of yolov5
    except ImportError as exc:
        raise InvalidArgumentError(
            f"{config}: building a YOLOv5 model needs the yolov5 package ({exc}); "
            "pip install yolov5"
        ) from exc
    classify = config.endswith("-cls.yaml") and not Path(config).is_file()
    path = find_config(config.replace("-cls.yaml", ".yaml") if classify else config)
    segment = _is_segment(_read_config(path, yaml), path)
    quiet = logging.getLogger("yolov5")  # it logs the model's layers and summary
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        if classify:  # as classify/train.py makes it of a detection model
            detector = yolo.DetectionModel(str(path))
            model: torch.nn.Module = yolo.ClassificationModel(
                model=detector, nc=num_classes or 1000, cutoff=10
            )
        else:
            made = yolo.SegmentationModel if segment else yolo.DetectionModel
            model = made(str(path), nc=num_classes)
    except Exception as exc:  # yolov5 reads the yaml's layers unchecked: any error, for a bad one
        raise InvalidArgumentError(
            f"{path}: yolov5 cannot build a model of this yaml ({type(exc).__name__}: {exc}); "
            "give a model yaml such as yolov5s.yaml, or the path of one"
        ) from exc
    finally:
        quiet.setLevel(level)
    return model


def _read_config(path: Path, yaml: Any) -> Any:
    """The yaml of ``path``; InvalidArgumentError where it cannot be read or parsed."""
    try:
        return yaml.safe_load(path.read_text(encoding="ascii", errors="ignore"))
    except (OSError, yaml.YAMLError, RecursionError) as exc:
        raise InvalidArgumentError(
            f"{path}: not read as a YOLOv5 model yaml ({' '.join(str(exc).split())}); give a "
            "model yaml such as yolov5s.yaml, or the path of one"
        ) from None


def _is_segment(cfg: Any, path: Path) -> bool:
    """Whether the yaml's last head layer (``[from, number, module, args]``) is ``Segment``."""
    head = cfg.get("head") if isinstance(cfg, dict) else None
    last = head[-1] if isinstance(head, list) and head else None
    if not isinstance(last, list) or len(last) < 3 or not isinstance(last[2], str):
        raise InvalidArgumentError(
            f"{path}: not a YOLOv5 model yaml: it needs a head, a list of "
            "[from, number, module, args] layers; give a model yaml such as yolov5s.yaml, or "
            "the path of one"
        )
    return last[2] == "Segment"


def find_config(config: str) -> Path:
    """A model yaml: ``config`` itself when it is a file, else the file of that path or name in
    the installed yolov5 package's ``models/``."""
    given = Path(config)
    if given.is_file():
        return given
    spec = importlib.util.find_spec("yolov5")
    if spec is None or spec.origin is None:
        raise InvalidArgumentError(
            f"{config}: no such file (and the yolov5 package, whose model yamls it could name, "
            "is not installed); give the path of a YOLOv5 model yaml, or pip install yolov5"
        )
    root = Path(spec.origin).parent
    if (root / config).is_file():
        return root / config
    # by name, not as a glob pattern: "*.yaml" is no config's name, and "" no pattern at all
    found = sorted(p for p in (root / "models").rglob("*") if p.name == given.name and p.is_file())
    if not found:
        known = sorted(p.name for p in (root / "models").rglob("*.yaml"))
        raise InvalidArgumentError(
            f"{config}: no such file, nor a YOLOv5 model yaml of that name; give the path of "
            f"a model yaml, or one of: {', '.join(known)}"
        )
    return found[0]
