"""Hugging Face transformers: transformers' own key mapping, heads from the config's labels.

Chosen for any ``transformers.PreTrainedModel`` (transformers is imported by then; this module
adds nothing to ``import smartload``).

- **Keys**: transformers 5 renames modules (``vit.layers.0.attention.q_proj``) while checkpoints,
  its own ``save_pretrained`` included, keep the names they were published with
  (``vit.encoder.layer.0.attention.attention.query``); ``from_pretrained`` maps them with the
  conversion mapping of the installed version. This adapter renames checkpoint keys with that same
  machinery (``get_model_conversion_mapping`` + ``rename_source_key``: renamings, the legacy
  ``gamma``/``beta`` names, ``base_model_prefix`` added or dropped). A fused checkpoint tensor that
  transformers splits (``Chunk``/``Split``: DINOv2's SwiGLU ``weights_in``) is split by the
  converter itself when loading; tensors that transformers fuses (several checkpoint tensors into
  one: MoE experts) are refused with what to do. Weights transformers ties (one parameter under
  two names, saved once) are loaded through the saved name.
- **Heads** (rows = ``config.num_labels``, or that + 1 with the last row "no object" / the padding
  row, always kept): ``classifier`` (image, sequence and token classification; ResNet/RegNet/BiT's
  ``classifier.1``), DeiT's ``cls_classifier`` and ``distillation_classifier`` (LeViT's
  ``classifier_distill``), DETR/YOLOS/Conditional DETR ``class_labels_classifier`` (YOLOS: the
  MLP's last layer), Deformable DETR, RT-DETR (v1, v2) and D-FINE ``class_embed.{i}`` (one per
  decoder layer, also under ``model.decoder``), ``model.enc_score_head`` and
  ``model.denoising_class_embed``, MaskFormer/Mask2Former ``class_predictor``,
  SegFormer/UperNet/BEiT ``decode_head.classifier`` and ``auxiliary_head.classifier``, DPT
  ``head.head`` and ``auxiliary_head.head``, and the decoder models' ``score``.
- **New rows** start as the model's ``_init_weights`` starts its head: normal with the config's
  ``initializer_range`` (``init_std`` for the DETR family), bias 0; RT-DETR, RT-DETRv2, D-FINE and
  DEIMv2 score heads with xavier's spread and the focal prior bias ``-log((1 - p) / p)``,
  ``p = initializer_bias_prior_prob or 1 / (num_labels + 1)``; ResNet/RegNet/BiT's Linear with
  torch's default spread (``1 / sqrt(3 · fan_in)``; its bias 0, where torch draws it uniformly).
- **Class names**: ``config.json``'s ``id2label`` beside the checkpoint and ``model.config.id2label``
  are the default ``source_classes`` and ``target_classes`` (:meth:`TransformersAdapter.
  default_classes`), unless they are the generic ``LABEL_0``, ``LABEL_1`` ...
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._normalize import leaf_dtype, leaf_shape
from .._tensors import torch_dtype
from ..errors import IncompatibleCheckpointError, InvalidArgumentError
from . import Adapter, ClassNames, Conversion, HeadRule

__all__ = ["TransformersAdapter", "build_model", "is_transformers"]

# Modules holding one row per label, by name (the whole name). A ModuleList holds one head per
# decoder layer; any other container's last layer is the head (YOLOS' MLP, DPT's Sequential).
_HEADS = re.compile(
    r"classifier(\.\d+)?|cls_classifier|distillation_classifier|classifier_distill"
    r"|class_labels_classifier"
    r"|class_predictor|score|(model\.decoder\.)?class_embed|model\.enc_score_head"
    r"|model\.denoising_class_embed|(decode_head|auxiliary_head)\.classifier"
    r"|(head|auxiliary_head)\.head"
)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
# Their _init_weights give score heads xavier_uniform and the focal prior bias.
_FOCAL = frozenset({"rt_detr", "rt_detr_v2", "d_fine", "deimv2"})
_FOCAL_HEADS = re.compile(r"(.*\.)?(class_embed\.\d+|enc_score_head|denoising_class_embed)")
# Their _init_weights give a Linear torch's own init (kaiming_uniform, a=sqrt(5)).
_TORCH_LINEAR = frozenset({"resnet", "regnet", "bit"})
# Weight files that sit beside a config.json in a save_pretrained folder.
_HF_WEIGHTS = re.compile(r"(pytorch_)?model(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
_GENERIC_LABEL = re.compile(r"LABEL_(\d+)")
_MAX_CONFIG_BYTES = 64 << 20


def is_transformers(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (imports nothing: if it is one,
    transformers is imported already)."""
    found = sys.modules.get("transformers.modeling_utils")
    return found is not None and isinstance(model, found.PreTrainedModel)


