"""What a report's notes and its rename hint cost follows the keys, not their square: a file of
tens of thousands of tiny tensors (a few MB) took 24 s for the notes of ``diff(nn.Linear(2, 2),
f)``, and two such files 30 s for the hint of ``diff A B``. Sizes are grown and timed; the bounds
are generous (the quadratic code took minutes at the largest size), the results exact."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import smartload
from smartload._compare import compare_checkpoints
from smartload._rename_hint import rename_hint
from smartload._replaced import module_notes


def _timed_notes(model: nn.Module, path: Path) -> tuple[list[str], float]:
    """The plan's module notes, made again on their own, and the seconds that took."""
    plan = smartload.diff(model, path)
    started = time.perf_counter()
    notes = module_notes(model, plan.entries, plan.unused)
    seconds = time.perf_counter() - started
    assert tuple(notes) == plan.notes[-len(notes) :]
    return notes, seconds


@pytest.mark.parametrize("n", [1_000, 15_000, 60_000])
def test_unused_keys_are_said_in_time_linear_in_their_number(tmp_path: Path, n: int) -> None:
    """n one-element tensors no model key takes (60,000: 3 MB): each is a checkpoint module of
    its own, four are named, the rest counted."""
    path = tmp_path / "many.safetensors"
    save_file({f"k{i}": torch.zeros(1) for i in range(n)}, path)
    notes, seconds = _timed_notes(nn.Linear(2, 2), path)
    assert seconds < 3
    first = sorted(f"k{i}" for i in range(n))[:4]  # k0, k1, k10, k100
    assert notes == [
        "2 modules not in the checkpoint, kept as initialised: weight (tensor, 1 tensor, 4 "
        "parameters), bias (tensor, 1 tensor, 2 parameters)",
        *[f"the checkpoint's {k} (1 tensor) has no place in the model: unused" for k in first],
        f"... and {n - 4} more checkpoint modules unused",
    ]


@pytest.mark.parametrize("n", [500, 4_000])
def test_many_replaced_modules_are_said_in_time_linear_in_the_keys(tmp_path: Path, n: int) -> None:
    """n model modules whose checkpoint modules hold other keys (each a replaced module): the
    checkpoint's keys under each are counted by bisection, not by a scan per module."""
    model = nn.Sequential(*(nn.Linear(1, 1) for _ in range(n)))
    path = tmp_path / "replaced.safetensors"
    save_file({f"{i}.inner.{k}": torch.zeros(0) for i in range(n) for k in "ab"}, path)
    notes, seconds = _timed_notes(model, path)
    assert seconds < 3
    assert len(notes) == n
    assert notes[1] == (
        "1 (Linear, 2 tensors, 2 parameters) keeps its initialisation; the checkpoint's 1 "
        "(2 tensors) is unused"
    )


def _swapped(n: int) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Model keys missing and checkpoint keys unused (n of them unpaired), in sorted order
    as a file keeps them, whose every pair gives a rule of its own that would land another key on
    a wrong one: ``^(\\d+)\\.g5\\.(\\d+)\\.`` → ``\\1.h5.2.`` (of ``5.g5.1.w`` → ``5.h5.2.w``)
    renames ``5.g5.2.w`` onto ``5.h5.2.w`` too."""
    missing: dict[str, tuple[int, ...]] = {}
    unused: dict[str, tuple[int, ...]] = {}
    for j in range(n):
        shape = (0, j + 1)  # one shape per module, no data
        unused[f"{j}.g{j}.1.w"] = unused[f"{j}.g{j}.2.w"] = shape
        missing[f"{j}.h{j}.2.w"] = missing[f"{j}.h{j}.3.w"] = shape
    for i in range(n):
        unused[f"z{i}"] = (1, i + 1)
    return missing, unused


@pytest.mark.parametrize("n", [600, 6_000])
def test_the_rename_hint_tries_each_rule_once_within_a_budget(n: int) -> None:
    """12,000 model keys missing and 18,000 checkpoint keys unused whose every pair gives another
    unsound rule (30 s before): each rule is checked once, and few are."""
    missing, unused = _swapped(n)
    started = time.perf_counter()
    hint = rename_hint(missing, unused)
    assert time.perf_counter() - started < 3
    assert hint is not None
    assert (hint.missing, hint.unused, hint.paired, hint.rename, hint.placed) == (
        2 * n, 3 * n, 2 * n, (), 0,
    )  # fmt: skip


def test_diff_of_two_files_gives_its_hint_in_time(tmp_path: Path) -> None:
    """The same keys as two files (no tensor data: every shape holds a 0), compared."""
    missing, unused = _swapped(6_000)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({k: torch.zeros(s) for k, s in unused.items()}, a)
    save_file({k: torch.zeros(s) for k, s in missing.items()}, b)
    started = time.perf_counter()
    result = compare_checkpoints(str(a), str(b))
    assert time.perf_counter() - started < 20  # reading 30,000 headers included
    assert result.rename_hint is not None and result.rename_hint.rename == ()
    assert (len(result.only_in_a), len(result.only_in_b)) == (18_000, 12_000)
