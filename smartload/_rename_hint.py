"""A naming difference, said first: model keys missing and checkpoint keys unused in numbers, with
the same shapes (a framework that renamed its modules between versions, a wrapper of another
name), and the ``rename`` rules that would place them.

Keys of one shape are paired in order (both state dicts follow the modules' order); each pair
gives a rule: the part between their common leading and trailing names, with layer numbers made
groups (``^vit\\.encoder\\.layer\\.(\\d+)\\.attention\\.attention\\.query\\.`` →
``vit.layers.\\1.attention.q_proj.``). A rule is proposed only if, applied to every unused key,
it lands none of them on a wrong key, and it neither moves a key that already loads nor lands
one on that key's model key (a rule adding ``backbone.`` before every key would take ``head.*``
away from the model's ``head``: such a rule is narrowed to the next name both keys share,
``^(\\d+)\\.`` → ``backbone.\\1.``, or dropped). Pure: names and shapes, no tensor data, no
torch.

What a hint costs is bounded whatever the keys: each distinct rule is checked once, against the
keys that begin with its literal start (found by bisecting sorted keys), and the rules checked and
the keys they are checked against are capped (:data:`_MAX_TRIED`, :data:`_MAX_WORK`).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RenameHint", "rename_hint"]

_MIN_PAIRS = 2
_MAX_KEYS = 20_000  # beyond this many missing or unused keys, no hint (it would cost too much)
_MAX_RULES = 32  # rules proposed, at most
_MAX_TRIED = 256  # distinct rules checked, at most
_MAX_WORK = 1_000_000  # keys the checked rules are applied to, in all


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
    missing: Mapping[str, tuple[int, ...]],
    unused: Mapping[str, tuple[int, ...]],
    loading: Mapping[str, str] | None = None,
) -> RenameHint | None:
    """The hint for ``missing`` model keys and ``unused`` checkpoint keys (each with its shape,
    in its state dict's order), or None when they do not look like one naming difference.

    ``loading`` maps the checkpoint keys that already load to the model keys they feed: no rule
    proposed renames one of them, or renames an unused key onto one of those model keys."""
    if not missing or not unused or max(len(missing), len(unused)) > _MAX_KEYS:
        return None
    pairs = _pairs(missing, unused)
    if len(pairs) < max(_MIN_PAIRS, min(len(missing), len(unused)) // 2):
        return None
    checker = _Checker(pairs, unused, loading or {})
    rules: list[tuple[str, str]] = []
    for old, new in pairs:
        rule = _rule(old, new)
        verdict = checker.verdict(rule)
        if verdict == _TOUCHES_LOADING:  # too broad: anchor it on one more name
            rule = _rule(old, new, narrowed=True)
            verdict = checker.verdict(rule)
        if verdict == _SOUND and rule is not None and rule not in rules:
            rules.append(rule)
        if len(rules) >= _MAX_RULES or checker.spent:
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


def _rule(old: str, new: str, *, narrowed: bool = False) -> tuple[str, str] | None:
    """The rule renaming ``old`` into ``new``: their differing middle, with the numbers of the
    leading part and of the middle as groups. ``narrowed``: the rule also names the first of
    the trailing names both share (not the last, the tensor's own), so that it renames only
    keys under that module; None where they share no such name."""
    a, b = old.split("."), new.split(".")
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    if head == len(a) == len(b):
        return None
    shared = 0
    if narrowed:
        if tail < 2:
            return None
        shared, tail = 1, tail - 1
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
    for seg in lead_b[: len(lead_b) - shared]:
        index = next((i for i, g in enumerate(groups) if g == seg and i not in used), None)
        if seg.isdigit() and index is not None:
            used.add(index)
            replacement.append(f"\\{index + 1}")
        else:
            replacement.append(seg.replace("\\", "\\\\"))
    if shared:  # the same name on both sides: a number is its own (the last) group
        seg = lead_b[-1]
        replacement.append(f"\\{len(groups)}" if seg.isdigit() else seg.replace("\\", "\\\\"))
    joined, repl = r"\.".join(pattern), ".".join(replacement)
    if not tail:  # the names differ to the end: the whole key
        return f"^{joined}$", repl
    if not pattern:  # a leading part added
        return "^", f"{repl}."
    return f"^{joined}\\.", f"{repl}." if repl else ""


def _renamed(compiled: re.Pattern[str], replacement: str, key: str) -> str:
    """``compiled.sub(replacement, key)`` for a pattern anchored at the start (it matches once
    at most), without parsing ``replacement`` again for every key that does not match."""
    found = compiled.match(key)
    return key if found is None else found.expand(replacement) + key[found.end() :]


_SOUND, _MISPLACES, _TOUCHES_LOADING = "sound", "misplaces", "touches loading"


class _Checker:
    """Whether a rule is sound, each distinct rule checked once, within :data:`_MAX_TRIED`
    rules and :data:`_MAX_WORK` keys in all (a rule never checked is not proposed)."""

    def __init__(
        self, pairs: list[tuple[str, str]], unused: Mapping[str, Any], loading: Mapping[str, str]
    ) -> None:
        self.partner = dict(pairs)
        self.targets = set(self.partner.values())
        self.taken = set(loading.values())
        self.unused = sorted(unused)
        self.loading = sorted(loading)
        self.seen: dict[tuple[str, str], str] = {}
        self.work = 0
        self.spent = False

    def verdict(self, rule: tuple[str, str] | None) -> str:
        if rule is None:
            return _MISPLACES
        if rule not in self.seen:
            if len(self.seen) >= _MAX_TRIED:
                self.spent = True
                return _MISPLACES
            self.seen[rule] = self._check(rule)
        return self.seen[rule]

    def _check(self, rule: tuple[str, str]) -> str:
        """:data:`_TOUCHES_LOADING` when ``rule`` renames a key that loads, or an unused key
        onto the model key a loading key feeds; :data:`_MISPLACES` when it renames an unused
        key into a model key other than its partner's (an unpaired key it touches must be left
        alone), or places no pair; else :data:`_SOUND`."""
        compiled = re.compile(rule[0])
        start = _literal_start(rule[0])
        loading = _starting_with(self.loading, start)
        unused = _starting_with(self.unused, start)
        self.work += len(loading) + len(unused)
        if self.work > _MAX_WORK:
            self.spent = True
            return _MISPLACES
        if any(_renamed(compiled, rule[1], key) != key for key in loading):
            return _TOUCHES_LOADING
        places = False
        for key in unused:
            new = _renamed(compiled, rule[1], key)
            if new == key:
                continue
            if new in self.taken:
                return _TOUCHES_LOADING
            mine = self.partner.get(key)
            if new == mine:
                places = True
            elif new in self.targets:
                return _MISPLACES
        return _SOUND if places else _MISPLACES


def _literal_start(pattern: str) -> str:
    """What every key a rule's pattern matches begins with: its escaped names before the first
    group (``^enc\\.layer\\.(\\d+)\\.`` → ``enc.layer``)."""
    names = []
    for part in pattern.removeprefix("^").removesuffix("$").split(r"\."):
        if not part or part == r"(\d+)":
            break
        names.append(re.sub(r"\\(.)", r"\1", part, flags=re.DOTALL))
    return ".".join(names)


def _starting_with(ordered: list[str], start: str) -> list[str]:
    """The keys of ``ordered`` (sorted) that begin with ``start``."""
    if not start:
        return ordered
    lo = bisect_left(ordered, start)
    last = ord(start[-1])
    if last == 0x10FFFF:  # no character after it: to the end
        return ordered[lo:]
    return ordered[lo : bisect_left(ordered, start[:-1] + chr(last + 1))]


def _placed(rules: Sequence[tuple[str, str]], pairs: list[tuple[str, str]]) -> int:
    """How many pairs the rules place, applied in turn as ``load(rename=...)`` applies them."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    placed = 0
    for old, new in pairs:
        for pattern, replacement in compiled:
            old = _renamed(pattern, replacement, old)
        placed += old == new
    return placed
