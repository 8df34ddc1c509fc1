"""detectron2: class-aware surgery of every head, model-zoo ``.pkl``, and a trainer hook.

Chosen automatically for models built by detectron2 (their classes live in ``detectron2.*``).
detectron2 is imported lazily and only through its public API.

Head layouts (rows along dim 0 unless said):

- ``roi_heads.box_predictor[.{0,1,2}].cls_score``: K+1 rows, background last (always kept);
- ``...bbox_pred``: 4 rows per class (absent from the rules when class-agnostic: 4 rows);
- ``roi_heads.mask_head.predictor``: K rows (1 when class-agnostic);
- RetinaNet ``head.cls_score``: A*K channels, channel = a*K + k; new bias at the focal prior;
- ``sem_seg_head.predictor``: K rows, one per ``stuff_classes`` name. A SemanticSegmentor's
  only label space: it follows the class map. In PanopticFPN the stuff classes are a label space of
  their own (the class map is about the things), with "things" as row 0, always kept;
- ``roi_heads.keypoint_head.score_lowres``: keypoints along dim 1 (ConvTranspose2d).

New rows are initialised as detectron2 does: cls_score std 0.01, bbox_pred and mask predictor std
0.001, bias 0; RetinaNet's class bias -log((1 - p) / p) with p = 0.01.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

try:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.checkpoint.c2_model_loading import (
        align_and_update_state_dicts,
        convert_c2_detectron_names,
    )
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import HookBase
    from detectron2.utils.file_io import PathManager
except ImportError as exc:  # pragma: no cover - exercised only without detectron2
    raise ImportError(
        "smartload.adapters.detectron2 needs detectron2 (https://github.com/facebookresearch/"
        "detectron2; without network, see the README's set-up)"
    ) from exc

from .._normalize import leaf_shape
from .._records import ArrayRecord
from .._tensors import Materializer
from ..errors import CheckpointFormatError
from . import Adapter, HeadRule

__all__ = ["Detectron2Adapter", "SmartDetectionCheckpointer", "SmartLoadHook"]

REPORT_NAME = "smartload_report.json"
_PRIOR_PROB = 0.01
logger = logging.getLogger("smartload")


def _weight_std(module: Any, fallback: float) -> float:
    weight = getattr(module, "weight", None)
    if weight is None or weight.numel() < 2:
        return fallback
    return float(weight.detach().float().std())


class Detectron2Adapter(Adapter):
    """Head rules for GeneralizedRCNN (Faster/Mask/Cascade/Keypoint R-CNN), RetinaNet, PanopticFPN."""

    name = "detectron2"

    def __init__(self, notes: Sequence[str] = ()) -> None:
        self.notes = tuple(notes)

    def head_rules(self, model: torch.nn.Module) -> list[HeadRule]:
        rules: list[HeadRule] = []
        roi: Any = getattr(model, "roi_heads", None)
        predictor: Any = getattr(roi, "box_predictor", None)
        stages = list(predictor) if _is_module_list(predictor) else [predictor]
        for i, stage in enumerate(stages):
            if stage is None:
                continue
            prefix = "roi_heads.box_predictor" + (f".{i}" if _is_module_list(predictor) else "")
            rules.append(_rule(f"{prefix}.cls_score", background="last", std=0.01))
            num_classes = int(stage.cls_score.out_features) - 1
            if int(stage.bbox_pred.out_features) == 4 * num_classes and num_classes > 1:
                rules.append(_rule(f"{prefix}.bbox_pred", block=4, std=0.001))
        mask_head = getattr(roi, "mask_head", None)
        mask = getattr(mask_head, "predictor", None)
        if mask is not None and int(mask.out_channels) == getattr(roi, "num_classes", -1) > 1:
            rules.append(_rule("roi_heads.mask_head.predictor", std=0.001))
        keypoints = getattr(getattr(roi, "keypoint_head", None), "score_lowres", None)
        if keypoints is not None:
            rules.append(
                _rule(
                    "roi_heads.keypoint_head.score_lowres",
                    dim=1,
                    label_space="keypoints",
                    std=_weight_std(keypoints, 0.001),
                )
            )
        head: Any = getattr(model, "head", None)
        retina_classes: Any = getattr(model, "num_classes", None)
        if type(model).__name__ == "RetinaNet" and head is not None and retina_classes:
            groups = int(head.cls_score.out_channels) // int(retina_classes)
            prior = -math.log((1 - _PRIOR_PROB) / _PRIOR_PROB)
            rules.append(_rule("head.cls_score", groups=groups, std=0.01, bias=prior))
        sem_seg = _sem_seg_predictor(model)
        if sem_seg is not None:
            rules.append(_sem_seg_rule(model, sem_seg))
        return rules

    def num_classes(self, model: torch.nn.Module) -> int | None:
        for owner in (getattr(model, "roi_heads", None), model):
            value = getattr(owner, "num_classes", None)
            if isinstance(value, int):
                return value
        sem_seg = _sem_seg_predictor(model)
        if sem_seg is not None and not _has_things(model):
            return int(sem_seg.out_channels)
        return None

    def class_names(self, label_set: str) -> list[str] | None:
        """The class names of a registered dataset: ``thing_classes`` (``"coco_2017_train"``), or
        ``stuff_classes`` for a semantic-segmentation one (``"ade20k_sem_seg_train"``)."""
        if label_set not in DatasetCatalog.list() and label_set not in MetadataCatalog.list():
            return None
        metadata = MetadataCatalog.get(label_set)
        semantic = str(metadata.get("evaluator_type", "")).endswith("sem_seg")
        names = metadata.get("stuff_classes" if semantic else "thing_classes")
        return list(names) if names else None

    def prepare_checkpoint(
        self,
        model: torch.nn.Module,
        tensors: Mapping[str, Any],
        extras: Mapping[str, str],
    ) -> tuple[Mapping[str, Any], Mapping[str, str]] | None:
        """Names from detectron2's own matching heuristics, for the files that ask for them.

        detectron2 model-zoo ``.pkl`` files set ``matching_heuristics``; Caffe2/Detectron1 files
        (``{"blobs": ...}`` or a flat dict without ``__author__``) also need their names and
        heads converted (background row first → last). Both go through
        ``align_and_update_state_dicts``, fed with shapes only. The keys come from the file:
        they are checked and bounded before detectron2's code sees them, and its failures are
        :class:`CheckpointFormatError`.
        """
        caffe2 = "__author__" not in extras and all(
            isinstance(v, ArrayRecord) for v in tensors.values()
        )
        if not caffe2 and extras.get("matching_heuristics") != "True":
            return None
        _check_keys(tensors)
        originals: dict[str, str] = {}
        if caffe2:
            tensors, originals = _convert_caffe2(tensors)
        with _detectron2_logs() as said:
            aligned = _align(model, {k: _Named(k, leaf_shape(v)) for k, v in tensors.items()}, said)
        return (
            {new: tensors[old] for new, old in aligned.items()},
            {new: originals.get(old, old) for new, old in aligned.items()},
        )


# Bounds on what detectron2's name conversion is given: its cost grows with both (about 0.5 s at
# the bounds). Published Detectron1 files hold a few hundred to ~1,500 blobs, names < 80 chars.
MAX_KEYS = 10_000
MAX_KEY_LENGTH = 256
_WITHOUT_RENAMING = (
    "adapter=GenericAdapter() (from smartload.adapters) to load it without detectron2's renaming"
)
_NOT_CONVERTED = (
    "Nothing was loaded. Published detectron2 and Detectron1 files are far from this; pass "
    f"{_WITHOUT_RENAMING}, and rename={{pattern: replacement}} for its names"
)
_NOT_PUBLISHED = (
    "Nothing was loaded. The file is not a Detectron1 checkpoint as published: get the weights "
    f"from detectron2's model zoo, or pass {_WITHOUT_RENAMING}"
)


def _check_keys(tensors: Mapping[str, Any]) -> None:
    """Keys that detectron2's conversion can be run on: strings, not too many, not too long."""
    if len(tensors) > MAX_KEYS:
        raise CheckpointFormatError(
            "",
            f"{len(tensors)} tensors, more than the {MAX_KEYS} detectron2's name conversion is "
            "run on",
            _NOT_CONVERTED,
        )
    for key in tensors:
        if type(key) is not str:
            raise CheckpointFormatError(
                "",
                f"a tensor's name is a {type(key).__name__} ({key!r:.60}), not a string",
                _NOT_PUBLISHED,
            )
        if len(key) > MAX_KEY_LENGTH:
            raise CheckpointFormatError(
                "",
                f"tensor name {key[:60]!r}... is {len(key)} characters long, more than the "
                f"{MAX_KEY_LENGTH} detectron2's name conversion is run on",
                _NOT_CONVERTED,
            )


