"""Head layouts and class maps, as data. No torch import.

A :class:`HeadRule` says which model keys form a class-count head and how their rows are laid out
along the class dimension; :func:`source_rows` turns a class map into, for every row of the new
head, the checkpoint row it takes (or None for a row to initialise).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError

__all__ = ["HeadRule", "class_map_by_names", "resolve_class_map", "source_rows"]

ClassMap = Sequence[int | str | None] | Mapping[int, int | str | None]


@dataclass(frozen=True)
class HeadRule:
    """A class-count head.

    Rows along ``dim`` are, for ``groups`` groups (anchors), ``block`` rows per class (4 for box
    deltas), plus a background class of ``block`` rows first or last (``background``): row
    ``g*K*block + k*block + j``, shifted by ``block`` when the background comes first. With
    ``background_per_group`` every group has its own background rows (torchvision's RetinaNet and
    SSD: channel ``a*(K+1) + k``, class 0 the background). ``group_lead`` and ``group_trail`` rows
    of no class open and close every group and are always kept (YOLOv5's anchor blocks: 4 box
    rows and an objectness row first, a Segment head's mask coefficients last).
    """

    name: str  # the head's module, for the report ("fc", "roi_heads.box_predictor.cls_score")
    keys: tuple[str, ...]  # glob patterns over model keys
    dim: int = 0
    block: int = 1
    groups: int = 1
    background: str = "none"  # "none" | "first" | "last"
    background_per_group: bool = False
    std: float = 0.01  # weight init for new rows
    bias: float = 0.0  # bias init for new rows
    offset: int = 0  # leading checkpoint rows of no class (timm's label_offset), dropped
    group_lead: int = 0  # rows of no class before each group's classes, kept
    group_trail: int = 0  # rows of no class after each group's classes, kept
    # What the rows index: "classes" heads follow class_map; others (keypoints, stuff classes)
    # are copied when their count is unchanged and re-initialised when it changes.
    label_space: str = "classes"

    def matches(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.keys)

    def num_classes(self, rows: int, *, checkpoint: bool = False) -> int | None:
        """The class count a head with ``rows`` rows along ``dim`` has, or None if none fits."""
        fixed = self.background_rows * (self.groups if self.background_per_group else 1)
        fixed += (self.group_lead + self.group_trail) * self.groups
        fixed += self.offset if checkpoint else 0
        k, rem = divmod(rows - fixed, self.block * self.groups)
        return k if rem == 0 and k >= 0 else None

    @property
    def background_rows(self) -> int:
        """Rows of one background class (0 without one)."""
        return 0 if self.background == "none" else self.block


def source_rows(
    rule: HeadRule, old_k: int, new_k: int, class_map: Sequence[int | None]
) -> list[int | None]:
    """For each row of the new head, the checkpoint row it takes (None: initialise it)."""
    each = rule.background_per_group
    first_bg = rule.background_rows if rule.background == "first" else 0  # before class 0
    last_bg = rule.background_rows - first_bg  # after the last class
    lead = rule.group_lead + (first_bg if each else 0)  # each group's rows before its classes
    trail = rule.group_trail + (last_bg if each else 0)  # and after them
    group = lead + old_k * rule.block + trail  # checkpoint rows per group
    first = rule.offset + (0 if each else first_bg)  # where group 0 starts
    rows: list[int | None] = list(range(rule.offset, first))  # a background shared by all groups
    for g in range(rule.groups):
        start = first + g * group
        classes = start + lead
        rows.extend(range(start, classes))  # this group's own rows before its classes
        for k in range(new_k):
            old = class_map[k]
            rows.extend(
                None if old is None else classes + old * rule.block + j for j in range(rule.block)
            )
        end = classes + old_k * rule.block
        rows.extend(range(end, end + trail))  # and after them
    end = first + rule.groups * group
    rows.extend(range(end, end + (0 if each else last_bg)))  # a shared background (last)
    return rows


def _normal(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def class_map_by_names(old_names: Sequence[str], new_names: Sequence[str]) -> list[int | None]:
    """For each new class name, the index of the old class of the same name, or None.

    Names match exactly first, then ignoring case, spaces, ``_`` and ``-`` ("traffic_light" =
    "Traffic Light"). ``class_map_by_names(coco_names, ["person", "car", "dog"])`` → ``[0, 2, 16]``.
    """
    exact: dict[str, int] = {}
    loose: dict[str, int] = {}
    for i, name in enumerate(old_names):
        exact.setdefault(name, i)
        loose.setdefault(_normal(name), i)
    return [exact.get(name, loose.get(_normal(name))) for name in new_names]


def resolve_class_map(
    class_map: Any,
    new_k: int,
    old_k: int,
    *,
    source_classes: Sequence[str] | None = None,
    head: str = "",
) -> list[int | None]:
    """Turn a user class map (indices, old names, or a mapping) into a list of old indices."""
    if class_map is None:
        return [k if k < old_k else None for k in range(new_k)]
    if isinstance(class_map, Mapping):
        listed: list[Any] = [None] * new_k
        for new, old in class_map.items():
            if type(new) is not int or not 0 <= new < new_k:
                raise InvalidArgumentError(
                    f"class_map key {new!r} is not a class index of the model (0..{new_k - 1})"
                )
            listed[new] = old
    else:
        listed = list(class_map)
        if len(listed) != new_k:
            raise InvalidArgumentError(
                f"class_map has {len(listed)} entries but the model{_at(head)} has {new_k} "
                "classes; give one entry (old class index, name or None) per new class"
            )
    out: list[int | None] = []
    for new, old in enumerate(listed):
        if isinstance(old, str):
            if source_classes is None:
                raise InvalidArgumentError(
                    f"class_map names class {old!r} but the checkpoint's class names are unknown; "
                    "pass source_classes=[...] (the checkpoint's class names)"
                )
            if old not in source_classes:
                raise InvalidArgumentError(
                    f"class_map[{new}] = {old!r} is not one of the checkpoint's classes "
                    f"({', '.join(list(source_classes)[:6])}, ...)"
                )
            old = list(source_classes).index(old)
        if old is not None and (type(old) is not int or not 0 <= old < old_k):
            raise InvalidArgumentError(
                f"class_map[{new}] = {old!r} is not a checkpoint class index{_at(head)} "
                f"(0..{old_k - 1}) or None"
            )
        out.append(old)
    return out


def _at(head: str) -> str:
    return f" (head {head})" if head else ""
