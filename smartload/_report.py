"""Plans and reports: what happens (happened) to every key. No torch import."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["ACTIONS", "HeadChange", "LoadPlan", "LoadReport", "PlanEntry", "group_keys"]

ACTIONS = ("copy", "slice", "reinit-normal", "skip")


@dataclass(frozen=True)
class PlanEntry:
    """The action for one model key."""

    key: str
    action: str
    source: str | None  # the checkpoint key it comes from (as written in the file)
    ckpt_shape: tuple[int, ...] | None
    model_shape: tuple[int, ...]
    reason: str
    ckpt_dtype: str | None = None
    model_dtype: str = ""
    cast: str | None = None  # None (same dtype), "exact" or "lossy"
    reused: int = 0  # elements whose values come from the checkpoint
    head: str | None = None
    transform: str | None = None  # an adapter's conversion of the checkpoint tensor, described
    # slice / reinit details, for apply (not part of the JSON schema)
    rows: tuple[int | None, ...] | None = field(default=None, repr=False)
    dim: int = 0
    std: float = 0.01
    fill: float | None = None  # constant for new rows of a bias; None: normal(0, std)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "action": self.action,
            "source": self.source,
            "ckpt_shape": list(self.ckpt_shape) if self.ckpt_shape is not None else None,
            "model_shape": list(self.model_shape),
            "reason": self.reason,
            "ckpt_dtype": self.ckpt_dtype,
            "model_dtype": self.model_dtype,
            "reused_params": self.reused,
        }
        if self.cast:
            out["cast"] = self.cast
        if self.head:
            out["head"] = self.head
        if self.transform:
            out["transform"] = self.transform
        if self.rows is not None:
            out["rows_from_checkpoint"] = sum(r is not None for r in self.rows)
        return out


@dataclass(frozen=True)
class HeadChange:
    """A class-count head: its old and new class counts and which old class each new one takes."""

    name: str
    keys: tuple[str, ...]
    old_classes: int
    new_classes: int
    class_map: tuple[int | None, ...] | None  # None: no map (rows initialised)
    unmatched: tuple[str, ...] = ()  # new class names that matched no checkpoint class

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "keys": list(self.keys),
            "old_classes": self.old_classes,
            "new_classes": self.new_classes,
            "class_map": list(self.class_map) if self.class_map is not None else None,
            "unmatched_classes": list(self.unmatched),
        }


@dataclass(frozen=True)
class _Outcome:
    checkpoint: str
    format: str
    state_dict_path: tuple[str, ...]
    entries: tuple[PlanEntry, ...]
    unused: tuple[str, ...]
    heads: tuple[HeadChange, ...] = ()
    ema: bool = False
    other_state_dicts: tuple[tuple[str, ...], ...] = ()
    extras: Mapping[str, str] = field(default_factory=dict)
    inert_globals: tuple[str, ...] = ()
    adapter: str = "generic"
    notes: tuple[str, ...] = ()
    rename_hint: Any = None  # a naming difference (``_rename_hint.RenameHint``), said first

    @property
    def summary(self) -> dict[str, int]:
        counts = Counter(e.action for e in self.entries)
        out = {action: counts.get(action, 0) for action in ACTIONS}
        out["unused"] = len(self.unused)
        out["reused_params"] = sum(e.reused for e in self.entries)
        out["model_params"] = sum(math.prod(e.model_shape) for e in self.entries)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "format": self.format,
            "state_dict_path": list(self.state_dict_path),
            "ema": self.ema,
            "other_state_dicts": [list(p) for p in self.other_state_dicts],
            "adapter": self.adapter,
            "summary": self.summary,
            "heads": [h.to_dict() for h in self.heads],
            "entries": [e.to_dict() for e in self.entries],
            "unused": list(self.unused),
            "extras": dict(self.extras),
            "inert_globals": list(self.inert_globals),
            "notes": list(self.notes),
            "rename_hint": self.rename_hint.to_dict() if self.rename_hint else None,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON, atomically (a reader never sees half a file)."""
        save_json(path, self.to_dict())

    def summary_line(self) -> str:
        s = self.summary
        # rounded down: 99.96% must not read as 100%
        share = s["reused_params"] * 1000 // s["model_params"] / 10 if s["model_params"] else 0.0
        parts = [f"{s[a]} {a}" for a in ACTIONS if s[a]] + (
            [f"{s['unused']} unused"] if s["unused"] else []
        )
        return (
            f"reused {s['reused_params']:,}/{s['model_params']:,} parameters ({share:.1f}%) "
            f"from {os.path.basename(self.checkpoint) or self.checkpoint}: " + ", ".join(parts)
        )

    def _title(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        where = "/".join(self.state_dict_path) or "top level"
        lines = [
            f"{self._title()} {self.checkpoint} ({self.format}, state dict: {where}"
            + (", EMA" if self.ema else "")
            + f", adapter: {self.adapter})",
            self.summary_line(),
        ]
        hint = self.rename_hint.note() if self.rename_hint else None
        if hint:
            lines.append(f"hint: {hint}")
        for head in self.heads:
            kept = sum(c is not None for c in head.class_map) if head.class_map else 0
            lines.append(
                f"head {head.name}: {head.old_classes} → {head.new_classes} classes, "
                f"{kept} taken from the checkpoint"
                + (f"; unmatched: {', '.join(head.unmatched)}" if head.unmatched else "")
            )
        lines.append("")
        rows = _table_rows(self.entries)
        width = max((len(r[1]) for r in rows), default=10)
        for action, keys, detail in rows:
            lines.append(f"  {action:<13} {keys:<{width}}  {detail}".rstrip())
        if self.unused:
            lines.append(f"  {'unused':<13} {', '.join(group_keys(self.unused))}")
        if self.other_state_dicts:
            others = ", ".join("/".join(p) or "top level" for p in self.other_state_dicts)
            lines.append(f"other state dicts in the file (not used): {others}")
        if self.inert_globals:
            lines.append(
                "inert objects (recorded, never executed): " + ", ".join(self.inert_globals)
            )
        lines.extend(f"note: {n}" for n in self.notes if n != hint)
        return "\n".join(lines)


@dataclass(frozen=True, repr=False)
class LoadPlan(_Outcome):
    """What :func:`smartload.load` would do: one :class:`PlanEntry` per model key. Pure data."""

    tensors: Mapping[str, Any] = field(default_factory=dict, compare=False)  # source key → leaf
    sources: Mapping[str, Any] = field(default_factory=dict, compare=False)
    transforms: Mapping[str, Any] = field(default_factory=dict, compare=False)  # key → callable
    targets: Mapping[str, Any] = field(default_factory=dict, compare=False)  # key → model tensor
    hooked: Any = field(default=None, compare=False)  # what load pre-hooks do (_load_hooks)
    loaders: Mapping[str, Any] = field(default_factory=dict, compare=False)  # own loading, by name

    def _title(self) -> str:
        return "plan for"

    def __repr__(self) -> str:
        return f"<LoadPlan {self.summary_line()}>"


@dataclass(frozen=True, repr=False)
class LoadReport(_Outcome):
    """What :func:`smartload.load` did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    distributed: Any = None  # a collective load: how it was spread (``_sharded.Distributed``)

    @classmethod
    def from_plan(cls, plan: LoadPlan, *, dry_run: bool) -> LoadReport:
        shared = {f.name: getattr(plan, f.name) for f in fields(_Outcome)}
        return cls(**shared, dry_run=dry_run)

    def _title(self) -> str:
        return "dry run of" if self.dry_run else "loaded"

    def to_dict(self) -> dict[str, Any]:
        out = {**super().to_dict(), "dry_run": self.dry_run}
        if self.distributed is not None:
            out["distributed"] = self.distributed.to_dict()
        return out

    def __str__(self) -> str:
        text = super().__str__()
        if self.distributed is None:
            return text
        title, _, rest = text.partition("\n")
        return f"{title}\n{self.distributed.describe()}\n{rest}"

    def __repr__(self) -> str:
        return f"<LoadReport {self.summary_line()}>"


def group_keys(keys: Iterable[str]) -> list[str]:
    """``["a.b.weight", "a.b.bias", "c"]`` → ``["a.b.{bias, weight}", "c"]``, sorted."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        groups.setdefault(parent, []).append(leaf)
    out = []
    for parent in sorted(groups):
        leaves = sorted(groups[parent])
        if not parent:
            out.extend(leaves)
        elif len(leaves) == 1:
            out.append(f"{parent}.{leaves[0]}")
        else:
            out.append(f"{parent}.{{{', '.join(leaves)}}}")
    return out


def _table_rows(entries: Sequence[PlanEntry]) -> list[tuple[str, str, str]]:
    """Same-shape copies (with at most an exact cast) collapse per top-level module and cast
    (``layer1.* (60 tensors)``); every other entry is listed, grouped as ``parent.{a, b}`` when
    action and detail agree."""
    copies: dict[tuple[str, str], int] = {}  # (top-level module, cast) → tensors
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for e in entries:
        if e.action == "copy" and e.transform is None and e.cast != "lossy":
            top = e.key.split(".", 1)[0]
            cast = f", cast {e.ckpt_dtype} → {e.model_dtype} (exact)" if e.cast else ""
            copies[top, cast] = copies.get((top, cast), 0) + 1
            continue
        detail = f"{_shape(e.ckpt_shape)} → {_shape(e.model_shape)}  {e.reason}"
        if e.cast:
            detail += f", cast {e.ckpt_dtype} → {e.model_dtype} ({e.cast})"
        grouped.setdefault((e.key.rpartition(".")[0], e.action, detail), []).append(e.key)
    top_level = {e.key for e in entries if "." not in e.key}
    rows = [
        ("copy", top if top in top_level else f"{top}.*", f"{n} tensor(s), same shape{cast}")
        for (top, cast), n in sorted(copies.items())
    ]
    for (_, action, detail), keys in sorted(grouped.items(), key=lambda item: min(item[1])):
        rows.extend((action, group, detail) for group in group_keys(keys))
    return rows


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def save_json(path: str | os.PathLike[str], data: Any) -> None:
    JsonFile(path).write(data)


class JsonFile:
    """A JSON file written atomically. Its temporary file is made at once, so an unwritable path
    fails before the work that makes the content (a load); :meth:`prepare` writes the content
    there and :meth:`commit` renames it into place, the one step left after the work."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=".smartload-", suffix=".json", dir=folder)
        os.close(fd)

    def prepare(self, data: Any) -> None:
        with open(self._tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    def commit(self) -> None:
        os.replace(self._tmp, self.path)

    def write(self, data: Any) -> None:
        try:
            self.prepare(data)
            self.commit()
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Give up: remove the temporary file (the path is left as it was)."""
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)
