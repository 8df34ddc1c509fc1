"""Framework adapters: head rules for a model family, chosen from the model.

An adapter is data for the planner: which model keys form class-count heads (:class:`HeadRule`),
and how many classes the model has. Framework adapters live in ``smartload/adapters/<name>.py``
and import their framework lazily; the core never imports them unless the model asks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._heads import HeadRule

if TYPE_CHECKING:
    import torch

__all__ = ["Adapter", "Conversion", "GenericAdapter", "HeadRule", "select_adapter"]


@dataclass(frozen=True)
class Conversion:
    """How an adapter turns a checkpoint tensor into the model's shape (not a head change)."""

    reason: str  # for the report: "input conv 3 → 1 channels (timm adapt_input_conv)"
    fn: Callable[[torch.Tensor], torch.Tensor]


class Adapter:
    """Base class. ``name`` appears in the report."""

    name = "generic"
    knows_heads = True  # False: its head rules are guesses, used only when num_classes is given
    notes: tuple[str, ...] = ()  # said in the report (e.g. an assumption the adapter made)

    def head_rules(self, model: torch.nn.Module) -> list[HeadRule]:
        """The model's class-count heads."""
        return []

    def num_classes(self, model: torch.nn.Module) -> int | None:
        """The model's class count as its heads say, or None when unknown."""
        return None

    def prepare_checkpoint(
        self,
        model: torch.nn.Module,
        tensors: Mapping[str, Any],
        extras: Mapping[str, str],
    ) -> tuple[Mapping[str, Any], Mapping[str, str]] | None:
        """Rename (or convert) checkpoint tensors the framework's own way before matching.

        Returns ``(tensors by new name, {new name: name in the file})``, or None to leave them.
        """
        return None

    def class_names(self, label_set: str) -> list[str] | None:
        """The class names of a label set the framework knows (``"imagenet-1k"``), or None."""
        return None

    def convert(
        self,
        model: torch.nn.Module,
        key: str,
        ckpt_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
    ) -> Conversion | None:
        """A conversion for a non-head key whose shapes differ, or None (then it is an error)."""
        return None

    def keep_initialised(
        self,
        model: torch.nn.Module,
        key: str,
        ckpt_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
    ) -> str | None:
        """Why a key no rule can place should keep the model's own initialisation (the plan
        skips it with this reason), or None (then it is an error). Asked only when no user
        policy names the key."""
        return None

    def rebuild_modules(self, model: torch.nn.Module, plan: Any) -> dict[str, torch.nn.Module]:
        """Modules to put in place before loading, by name, when the framework's own loading
        replaces them (ultralytics rebuilds a class branch at the checkpoint's width). Asked after
        planning (``plan`` is the :class:`~smartload.LoadPlan`); :func:`smartload.load` swaps them
        in, plans again and puts the old ones back on any error and on a dry run."""
        return {}


class GenericAdapter(Adapter):
    """Any ``nn.Module``: its last ``nn.Linear`` is taken to be the classifier."""

    knows_heads = False

    def _classifier(self, model: torch.nn.Module) -> tuple[str, torch.nn.Linear] | None:
        import torch

        last = None
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                last = (name, module)
        return last

    def head_rules(self, model: torch.nn.Module) -> list[HeadRule]:
        found = self._classifier(model)
        if found is None:
            return []
        name, _ = found
        return [HeadRule(name=name, keys=(f"{name}.weight", f"{name}.bias"))]

    def num_classes(self, model: torch.nn.Module) -> int | None:
        found = self._classifier(model)
        return None if found is None else found[1].out_features


def _is_timm(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and "classifier" in cfg


def _is_detectron2(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("detectron2.")


def _is_torchvision_detection(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models.detection.")


def _is_ultralytics(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("ultralytics.")


def _is_yolov5(model: torch.nn.Module) -> bool:
    from .yolov5 import is_yolov5  # imports no yolov5

    return is_yolov5(model)


# (test on the model, module, class): framework adapters register here; checked in order. The
# tests must not import the framework: the adapter module does, when it is chosen.
_REGISTRY: list[tuple[Callable[[torch.nn.Module], bool], str, str]] = [
    (_is_timm, "smartload.adapters.timm", "TimmAdapter"),
    (_is_detectron2, "smartload.adapters.detectron2", "Detectron2Adapter"),
    (_is_torchvision_detection, "smartload.adapters.torchvision", "TorchvisionDetectionAdapter"),
    (_is_ultralytics, "smartload.adapters.ultralytics", "UltralyticsAdapter"),
    (_is_yolov5, "smartload.adapters.yolov5", "Yolov5Adapter"),
]


def select_adapter(model: torch.nn.Module, adapter: Adapter | None = None) -> Adapter:
    """The adapter given, else the first registered one that claims the model, else generic."""
    if adapter is not None:
        return adapter
    for claims, module, cls in _REGISTRY:
        if claims(model):
            found: Adapter = getattr(importlib.import_module(module), cls)()
            return found
    return GenericAdapter()
