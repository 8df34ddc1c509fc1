"""Framework adapters: head rules for a model family, chosen from the model.

An adapter is data for the planner: which model keys form class-count heads (:class:`HeadRule`),
and how many classes the model has. Framework adapters live in ``smartload/adapters/<name>.py``
and import their framework lazily; the core never imports them unless the model asks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._heads import HeadRule

if TYPE_CHECKING:
    import torch

__all__ = ["Adapter", "ClassNames", "Conversion", "GenericAdapter", "HeadRule", "select_adapter"]


@dataclass(frozen=True)
class Conversion:
    """How an adapter turns a checkpoint tensor into the model's shape (not a head change)."""

    reason: str  # for the report: "input conv 3 → 1 channels (timm adapt_input_conv)"
    fn: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClassNames:
    """Class names the framework records beside the weights: the defaults of ``source_classes``
    (the checkpoint's) and ``target_classes`` (the model's), None where unknown."""

    source: Sequence[str] | None = None
    target: Sequence[str] | None = None
    source_from: str = ""  # where they were read, for the report ("folder/config.json's id2label")
    target_from: str = ""
    notes: tuple[str, ...] = ()


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

    def default_classes(self, model: torch.nn.Module, checkpoint: Any) -> ClassNames:
        """The checkpoint's and the model's class names where the framework records them
        (transformers: ``config.json``'s and ``model.config``'s ``id2label``)."""
        return ClassNames()

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


def _is_transformers(model: torch.nn.Module) -> bool:
    from .transformers import is_transformers  # imports no transformers

    return is_transformers(model)


# (test on the model, module, class): framework adapters register here; checked in order. The
# tests must not import the framework: the adapter module does, when it is chosen.
_REGISTRY: list[tuple[Callable[[torch.nn.Module], bool], str, str]] = [
    (_is_timm, "smartload.adapters.timm", "TimmAdapter"),
    (_is_detectron2, "smartload.adapters.detectron2", "Detectron2Adapter"),
    (_is_torchvision_detection, "smartload.adapters.torchvision", "TorchvisionDetectionAdapter"),
    (_is_ultralytics, "smartload.adapters.ultralytics", "UltralyticsAdapter"),
    (_is_yolov5, "smartload.adapters.yolov5", "Yolov5Adapter"),
    (_is_transformers, "smartload.adapters.transformers", "TransformersAdapter"),
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


def default_classes(
    adapter: Adapter,
    model: torch.nn.Module,
    checkpoint: Any,
    source_classes: Any,
    target_classes: Sequence[str] | None,
    class_map: Any,
) -> tuple[Any, Sequence[str] | None, tuple[str, ...]]:
    """``source_classes`` and ``target_classes`` with the adapter's defaults filled in, and notes
    saying so. The model's names are used only with a checkpoint's to match them to, when no
    class map is given and the two differ (the same names in the same order: nothing to map)."""
    if source_classes is not None and (target_classes is not None or class_map is not None):
        return source_classes, target_classes, ()
    found = adapter.default_classes(model, checkpoint)
    notes = list(found.notes)
    source = source_classes if source_classes is not None else found.source
    if (
        target_classes is None
        and class_map is None
        and found.target is not None
        and isinstance(source, Sequence)
        and not isinstance(source, str)
        and list(found.target) != list(source)
        and len(found.target) == adapter.num_classes(model)
    ):
        target_classes = list(found.target)
        notes.append(
            f"class names of the model ({len(target_classes)}) from {found.target_from}: the "
            "rows of the classes the checkpoint names too are kept, by name"
        )
    if source_classes is None and found.source is not None:
        source_classes = list(found.source)
        if target_classes is not None or class_map is not None:  # used: say where they came from
            notes.insert(
                0, f"class names of the checkpoint ({len(source_classes)}) from {found.source_from}"
            )
    return source_classes, target_classes, tuple(notes)
