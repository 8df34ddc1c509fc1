"""A naming difference, said first: model keys missing and checkpoint keys unused in numbers, with
the same shapes (a framework that renamed its modules between versions, a wrapper of another
name), and the ``rename`` rules that would place them.

Keys of one shape are paired in order (both state dicts follow the modules' order); each pair
gives a rule: the part between their common leading and trailing names, with layer numbers made
groups (``^vit\\.encoder\\.layer\\.(\\d+)\\.attention\\.attention\\.query\\.`` →
``vit.layers.\\1.attention.q_proj.``). A rule is proposed only if, applied to every unused key,
it lands none of them on a wrong key. Pure: names and shapes, no tensor data, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RenameHint", "rename_hint"]

_MIN_PAIRS = 2
_MAX_KEYS = 20_000  # beyond this many missing or unused keys, no hint (it would cost too much)
_MAX_RULES = 32


@dataclass(frozen=True)
class RenameHint:
    missing: int  # model keys with no checkpoint key
    unused: int  # checkpoint keys that went nowhere
    paired: int  # of those, pairs of one shape
    rename: tuple[tuple[str, str], ...]  # the proposed rules, in order
    placed: int  # pairs the rules place (the checkpoint key renamed to its partner)

    def to_dict(self) -> dict[str, Any]:
        return {
            "missing": self.missing,
            "unused": self.unused,
            "paired": self.paired,
            "rename": dict(self.rename),
            "placed": self.placed,
        }

    def note(
        self, missing: str = "model key(s) missing", unused: str = "checkpoint key(s) unused"
    ) -> str:
        said = (
            f"{self.missing} {missing} and {self.unused} {unused}, "
            f"{self.paired} of them with matching shapes: probably a naming difference"
        )
        if not self.rename:
            return f"{said}; pass rename={{regex: replacement}} for the checkpoint's keys"
        rules = ", ".join(f"{p!r}: {r!r}" for p, r in self.rename)
        return (
            f"{said}; rename={{{rules}}} would place {self.placed} of them (or use the "
            "framework's own adapter, if it has one, which knows its names)"
        )


def rename_hint(
    missing: Mapping[str, tuple[int, ...]], unused: Mapping[str, tuple[int, ...]]
) -> RenameHint | None:
    """The hint for ``missing`` model keys and ``unused`` checkpoint keys (each with its shape,
    in its state dict's order), or None when they do not look like one naming difference."""
    if not missing or not unused or max(len(missing), len(unused)) > _MAX_KEYS:
        return None
    pairs = _pairs(missing, unused)
    if len(pairs) < max(_MIN_PAIRS, min(len(missing), len(unused)) // 2):
        return None
    rules: list[tuple[str, str]] = []
    for old, new in pairs:
        rule = _rule(old, new)
        if rule is not None and rule not in rules and _sound(rule, pairs, unused):
            rules.append(rule)
        if len(rules) >= _MAX_RULES:
            break
    placed = _placed(rules, pairs)
    return RenameHint(len(missing), len(unused), len(pairs), tuple(rules), placed)


def _pairs(
    missing: Mapping[str, tuple[int, ...]], unused: Mapping[str, tuple[int, ...]]
) -> list[tuple[str, str]]:
    """(checkpoint key, model key) pairs: per shape, in order, when both sides have as many."""
    by_shape: dict[tuple[int, ...], tuple[list[str], list[str]]] = {}
    for key, shape in unused.items():
        by_shape.setdefault(tuple(shape), ([], []))[0].append(key)
    for key, shape in missing.items():
        by_shape.setdefault(tuple(shape), ([], []))[1].append(key)
    pairs: list[tuple[str, str]] = []
    for old, new in by_shape.values():
        if old and len(old) == len(new):
            pairs.extend(zip(old, new, strict=True))
    return pairs


def _rule(old: str, new: str) -> tuple[str, str] | None:
    """The rule renaming ``old`` into ``new``: their differing middle, with the numbers of the
    leading part and of the middle as groups."""
    a, b = old.split("."), new.split(".")
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    if head == len(a) == len(b):
        return None
    lead_a, lead_b = a[: len(a) - tail], b[: len(b) - tail]
    groups: list[str] = []
    pattern = []
    for seg in lead_a:
        if seg.isdigit():
            groups.append(seg)
            pattern.append(r"(\d+)")
        else:
            pattern.append(re.escape(seg))
    replacement = []
    used: set[int] = set()
    for seg in lead_b:
        index = next((i for i, g in enumerate(groups) if g == seg and i not in used), None)
        if seg.isdigit() and index is not None:
            used.add(index)
            replacement.append(f"\\{index + 1}")
        else:
            replacement.append(seg.replace("\\", "\\\\"))
    joined, repl = r"\.".join(pattern), ".".join(replacement)
    if not tail:  # the names differ to the end: the whole key
        return f"^{joined}$", repl
    if not pattern:  # a leading part added
        return "^", f"{repl}."
    return f"^{joined}\\.", f"{repl}." if repl else ""


def _apply(rules: Sequence[tuple[str, str]], key: str) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def _sound(rule: tuple[str, str], pairs: list[tuple[str, str]], unused: Mapping[str, Any]) -> bool:
    """Whether ``rule`` renames no unused key into a key other than its partner's (an unpaired
    key it touches must be left alone)."""
    partner = dict(pairs)
    targets = set(partner.values())
    compiled = re.compile(rule[0])
    for key in unused:
        new = compiled.sub(rule[1], key)
        if new == key:
            continue
        if key in partner:
            if new != partner[key] and new in targets:
                return False
        elif new in targets:
            return False
    return any(compiled.sub(rule[1], old) == new for old, new in pairs)


def _placed(rules: Sequence[tuple[str, str]], pairs: list[tuple[str, str]]) -> int:
    return sum(_apply(rules, old) == new for old, new in pairs)
