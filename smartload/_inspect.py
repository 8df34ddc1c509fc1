"""``smartload.inspect``: what a checkpoint holds, from its structure alone. No torch import."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._dcp import unscanned_items
from ._formats import read
from ._module_tree import ModuleTree
from ._normalize import choose_state_dict, describe_extras, leaf_dtype, leaf_shape
from ._records import DTYPE_ITEMSIZE, ChunkedRecord, TensorRecord
from ._unpickler import inert_globals, unknown_globals

__all__ = ["CheckpointInfo", "TensorInfo", "Verdict", "inspect"]

# SAFE: every global the file names is known to be data; UNKNOWN: it names globals smartload does
# not know (kept inert; nothing was run); UNSAFE: it names a known-dangerous callable. An UNSAFE
# file raises UnsafeCheckpointError, so a CheckpointInfo is SAFE or UNKNOWN.
Verdict = Literal["SAFE", "UNKNOWN", "UNSAFE"]

# Keys that are classifier/detector heads in the frameworks users load from:
# (pattern, rows the background class adds, rows per class, what it is).
_D2_BOX = r"(^|\.)roi_heads\.box_predictor\.(\d+\.)?cls_score\.weight$"
_CLASSIFIER = r"(^|\.)(fc|classifier|head|head\.fc|heads\.head|last_linear|head_dist)\.weight$"
_HEAD_PATTERNS: tuple[tuple[str, int, int, str], ...] = (
    (_D2_BOX, 1, 1, "detectron2 (background last)"),
    (r"^head\.cls_score\.weight$", 0, 9, "detectron2 RetinaNet (9 anchors assumed)"),
    (_CLASSIFIER, 0, 1, "classifier"),
    (r"(^|\.)classifier\.\d+\.weight$", 0, 1, "classifier"),
    (r"^model\.\d+\.(one2one_)?cv3\.0\.2\.weight$", 0, 1, "ultralytics Detect class branch"),
    (r"^model\.\d+\.linear\.weight$", 0, 1, "ultralytics Classify"),
)


_YOLOV5_HEAD = re.compile(r"^(model\.\d+)\.m\.0\.weight$")


def _anchor_head(key: str, info: TensorInfo, tensors: Mapping[str, TensorInfo]) -> HeadGuess | None:
    """YOLOv5's anchor head (``model.24.m.0``): per anchor (``model.24.anchors`` is [levels,
    anchors, 2]) 4 box rows, an objectness row, the classes, then a Segment head's mask rows (as
    many as its ``proto`` makes)."""
    found = _YOLOV5_HEAD.match(key)
    anchors = tensors.get(f"{found.group(1)}.anchors") if found else None
    if found is None or anchors is None or len(anchors.shape) != 3 or len(info.shape) != 4:
        return None
    proto = tensors.get(f"{found.group(1)}.proto.cv3.conv.weight")
    masks = proto.shape[0] if proto is not None and proto.shape else 0
    per_anchor, rest = divmod(info.shape[0], anchors.shape[1]) if anchors.shape[1] else (0, 1)
    classes = per_anchor - 5 - masks
    if rest or classes < 1:
        return None
    kind = "yolov5 Segment" if masks else "yolov5 Detect"
    return HeadGuess(key, info.shape[0], classes, f"{kind} ({anchors.shape[1]} anchors)")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]  # global, for a tensor saved in chunks (DCP)
    dtype: str
    contiguous: bool = True
    chunks: int = 1  # the pieces it is stored in (DCP: one per saving rank, or none if empty)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE.get(self.dtype, 1)


@dataclass(frozen=True)
class HeadGuess:
    key: str
    rows: int
    num_classes: int
    kind: str


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's structure. Reading it reads no tensor data and runs nothing from the file."""

    path: str
    format: str
    state_dict_path: tuple[str, ...]
    tensors: Mapping[str, TensorInfo]
    other_state_dicts: tuple[tuple[str, ...], ...] = ()
    extras: Mapping[str, str] = field(default_factory=dict)
    globals: tuple[str, ...] = ()
    inert_globals: tuple[str, ...] = ()
    unknown_globals: tuple[str, ...] = ()  # inert globals not known to be data
    # DCP bytes items whose pickles were not walked to their end: what they name is unknown
    unscanned_items: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    heads: tuple[HeadGuess, ...] = ()
    shared_storages: int = 0  # storages that more than one tensor views
    module_tree: ModuleTree | None = None  # a whole-model pickle's modules (never executed)

    @property
    def verdict(self) -> Verdict:
        return "UNKNOWN" if self.unknown_globals or self.unscanned_items else "SAFE"

    @property
    def verdict_reason(self) -> str:
        """The verdict in words, naming what an UNKNOWN file names."""
        if self.verdict == "SAFE":
            return "every global the file names is known to be data; nothing in it can run"
        reasons = []
        if self.unknown_globals:
            n = len(self.unknown_globals)
            shown = ", ".join(self.unknown_globals[:8]) + (f", ... {n - 8} more" if n > 8 else "")
            reasons.append(
                f"names {n} global{'s' if n > 1 else ''} smartload does not know ({shown}); "
                "nothing was run; `torch.load` without weights_only would import them"
            )
        if self.unscanned_items:
            n = len(self.unscanned_items)
            shown = ", ".join(self.unscanned_items[:8]) + (f", ... {n - 8} more" if n > 8 else "")
            reasons.append(
                f"{n} bytes item{'s' if n > 1 else ''} not scanned to the end ({shown}): what "
                "they name is unknown; nothing was run; dcp.load would unpickle them"
            )
        return "; ".join(reasons)

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        return dict(sorted(Counter(t.dtype for t in self.tensors.values()).items()))

    @property
    def non_contiguous(self) -> list[str]:
        return [k for k, t in self.tensors.items() if not t.contiguous]

    @property
    def num_chunks(self) -> int:
        """The pieces the tensors are stored in (as many as tensors, but for DCP directories)."""
        return sum(t.chunks for t in self.tensors.values())

    def to_dict(self) -> dict[str, Any]:
        out = {
            "path": self.path,
            "format": self.format,
            "safe": True,  # nothing hostile: the verdict is SAFE or UNKNOWN
            "verdict": self.verdict,
            "unknown_globals": list(self.unknown_globals),
            "state_dict_path": list(self.state_dict_path),
            "other_state_dicts": [list(p) for p in self.other_state_dicts],
            "num_tensors": self.num_tensors,
            "num_params": self.num_params,
            "nbytes": self.nbytes,
            "dtypes": self.dtypes,
            "heads": [vars(h) for h in self.heads],
            "extras": dict(self.extras),
            "globals": list(self.globals),
            "inert_globals": list(self.inert_globals),
            "metadata": dict(self.metadata),
            "shared_storages": self.shared_storages,
            "module_tree": self.module_tree.to_dict() if self.module_tree is not None else None,
            "non_contiguous": self.non_contiguous,
            "tensors": {k: self._tensor_dict(t) for k, t in self.tensors.items()},
        }
        if self.format == "dcp":
            out["num_chunks"] = self.num_chunks
            out["unscanned_items"] = list(self.unscanned_items)
        return out

    def _tensor_dict(self, t: TensorInfo) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(t.shape), "dtype": t.dtype}
        if self.format == "dcp":
            out["chunks"] = t.chunks
        return out