# The heads detectron2's Caffe2 conversion changes the values of (by their new names): their
# background rows dropped (box and mask predictors) or moved from first to last (cls_score).
_C2_HEADS = ("bbox_pred.", "mask_head.predictor.", "cls_score.")


def _convert_caffe2(tensors: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """detectron2's ``convert_c2_detectron_names``, run on the names (with zero-byte stand-ins
    of each tensor's rows), then on the values of the few heads whose rows it changes, once
    per array: tensors that share an array in the file share it here too."""
    blobs = {k: v for k, v in tensors.items() if not k.endswith("_momentum")}
    stand_ins = {k: _stand_in(k, v) for k, v in blobs.items()}
    with _detectron2_logs() as said:
        try:
            renamed, originals = convert_c2_detectron_names(stand_ins)
        except Exception as exc:  # detectron2's code on names from the file
            raise _conversion_error(stand_ins, exc, said) from exc
        out: dict[str, Any] = {}
        done: dict[tuple[int, str], torch.Tensor] = {}
        for new in renamed:
            old = originals[new]
            head = next((h for h in _C2_HEADS if new.startswith(h)), None)
            out[new] = blobs[old] if head is None else _head_rows(old, head, blobs[old], done)
    return out, originals


def _stand_in(key: str, leaf: ArrayRecord) -> torch.Tensor:
    """A zero-byte tensor with the rows of ``leaf`` (one for a 0-d one): what the renaming
    slices and concatenates, without the values."""
    rows = leaf.shape[0] if leaf.shape else 1
    if not all(0 <= d < 2**62 for d in leaf.shape):  # numpy allows (2**63, 0); torch does not
        raise CheckpointFormatError(
            "",
            f"tensor {key!r} has shape {list(leaf.shape)}, which torch cannot hold",
            _NOT_PUBLISHED,
        )
    return torch.empty((rows, 0))


def _head_rows(
    key: str, head: str, leaf: ArrayRecord, done: dict[tuple[int, str], torch.Tensor]
) -> torch.Tensor:
    """A head's values as detectron2's conversion makes them (its own code, on this key alone)."""
    if not leaf.shape:
        raise CheckpointFormatError(
            "",
            f"tensor {key!r} is 0-d, but detectron2 converts it as a class head (rows per class)",
            _NOT_PUBLISHED,
        )
    if (id(leaf), head) not in done:  # one array in one kind of head: the same rows
        converted, _ = convert_c2_detectron_names({key: Materializer({}).tensor(leaf)})
        done[id(leaf), head] = next(iter(converted.values()))
    return done[id(leaf), head]


def _conversion_error(
    stand_ins: Mapping[str, torch.Tensor], exc: Exception, said: list[str]
) -> CheckpointFormatError:
    """Name the key detectron2's conversion failed on: each key alone, or two that collide."""
    names: dict[str, str] = {}
    for key, value in stand_ins.items():
        try:
            (new,) = convert_c2_detectron_names({key: value})[0]
        except Exception as single:
            problem = f"{type(single).__name__}: {single}"
            return CheckpointFormatError(
                "",
                f"detectron2's Caffe2 name conversion fails on tensor {key!r} ({problem})",
                _NOT_PUBLISHED,
            )
        if new in names:
            first, second = sorted((names[new], key))
            return CheckpointFormatError(
                "",
                f"tensors {first!r} and {second!r} both become {new!r} in detectron2's Caffe2 "
                "name conversion",
                _NOT_PUBLISHED,
            )
        names[new] = key
    detail = _detail(said, exc)
    return CheckpointFormatError(
        "", f"detectron2's Caffe2 name conversion failed ({detail})", _NOT_PUBLISHED
    )


def _align(model: torch.nn.Module, named: Mapping[str, _Named], said: list[str]) -> dict[str, str]:
    """``{new name: name before}`` from ``align_and_update_state_dicts``. Only names that can
    match a model key (the whole key, or a suffix of it after a dot) are given to it: the rest
    would come back unchanged, and its matcher costs (model keys) × (names given)."""
    model_keys = {k: _Named(k, _AnyShape(v.shape)) for k, v in model.state_dict().items()}
    suffixes = {k.split(".", i)[-1] for k in model_keys for i in range(k.count(".") + 1)}
    candidates = {k: v for k, v in named.items() if k in suffixes}
    if not candidates:  # nothing to match (and detectron2's matcher fails on an empty list)
        return {k: k for k in named}
    try:
        aligned = align_and_update_state_dicts(model_keys, candidates, c2_conversion=False)
    except Exception as exc:  # detectron2's heuristics on names from the file
        detail = _detail(said, exc)
        raise CheckpointFormatError(
            "",
            f"detectron2's name matching refused the checkpoint ({detail})",
            "Nothing was loaded. Pass rename={pattern: replacement} to give the keys the model's "
            f"names, or {_WITHOUT_RENAMING}",
        ) from exc
    renamed = {new: value.key for new, value in aligned.items()}
    renamed.update({k: k for k in named if k not in candidates})
    return renamed


def _detail(said: list[str], exc: Exception) -> str:
    """What detectron2 logged before it raised (its exceptions say less), else the exception."""
    return "; ".join(m.rstrip(".") for m in said[-3:]) or f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _detectron2_logs() -> Iterator[list[str]]:
    """detectron2's matching logs at INFO a table of what smartload's report says anyway: kept
    quiet, and its errors collected to explain a failure."""
    said: list[str] = []
    handler = _Collect(said)
    quiet = logging.getLogger("detectron2.checkpoint.c2_model_loading")
    level, propagate = quiet.level, quiet.propagate
    quiet.setLevel(logging.ERROR)
    quiet.propagate = False
    quiet.addHandler(handler)
    try:
        yield said
    finally:
        quiet.removeHandler(handler)
        quiet.setLevel(level)
        quiet.propagate = propagate


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


class _AnyShape(tuple):  # type: ignore[type-arg]
    """A model shape that matches any checkpoint shape: smartload decides on shapes itself."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return tuple.__hash__(self)


class _Named:
    """A checkpoint entry as detectron2's matcher sees it: a shape, and the name it had."""

    def __init__(self, key: str, shape: tuple[int, ...]) -> None:
        self.key = key
        self.shape = shape


def _sem_seg_predictor(model: torch.nn.Module) -> Any:
    return getattr(getattr(model, "sem_seg_head", None), "predictor", None)


def _has_things(model: torch.nn.Module) -> bool:
    """Whether the model detects instances (its class map is about thing classes)."""
    return getattr(model, "roi_heads", None) is not None or type(model).__name__ == "RetinaNet"


def _sem_seg_rule(model: torch.nn.Module, predictor: Any) -> HeadRule:
    """``sem_seg_head.predictor``: one row per class of the dataset's ``stuff_classes``.

    The config's IGNORE_VALUE (255) labels pixels that carry no loss; it names no row, so a
    SemanticSegmentor's head is K plain rows and its classes are the model's classes: the class map
    picks them (by index, or by ``stuff_classes`` name; COCO's stuff-only set has "things" at 0,
    an ordinary class there). PanopticFPN's head has a label space of its own, beside the thing
    classes the class map is about: detectron2 gives every thing pixel semantic label 0 (its
    panoptic metadata's ``stuff_classes[0] == "things"``, and PanopticFPN's combining step skips
    label 0), so row 0 keeps its meaning whatever the things become: a background, always kept.
    """
    std = _weight_std(predictor, 0.001)
    if _has_things(model):
        return _rule("sem_seg_head.predictor", label_space="stuff", background="first", std=std)
    return _rule("sem_seg_head.predictor", std=std)


def _is_module_list(value: Any) -> bool:
    return isinstance(value, torch.nn.ModuleList)


def _rule(name: str, **kwargs: Any) -> HeadRule:
    return HeadRule(name=name, keys=(f"{name}.weight", f"{name}.bias"), **kwargs)


# --------------------------------------------------------------------------------------------------
# trainer integration


class SmartDetectionCheckpointer(DetectionCheckpointer):  # type: ignore[misc]
    """A ``DetectionCheckpointer`` whose initial load goes through smartload.

    Resuming from ``OUTPUT_DIR/last_checkpoint`` is left to detectron2 (same model, same keys);
    loading initial weights (``cfg.MODEL.WEIGHTS``) uses :func:`smartload.load` with
    ``load_keywords`` and writes ``smartload_report.json`` into ``save_dir``. For custom training
    loops and LazyConfig users: ``SmartDetectionCheckpointer(model, out_dir,
    load_keywords={"num_classes": 3}).load(weights)``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        load_keywords: Mapping[str, Any] | None = None,
        **checkpointables: Any,
    ) -> None:
        super().__init__(model, save_dir, **checkpointables)
        self.load_keywords = dict(load_keywords or {})
        self.smartload_report: Any = None

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        """Load initial weights through smartload (nothing for an empty path)."""
        if not path:
            return {}
        import smartload

        report_path = os.path.join(self.save_dir, REPORT_NAME) if self.save_dir else None
        self.smartload_report = smartload.load(
            self.model,
            PathManager.get_local_path(path),
            report_path=report_path,
            **self.load_keywords,
        )
        return {}

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        if resume and self.has_checkpoint():
            return super().load(self.get_checkpoint_file())  # type: ignore[no-any-return]
        return self.load(path)


class SmartLoadHook(HookBase):  # type: ignore[misc]
    """``trainer.register_hooks([SmartLoadHook(class_map=...)])``: load the initial weights
    through smartload, exactly once, on a fresh run; do nothing on a resumed one.

    ``weights`` defaults to ``cfg.MODEL.WEIGHTS``; ``load_keywords`` are those of
    :func:`smartload.load` (``num_classes`` comes from the config). Unless a ``class_map`` is
    given, classes are matched by name: the new names from ``cfg.DATASETS.TRAIN``'s metadata,
    the checkpoint's from ``source_classes=`` (names or a registered dataset such as
    ``"coco_2017_train"``), or COCO's for an 80-class checkpoint, which the report then says. The
    report goes to ``cfg.OUTPUT_DIR/smartload_report.json``, a one-line summary to the log.
    """

    def __init__(self, weights: str | None = None, **load_keywords: Any) -> None:
        self.weights = weights
        self.load_keywords = load_keywords
        self.report: Any = None
        self._trainer: Any = None

    # register_hooks sets .trainer: take over the trainer's checkpointer then, so that
    # trainer.resume_or_load(resume=False) loads through smartload, and only once.
    @property
    def trainer(self) -> Any:
        return self._trainer

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        self._trainer = trainer
        cfg = trainer.cfg
        if self.weights is not None:
            cfg.defrost()
            cfg.MODEL.WEIGHTS = self.weights
            cfg.freeze()
        old = trainer.checkpointer
        trainer.checkpointer = SmartDetectionCheckpointer(
            old.model,
            old.save_dir,
            load_keywords=_load_keywords(cfg, old.model, self.load_keywords),
            save_to_disk=old.save_to_disk,
            **old.checkpointables,
        )

    def before_train(self) -> None:
        checkpointer = self.trainer.checkpointer
        fresh = self.trainer.start_iter == 0 and checkpointer.smartload_report is None
        if fresh and self.trainer.cfg.MODEL.WEIGHTS:
            checkpointer.load(self.trainer.cfg.MODEL.WEIGHTS)
        self.report = checkpointer.smartload_report


# Where a model's class names sit in dataset metadata, and the registered dataset whose names an
# equal-count checkpoint is assumed to have: thing classes for detectors; stuff classes for a
# semantic segmentor (COCO's stuff-only set: "things" and the 53 stuff classes).
_THING_NAMES = ("thing_classes", "coco_2017_train")
_STUFF_NAMES = ("stuff_classes", "coco_2017_train_panoptic_stuffonly")


def _load_keywords(cfg: Any, model: torch.nn.Module, given: Mapping[str, Any]) -> dict[str, Any]:
    """``smartload.load`` keywords for a detectron2 config: class count, class names, adapter."""
    keywords = dict(given)
    num_classes = Detectron2Adapter().num_classes(model)
    if num_classes is None:  # no class head (an RPN): no class count, no names to match
        keywords.setdefault("adapter", Detectron2Adapter())
        return keywords
    keywords.setdefault("num_classes", num_classes)
    field, assumed_set = _THING_NAMES if _has_things(model) else _STUFF_NAMES
    notes: list[str] = []
    target = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get(field) if cfg.DATASETS.TRAIN else None
    if "class_map" not in keywords and target:
        keywords.setdefault("target_classes", list(target))
        assumed = MetadataCatalog.get(assumed_set).get(field)
        if "source_classes" not in keywords and assumed:
            if _checkpoint_classes(model, str(cfg.MODEL.WEIGHTS)) == len(assumed):
                keywords["source_classes"] = list(assumed)
                notes.append(
                    f"the checkpoint's {len(assumed)} classes were assumed to be COCO's "
                    f"({assumed_set}); pass source_classes= to say otherwise"
                )
    keywords.setdefault("adapter", Detectron2Adapter(notes))
    return keywords


def _checkpoint_classes(model: torch.nn.Module, path: str) -> int | None:
    """The class count of the checkpoint's first class head, from its structure alone."""
    if not path or not os.path.isfile(path):
        return None
    import smartload

    info = smartload.inspect(path)
    for rule in Detectron2Adapter().head_rules(model):
        shape = info.tensors.get(rule.keys[0])
        if rule.label_space == "classes" and shape is not None:
            return rule.num_classes(shape.shape[rule.dim], checkpoint=True)
    return None
