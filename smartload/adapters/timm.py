"""timm classifiers: every head in ``pretrained_cfg["classifier"]``, ``label_offset``, ``in_chans``.

Chosen automatically for models that carry a timm ``pretrained_cfg``. timm itself is imported only
when a first convolution has to be adapted to another ``in_chans``: with timm's own
``adapt_input_conv``, by the rules of its ``load_pretrained``, so the result is the one timm's own
pretrained loading gives, tensor for tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
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
        found = _input_conv(model, key, ckpt_shape, model_shape)
        if not isinstance(found, _Adapt):
            return None
        in_chans, base = found.in_chans, found.base_chans

        def adapt(weight: torch.Tensor) -> torch.Tensor:
            from timm.models import adapt_input_conv

            adapted: torch.Tensor = adapt_input_conv(in_chans, weight, base_chans=base)
            return adapted

        return Conversion(f"input conv {base} → {in_chans} channels (timm adapt_input_conv)", adapt)

    def keep_initialised(
        self,
        model: torch.nn.Module,
        key: str,
        ckpt_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
    ) -> str | None:
        found = _input_conv(model, key, ckpt_shape, model_shape)
        return found if isinstance(found, str) else None


@dataclass(frozen=True)
class _Adapt:
    in_chans: int  # the model's input channels
    base_chans: int  # the checkpoint's, as pretrained_cfg["input_size"] declares them


def _input_conv(
    model: torch.nn.Module,
    key: str,
    ckpt_shape: tuple[int, ...],
    model_shape: tuple[int, ...],
) -> _Adapt | str | None:
    """What timm's ``load_pretrained`` does with an input conv whose shape differs: adapt it
    (:class:`_Adapt`), leave the model's initialisation (why, a str), or fail (None).

    Mirrors timm 1.0.31: the convs are the model's ``first_conv`` trait, the source channels
    are ``pretrained_cfg["input_size"][0]`` (not the weight's: a space-to-depth stem has 16 × 3),
    a Conv2d must satisfy ``I · in_chans · groups == source channels · in_channels``, and a
    weight ``adapt_input_conv`` cannot convert is dropped (the layer keeps its random init).
    """
    name = key.removesuffix(".weight")
    if name == key or name not in _first_convs(model):
        return None
    base = int((_cfg(model).get("input_size") or (3,))[0])
    in_chans = _in_chans(model, base)
    if in_chans == base:
        return None  # nothing to adapt: timm's own load fails on the shapes too
    from torch import nn

    module = model.get_submodule(name)
    if len(ckpt_shape) == 4 and isinstance(module, nn.Conv2d):
        if ckpt_shape[1] * in_chans * module.groups != base * module.in_channels:
            return None  # timm raises: the declared source channels do not fit this weight
    if len(ckpt_shape) == 4 and in_chans == 1 and ckpt_shape[1] > base and ckpt_shape[1] % base:
        return None  # adapt_input_conv asserts: no whole blocks of source channels to sum
    adapted = _adapted_shape(in_chans, base, ckpt_shape)
    if adapted is None:
        return (
            f"input conv: timm's adapt_input_conv cannot take {list(ckpt_shape)} from {base} "
            f"to {in_chans} channels; kept as initialised, as timm's pretrained loading does"
        )
    return _Adapt(in_chans, base) if adapted == model_shape else None


def _adapted_shape(in_chans: int, base: int, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape ``adapt_input_conv(in_chans, weight, base_chans=base)`` gives, or None where
    it raises ``NotImplementedError`` (timm then drops the weight)."""
    if len(shape) != 4:
        return None
    out, given, *kernel = shape
    if in_chans == 1:
        if given > base:  # a space-to-depth stem: each block of source channels is summed
            return (out, given // base, *kernel)
        return (out, 1, *kernel)
    return (out, in_chans, *kernel) if given == base else None


def _first_convs(model: torch.nn.Module) -> tuple[str, ...]:
    """The input convs as timm's loader finds them: the model's traits, else its cfg."""
    traits = getattr(model, "_traits", None)
    if isinstance(traits, dict) and "first_conv" in traits:
        return _names(traits["first_conv"])
    return _names(_cfg(model).get("first_conv"))


def _in_chans(model: torch.nn.Module, default: int) -> int:
    """The input channels the model was built for (``in_chans``), as ``create_model`` gave them."""
    value = getattr(model, "in_chans", None)
    if value is None:
        value = getattr(model, "_model_args", {}).get("in_chans", default)
    return int(value)