def inspect(
    path: str | os.PathLike[str],
    *,
    ema: bool = False,
    state_dict_path: Iterable[str] | None = None,
) -> CheckpointInfo:
    """Describe the checkpoint at ``path`` without reading tensor data or running anything.

    ``.verdict`` is SAFE when every global the file names is known to be data, UNKNOWN when
    some are not (``.unknown_globals``; kept inert, nothing run). Raises
    :class:`UnsafeCheckpointError` (``.globals`` lists every offending global) for a hostile
    file, the UNSAFE verdict, ahead of anything else wrong with it, and
    :class:`CheckpointFormatError` for one that cannot be read.
    """
    raw = read(path, symbolic=True)
    choice = choose_state_dict(
        raw.path,
        raw.tree,
        ema=ema,
        state_dict_path=tuple(state_dict_path) if state_dict_path is not None else None,
        describing=not ema and state_dict_path is None,
    )
    sd_path, leaves, others, module = choice.path, choice.tensors, choice.others, choice.module
    tensors = {
        key: TensorInfo(
            leaf_shape(leaf),
            leaf_dtype(leaf),
            leaf.is_contiguous() if isinstance(leaf, TensorRecord) else True,
            len(leaf.chunks) if isinstance(leaf, ChunkedRecord) else 1,
        )
        for key, leaf in leaves.items()
    }
    storages = Counter(
        leaf.storage.key for leaf in leaves.values() if isinstance(leaf, TensorRecord)
    )
    return CheckpointInfo(
        path=raw.path,
        format=raw.format,
        state_dict_path=sd_path,
        tensors=tensors,
        other_state_dicts=others,
        extras=describe_extras(raw.tree, (sd_path, *others)),
        globals=tuple(raw.globals),
        # a DCP .metadata names its own allowlist only: each a builder, none an inert stand-in
        inert_globals=() if raw.format == "dcp" else tuple(inert_globals(raw.globals)),
        unknown_globals=tuple(unknown_globals(raw.globals)),
        unscanned_items=tuple(unscanned_items(raw.tree)) if raw.format == "dcp" else (),
        metadata=raw.metadata,
        heads=tuple(_guess_heads(tensors)),
        shared_storages=sum(1 for n in storages.values() if n > 1),
        module_tree=module,
    )


def _guess_heads(tensors: Mapping[str, TensorInfo]) -> list[HeadGuess]:
    """Keys named like class heads. A layer of one output is not one, whatever its name: it
    regresses a value (or scores one logit), and "1 class" would invite a wrong class map."""
    out = []
    for key, info in tensors.items():
        anchor_head = _anchor_head(key, info, tensors)
        if anchor_head is not None:
            out.append(anchor_head)
            continue
        for pattern, background, per_class, kind in _HEAD_PATTERNS:
            if re.search(pattern, key) and len(info.shape) >= 2:
                rows = info.shape[0]
                if rows >= 2:
                    out.append(HeadGuess(key, rows, (rows - background) // per_class, kind))
                break
    return out