class TransformersAdapter(Adapter):
    """Key mapping, heads, init and class names of ``transformers`` models."""

    name = "transformers"

    def __init__(self) -> None:
        # model key → how transformers splits its checkpoint tensor (set by prepare_checkpoint)
        self._splits: dict[str, _Split] = {}

    # heads -------------------------------------------------------------------------------------

    def head_rules(self, model: nn.Module) -> list[HeadRule]:
        labels = _num_labels(model)
        rules = []
        for name, layer in _head_layers(model):
            rows = _rows(layer)
            if labels is None or rows not in (labels, labels + 1):
                continue
            std, bias = _init(model, name, layer)
            rules.append(
                HeadRule(
                    name=name,
                    keys=(f"{name}.weight", f"{name}.bias"),
                    background="last" if rows == labels + 1 else "none",
                    std=std,
                    bias=bias,
                )
            )
        return rules

    def num_classes(self, model: nn.Module) -> int | None:
        return _num_labels(model) if self.head_rules(model) else None

    def keep_initialised(
        self,
        model: nn.Module,
        key: str,
        ckpt_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
    ) -> str | None:
        labels = _num_labels(model)
        if key.endswith("criterion.empty_weight") and labels is not None:
            if model_shape == (labels + 1,) and len(ckpt_shape) == 1:
                return (
                    "the loss's class weights: kept as the model made them for its "
                    f"{labels} classes (1 each, eos_coef for 'no object')"
                )
        return None

    # class names -------------------------------------------------------------------------------

    def default_classes(self, model: nn.Module, checkpoint: Any) -> ClassNames:
        """``config.json``'s ``id2label`` (in the checkpoint's folder, or beside its
        ``model.safetensors``/``pytorch_model.bin``) and ``model.config.id2label``, each None when
        absent or the generic ``LABEL_{i}``."""
        notes: list[str] = []
        source = None
        path = _config_json(checkpoint)
        if path is not None:
            try:
                source = _labels(_read_json(path).get("id2label"))
            except (OSError, ValueError, AttributeError) as exc:
                notes.append(f"{path}: not read ({exc}); the checkpoint's class names are unknown")
        target = _labels(getattr(getattr(model, "config", None), "id2label", None))
        return ClassNames(
            source=source,
            target=target,
            source_from=f"{path}'s id2label" if path else "",
            target_from="model.config.id2label",
            notes=tuple(notes),
        )

    # keys --------------------------------------------------------------------------------------

    def prepare_checkpoint(
        self,
        model: nn.Module,
        tensors: Mapping[str, Any],
        extras: Mapping[str, str],
    ) -> tuple[Mapping[str, Any], Mapping[str, str]] | None:
        """Checkpoint keys renamed as ``from_pretrained`` renames them, in its order."""
        self._splits = {}
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
        except ModuleNotFoundError:  # transformers 4: checkpoints carry the modules' own names
            return None
        try:
            from transformers.core_model_loading import (
                WeightConverter,
                WeightRenaming,
                dot_natural_key,
                rename_source_key,
            )
        except ImportError as exc:
            raise ImportError(
                f"smartload's transformers adapter uses transformers' key mapping ({exc}); it "
                "was tested with transformers 5.24. Pass adapter=GenericAdapter() (from "
                "smartload.adapters) to load without it"
            ) from exc
        hf_model: Any = model  # a PreTrainedModel (is_transformers)
        transforms = get_model_conversion_mapping(hf_model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        model_keys: dict[str, Any] = dict.fromkeys(model.state_dict(keep_vars=True), True)
        prefix = getattr(model, "base_model_prefix", None)
        out: dict[str, Any] = {}
        originals: dict[str, str] = {}
        fused: dict[str, list[tuple[str, str]]] = {}  # first target → (checkpoint key, pattern)
        for key in sorted(tensors, key=dot_natural_key):
            new, pattern = rename_source_key(key, renamings, converters, prefix, model_keys)
            if new not in model_keys and key in model_keys:  # renamed away from a match: keep it
                new, pattern = rename_source_key(key, [], [], prefix, model_keys)
            if pattern is not None:
                fused.setdefault(new, []).append((key, pattern))
            elif new not in out:
                out[new], originals[new] = tensors[key], key
            elif key not in out:  # two keys for one: the first wins, as in from_pretrained
                out[key], originals[key] = tensors[key], key  # (the other one goes unused)
        refused: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]] = []
        unsplit: list[tuple[str, str]] = []  # (checkpoint key, pattern) of what is refused
        for first, group in fused.items():
            converter = by_pattern[group[0][1]]
            if len(group) != 1 or len(converter.source_patterns) != 1:
                refused.append((first, None, _shape(model, first)))
                unsplit.extend(group)
                continue
            key, pattern = group[0]
            split = _Split(model, converter, first, key, pattern)
            try:
                targets = split.targets(leaf_shape(tensors[key]), leaf_dtype(tensors[key]))
            except Exception:  # an operation that needs the values (transformers' code)
                refused.append((first, None, _shape(model, first)))
                unsplit.append((key, pattern))
                continue
            for target, shape in targets.items():
                if target not in model_keys:
                    continue
                if shape == leaf_shape(tensors[key]):  # the plan would copy it unconverted
                    refused.append((target, shape, _shape(model, target)))
                    unsplit.append((key, pattern))
                    continue
                out[target], originals[target] = tensors[key], key
                self._splits[target] = split
        if refused:
            raise IncompatibleCheckpointError(refused, _fused_hint(unsplit, by_pattern))
        _alias_tied(model, out, originals)
        if all(originals.get(k) == k for k in out) and len(out) == len(tensors):
            return None  # nothing renamed
        return out, originals

    def convert(
        self,
        model: nn.Module,
        key: str,
        ckpt_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
    ) -> Conversion | None:
        split = self._splits.get(key)
        if split is None or split.shapes.get(key) != model_shape:
            return None
        return Conversion(split.reason, split.taker(key))


