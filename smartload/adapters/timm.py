"""timm classifiers: every head in ``pretrained_cfg["classifier"]``, ``label_offset``, ``in_chans``.

Chosen automatically for models that carry a timm ``pretrained_cfg``. timm itself is imported only
when a first convolution has to be adapted to another ``in_chans`` (with timm's own
``adapt_input_conv``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import Adapter, Conversion, HeadRule

if TYPE_CHECKING:
    import torch

__all__ = ["TimmAdapter"]


def _cfg(model: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None)
    return cfg if isinstance(cfg, dict) else {}


def _names(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class TimmAdapter(Adapter):
    """Heads from ``pretrained_cfg["classifier"]`` (a name or a tuple: DeiT's ``head_dist``)."""

    name = "timm"

    def _heads(self, model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        """(name, weight) of each classifier that exists in this model."""
        found = []
        for name in _names(_cfg(model).get("classifier")):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue  # reset_classifier(0) and some variants drop a head
            weight = getattr(module, "weight", None)
            if weight is not None:
                found.append((name, weight))
        return found

    def head_rules(self, model: torch.nn.Module) -> list[HeadRule]:
        offset = int(_cfg(model).get("label_offset") or 0)
        rules = []
        for name, weight in self._heads(model):
            weight = weight.detach()
            # New rows follow the model's own head init: a zero-initialised head stays zero, a
            # trunc_normal(.02) one gets std .02, a default Linear its kaiming-uniform std.
            std = float(weight.float().std()) if weight.numel() > 1 else 0.01
            rules.append(
                HeadRule(name=name, keys=(f"{name}.weight", f"{name}.bias"), std=std, offset=offset)
            )
        return rules

    def num_classes(self, model: torch.nn.Module) -> int | None:
        heads = self._heads(model)
        return int(heads[0][1].shape[0]) if heads else None

    def class_names(self, label_set: str) -> list[str] | None:
        """ImageNet label sets, by timm's ``ImageNetInfo``: the first name of each class."""
        from timm.data.imagenet_info import ImageNetInfo

        subset = "imagenet-1k" if label_set == "imagenet" else label_set
        try:
            info = ImageNetInfo(subset)
        except (AssertionError, ValueError, KeyError, FileNotFoundError):
            return None
        return [d.split(",")[0].strip() for d in info.label_descriptions()]

    def convert(
        self,
        model: torch.nn.Module,
        key: str,
        ckpt_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
    ) -> Conversion | None:
        first_convs = {f"{name}.weight" for name in _names(_cfg(model).get("first_conv"))}
        if (
            key not in first_convs
            or len(ckpt_shape) != 4
            or (ckpt_shape[0], *ckpt_shape[2:]) != (model_shape[0], *model_shape[2:])
        ):
            return None
        in_chans = model_shape[1]

        def adapt(weight: torch.Tensor) -> torch.Tensor:
            from timm.models import adapt_input_conv

            adapted: torch.Tensor = adapt_input_conv(in_chans, weight, base_chans=ckpt_shape[1])
            return adapted

        return Conversion(
            f"input conv {ckpt_shape[1]} → {in_chans} channels (timm adapt_input_conv)", adapt
        )