def _fused_hint(unsplit: list[tuple[str, str]], by_pattern: Mapping[str, Any]) -> str:
    ops = sorted({type(op).__name__ for _, p in unsplit for op in by_pattern[p].operations})
    keys = sorted({key for key, _ in unsplit})
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return (
        f"transformers makes these when loading, with {', '.join(ops)}, from checkpoint tensors "
        f"({shown}); the transformers adapter plans from shapes, and only renames keys or splits "
        "one tensor into several of other shapes. Nothing was loaded. Load this checkpoint with "
        "from_pretrained, or a state dict saved from the model itself (its keys load as they are)"
    )


class _Split:
    """One checkpoint tensor that a transformers converter turns into several model tensors
    (``Chunk``, ``Split``): the converter itself runs on the real tensor when loading."""

    def __init__(
        self, model: nn.Module, converter: Any, first: str, key: str, pattern: str
    ) -> None:
        self.model = model
        self.converter = converter
        self.first = first  # the first target's full name, as from_pretrained names the layer
        self.key = key
        self.pattern = pattern
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        converter = copy.deepcopy(self.converter)  # it collects tensors: one copy per call
        converter.add_tensor(self.first, self.key, self.pattern, tensor)
        made = converter.convert(self.first, model=self.model, config=self.model.config)
        return {k: v[0] if isinstance(v, list) else v for k, v in made.items()}

    def targets(self, shape: tuple[int, ...], dtype: str) -> dict[str, tuple[int, ...]]:
        """Each target's shape: the converter run on a meta stand-in (no data read)."""
        stand_in = torch.empty(shape, dtype=torch_dtype(dtype), device="meta")
        self.shapes = {k: tuple(v.shape) for k, v in self.run(stand_in).items()}
        return self.shapes

    def taker(self, target: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda tensor: self.run(tensor)[target]

    @property
    def reason(self) -> str:
        ops = ", ".join(type(op).__name__ for op in getattr(self.converter, "operations", ()))
        return f"split from {self.key} by transformers ({ops}: {len(self.shapes)} tensors)"


def _alias_tied(model: nn.Module, out: dict[str, Any], originals: dict[str, str]) -> None:
    """Weights transformers ties (one parameter, two names; ``save_pretrained`` keeps one) are
    loaded through the name the checkpoint has, as ``from_pretrained`` ties them."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        for have, missing in ((source, target), (target, source)):
            if have in out and missing not in out and _same(model, have, missing):
                out[missing], originals[missing] = out[have], originals[have]


def _same(model: nn.Module, a: str, b: str) -> bool:
    first, second = _tensor(model, a), _tensor(model, b)
    return first is not None and first is second


def _tensor(model: nn.Module, key: str) -> Any:
    owner, _, name = key.rpartition(".")
    try:
        return getattr(model.get_submodule(owner), name, None)
    except AttributeError:
        return None


def _shape(model: nn.Module, key: str) -> tuple[int, ...] | None:
    found = _tensor(model, key)
    return tuple(found.shape) if isinstance(found, torch.Tensor) else None


# heads -----------------------------------------------------------------------------------------


def _num_labels(model: nn.Module) -> int | None:
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    return labels if isinstance(labels, int) else None


def _head_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of each head layer, in the model's order; shared modules under each name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not _HEADS.fullmatch(name):
            continue
        if isinstance(module, nn.ModuleList):
            layers = [(f"{name}.{i}", m) for i, m in enumerate(module) if isinstance(m, _LAYERS)]
        elif isinstance(module, _LAYERS):
            layers = [(name, module)]
        else:
            inner = module.named_modules(remove_duplicate=False)
            layers = [(f"{name}.{n}", m) for n, m in inner if isinstance(m, _LAYERS)][-1:]
        found.update(layers)
    return list(found.items())


def _rows(layer: nn.Module) -> int:
    weight = layer.weight
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else -1


def _init(model: nn.Module, name: str, layer: nn.Module) -> tuple[float, float]:
    """(std, bias) of the model's own init of this head, as its ``_init_weights`` gives them."""
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    weight: Any = layer.weight
    shape = tuple(weight.shape)
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    if model_type in _FOCAL and _FOCAL_HEADS.fullmatch(name):
        labels = _num_labels(model) or 1
        prior = getattr(config, "initializer_bias_prior_prob", None) or 1 / (labels + 1)
        return math.sqrt(2 / (fan_in + fan_out)), -math.log((1 - prior) / prior)
    if model_type in _TORCH_LINEAR and isinstance(layer, nn.Linear):
        return 1 / math.sqrt(3 * fan_in), 0.0
    return _base_std(config), 0.0


def _base_std(config: Any) -> float:
    """The std ``PreTrainedModel._init_weights`` draws Linear, Conv and Embedding weights with."""
    if hasattr(config, "initializer_range"):
        return float(config.initializer_range or 0.02)
    if hasattr(config, "init_std"):
        return float(config.init_std)
    if hasattr(config, "initializer_factor"):
        return float(config.initializer_factor)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    return float(getattr(text, "initializer_range", 0.02))


# class names -----------------------------------------------------------------------------------


def _config_json(checkpoint: Any) -> str | None:
    """The ``config.json`` of a ``save_pretrained`` folder given as the checkpoint, or beside
    its weight files; None for anything else."""
    if not isinstance(checkpoint, str | os.PathLike):
        return None
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        found = os.path.join(path, "config.json")
    elif _HF_WEIGHTS.fullmatch(os.path.basename(path)):
        found = os.path.join(os.path.dirname(path), "config.json")
    else:
        return None
    return found if os.path.isfile(found) else None


def _read_json(path: str) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError (or OSError) for anything else, a hostile file's
    included: too large, not UTF-8 (UnicodeDecodeError), malformed, nested too deeply."""
    with open(path, "rb") as f:
        data = f.read(_MAX_CONFIG_BYTES + 1)
    if len(data) > _MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {_MAX_CONFIG_BYTES >> 20} MB")
    try:
        found = json.loads(data)
    except RecursionError:  # ``[`` nested 100,000 deep: json recurses once per level
        raise ValueError("nested too deeply to be a config") from None
    if not isinstance(found, dict):
        raise ValueError("not a JSON object")
    return found


def _labels(id2label: Any) -> list[str] | None:
    """The names of ``id2label`` (keys 0..n-1, as ints or strings), or None when absent,
    malformed or generic (``LABEL_0``, ``LABEL_1`` ...: transformers' names for no names)."""
    if not isinstance(id2label, Mapping) or not id2label:
        return None
    try:
        by_index = {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    names = [by_index.get(i) for i in range(len(by_index))]
    if not all(isinstance(n, str) for n in names):
        return None
    listed = [str(n) for n in names]
    if all((m := _GENERIC_LABEL.fullmatch(n)) and int(m[1]) == i for i, n in enumerate(listed)):
        return None
    return listed


# the command line ------------------------------------------------------------------------------


def build_model(spec: str, num_classes: int | None) -> nn.Module:
    """``--model hf:SPEC``: ``CONFIG_DIR`` (a ``save_pretrained`` folder, or its
    ``config.json``; the class is the first of its ``architectures``), ``CLASS`` (a transformers
    model class with its default configuration: the architecture's reference size), or
    ``CLASS:CONFIG_DIR``. ``num_classes`` sets ``num_labels``. Built on the meta device (no
    memory for the weights, nothing initialised), or on the CPU where that fails."""
    import transformers

    name, _, folder = spec.partition(":")
    if not name.isidentifier() or (not folder and os.path.exists(spec)):
        name, folder = "", spec  # a folder (or its config.json)
    if folder:
        if not os.path.exists(folder):
            raise InvalidArgumentError(f"--model hf:{spec}: {folder} does not exist")
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        if not name:
            names = getattr(config, "architectures", None) or []
            if not names:
                raise InvalidArgumentError(
                    f"--model hf:{spec}: its config.json names no architectures; "
                    "give the class: hf:CLASS:CONFIG_DIR"
                )
            name = str(names[0])
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise InvalidArgumentError(
            f"--model hf:{spec}: {name!r} is not a transformers model class "
            "(e.g. ViTForImageClassification)"
        )
    if not folder:
        default: Any = cls.config_class
        config = default()
    if num_classes is not None:
        config.num_labels = num_classes
    try:
        with torch.device("meta"):
            model: nn.Module = cls(config)
    except Exception:  # some models compute values in __init__: build them for real
        model = cls(config)
    return model
