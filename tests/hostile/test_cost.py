"""What a file costs follows its size (issue 14, classes 1-5): each construct that made a small
file cost gigabytes or minutes is grown over three sizes, and its cost must stay within the
budget (``32 bytes per byte of the pickle + 64 MiB`` for what builders copy; stored bytes for
value checks, scans and conversions) or end in a typed error, the model unchanged.

Memory is measured in a child process (peak RSS, reset before each file through
``/proc/self/clear_refs``; its address space capped, so a regression fails here instead of
filling the machine); work is counted where smartload exposes it (bytes a scan reads, containers
a description walks). Time bounds are generous: the attacks took minutes or hung.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cost_attacks as attacks
import pytest
import torch
from conftest import assert_unchanged, make_net, snapshot
from pickle_asm import assemble, tensor, torch_zip

import smartload
from smartload import CheckpointFormatError
from smartload._convert import convert_to_safetensors, scan
from smartload._normalize import match_keys
from smartload.cli import main

MiB = 2**20
BUDGET_PER_BYTE, BUDGET_FLOOR = 32, 64 * MiB  # what builders may copy (smartload/_unpickler.py)
PER_BYTE = 256  # what reading keeps per byte of pickle, at most (floods below: 100 to 225)


def _rss_bound(size: int) -> int:
    """The peak RSS a file of ``size`` bytes may add: its copy budget (the floor with half again
    for the allocator) and what the reader keeps per byte."""
    return BUDGET_FLOOR * 3 // 2 + (BUDGET_PER_BYTE + PER_BYTE) * size


# --------------------------------------------------------------------------------------------------
# class 1: one memoized object referenced again and again, by builders that would copy it

_CHILD = r"""
import ctypes, gc, json, re, resource, sys, time
import torch, smartload

def status(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read())[1]) * 1024

soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + 2 * 2**30, hard))
out = []
for path, action in json.loads(sys.argv[1]):
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
    before = status("VmRSS")
    started = time.perf_counter()
    error = message = None
    try:
        if action == "load":
            smartload.load(torch.nn.Linear(2, 1), path)
        else:
            smartload.inspect(path)
    except Exception as exc:
        error, message = type(exc).__name__, str(exc)
    seconds = time.perf_counter() - started
    out.append({"growth": status("VmHWM") - before, "seconds": seconds, "error": error,
                "message": message})
print(json.dumps(out))
"""

SHARING: dict[str, Callable[[Path, int], Path]] = {
    "stand_in_list_argument": attacks.stand_in_list_argument,
    "stand_in_tuple_arguments": attacks.stand_in_tuple_arguments,
    "build_shared_state": attacks.build_shared_state,
    "codecs_encode_shared": attacks.codecs_encode_shared,
    "ndarray_shared_string": attacks.ndarray_shared_string,
    "frombuffer_shared_bytearray": attacks.frombuffer_shared_bytearray,
}
# made once whatever the references: these read fine at every size
SHARED_ONCE = {"codecs_encode_shared", "ndarray_shared_string"}
REFERENCES = (300, 1200, 4800)  # times a 200 KB object is referenced: up to 960 MB of copies
ACTIONS = ("load", "inspect")


def _can_measure() -> bool:
    return sys.platform == "linux" and os.access("/proc/self/clear_refs", os.W_OK)


FLOOD_SIZES = (50_000, 200_000, 800_000)  # objects, one to four bytes each


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int, str], Any]:
    """Every sharing construct at every size, loaded and inspected, and every flood of small
    objects inspected, in one child process."""
    if not _can_measure():
        pytest.skip("peak RSS is measured through Linux's /proc/self/clear_refs")
    files: list[tuple[str, int, str, Path]] = []
    for name, make in SHARING.items():
        for n in REFERENCES:
            path = make(tmp_path_factory.mktemp(f"{name}{n}"), n)
            files.extend((name, n, action, path) for action in ACTIONS)
    for unit in attacks.FLOODS:
        for n in FLOOD_SIZES:
            path = attacks.flood(tmp_path_factory.mktemp(f"{unit}{n}"), n, unit)
            files.append((unit, n, "inspect", path))
    jobs = [(str(path), action) for _, _, action, path in files]
    names = [(name, n, action, path.stat().st_size) for name, n, action, path in files]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    results = json.loads(child.stdout)
    return {
        (name, n, action): {**result, "size": size}
        for (name, n, action, size), result in zip(names, results, strict=True)
    }


@pytest.mark.parametrize("name", sorted(SHARING))
def test_shared_references_cost_what_the_file_holds(
    name: str, measured: dict[tuple[str, int, str], Any]
) -> None:
    """Grown from 300 to 4,800 references of one 200 KB object (60 MB to 960 MB if each were
    copied): peak memory stays within the file's budget, and each file is either read (shared
    objects made once) or refused with a typed error once its copies pass the budget."""
    for n in REFERENCES:
        for action in ACTIONS:
            got = measured[(name, n, action)]
            assert got["growth"] <= _rss_bound(got["size"]), (n, action, got)
            assert got["seconds"] < 20, (n, action)
            if name in SHARED_ONCE:
                assert got["error"] is None, (n, action, got["message"])
            elif n == REFERENCES[-1]:  # 960 MB of copies: always past the budget
                assert got["error"] == "CheckpointFormatError", (n, action)
            if got["error"] is not None:
                assert got["message"].endswith(
                    " bytes (32 per byte of the pickle + 64 MiB): the same object is copied again "
                    "and again. The file is corrupt or was not written by torch/numpy; re-export it"
                ), (n, action, got["message"])


def test_shared_objects_are_made_once(measured: dict[tuple[str, int, str], Any]) -> None:
    """A string encoded 4,800 times costs what encoding it once does (within 16 MB)."""
    for name in sorted(SHARED_ONCE):
        growth = [measured[(name, n, "load")]["growth"] for n in REFERENCES]
        assert growth[-1] - growth[0] < 16 * MiB, (name, growth)


@pytest.mark.parametrize("unit", sorted(attacks.FLOODS))
def test_each_opcode_costs_a_bounded_amount(
    unit: str, measured: dict[tuple[str, int, str], Any]
) -> None:
    """Floods of the objects that cost most per byte of pickle (a 56-byte list for a 1-byte
    opcode, an inert record per 4-byte call), grown to 3.2 MB: what the reader keeps per byte
    stays under 256 bytes (measured: 180 for lists, 200 for dicts, 100 for calls)."""
    for n in FLOOD_SIZES:
        got = measured[(unit, n, "inspect")]
        assert got["growth"] <= PER_BYTE * got["size"] + 32 * MiB, (n, got)
        assert got["seconds"] < 20, n
        assert got["error"] == "CheckpointFormatError"  # no state dict in it
        assert "no state dict found" in got["message"]


# --------------------------------------------------------------------------------------------------
# class 2: many keys sharing one container


def _walked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the items of every container a description iterates over."""
    import smartload._records as records

    walked = [0]
    items = records._items

    def counting(container: Any) -> Any:
        walked[0] += len(container)
        return items(container)

    monkeypatch.setattr(records, "_items", counting)
    return walked


@pytest.mark.parametrize(
    ("make", "extra_per_key"),
    [(attacks.shared_container_extras, 0), (attacks.shared_container_nested, 2)],
)
@pytest.mark.parametrize("n", [100, 1_000, 10_000])
def test_shared_containers_are_walked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Any, extra_per_key: int, n: int
) -> None:
    """n top-level keys sharing one dict of 25,000 items (directly, or each through a small dict
    of its own): describing the extras walks the shared dict once (its items twice: to find its
    containers, then to add up their counts), not once per key."""
    path = make(tmp_path, n)
    walked = _walked(monkeypatch)
    started = time.perf_counter()
    info = smartload.inspect(path)
    assert time.perf_counter() - started < 10
    assert walked[0] == 2 * (attacks.SHARED // 8) + extra_per_key * n
    expected = "dict with 25000 entries" if extra_per_key == 0 else "dict with 1 entries"
    assert set(info.extras.values()) == {expected}
    assert len(info.extras) == n


@pytest.mark.parametrize("n", [100, 1_000, 10_000])
def test_stand_ins_sharing_one_state_are_described_in_constant_time(tmp_path: Path, n: int) -> None:
    """n stand-ins given one 25,000-item tuple as their state: each is looked at in constant
    time (is it a pickled module? only the state's first two items can say)."""
    path = attacks.stand_ins_sharing_state(tmp_path, n)
    started = time.perf_counter()
    info = smartload.inspect(path)
    assert time.perf_counter() - started < 10
    assert info.extras["o0"] == "zoo.Thing [inert, not executed]"
    assert len(info.extras) == n + 1  # and the tuple itself, "s"


# --------------------------------------------------------------------------------------------------
# class 3: one long key


@pytest.mark.parametrize("n", [10_000, 40_000, 160_000])
def test_stripping_prefixes_is_linear_in_the_key(tmp_path: Path, n: int) -> None:
    """``"model." * n + "weight"`` (up to 960 KB) feeds the model's ``weight``: n prefixes
    stripped by position, not by copying the key n times (that took over 20 s at 960 KB)."""
    path = attacks.long_prefixed_key(tmp_path, n)
    model = torch.nn.Linear(2, 1)
    started = time.perf_counter()
    report = smartload.load(model, path)
    smartload.inspect(path)
    assert main(["inspect", str(path), "--json"]) == 0
    assert time.perf_counter() - started < 5
    weight = next(e for e in report.entries if e.key == "weight")
    assert (weight.action, weight.source) == ("copy", "model." * n + "weight")
    assert torch.equal(model.weight, torch.tensor([[1.0, 2.0]]))


def test_a_prefix_is_added_to_a_long_key_only_where_it_matches() -> None:
    """Keys still match as before around a long one: it loses its 100,000 prefixes, and
    ``module.`` is added to another (candidates are made only at a model key's length)."""
    long_key = "model." * 100_000 + "fc.weight"
    assert match_keys([long_key, "fc.bias"], ["module.fc.bias", "fc.weight"]) == {
        long_key: "fc.weight",
        "fc.bias": "module.fc.bias",
    }


# --------------------------------------------------------------------------------------------------
# class 4: views that claim far more elements than the file stores

ROWS = (2**16, 2**30, 2**40)  # fc.weight (rows, 8) and fc.bias (rows,), all strides 0


@pytest.mark.parametrize("rows", ROWS)
def test_a_broadcast_head_is_checked_by_its_stored_values(tmp_path: Path, rows: int) -> None:
    """A class-map load of a head claiming up to 2**43 elements over one stored float: the value
    check reads the float once (it hung), the sliced rows are that float."""
    path = attacks.broadcast_head(tmp_path, rows)
    model = make_net(3)
    started = time.perf_counter()
    smartload.load(model, path, num_classes=3, class_map=[0, 1, 2])
    assert time.perf_counter() - started < 5
    assert torch.equal(model.fc.weight, torch.full((3, 8), 0.5))
    assert torch.equal(model.fc.bias, torch.full((3,), 0.5))


@pytest.mark.parametrize("rows", ROWS)
def test_a_broadcast_nan_is_counted_once(tmp_path: Path, rows: int) -> None:
    """The one stored NaN under 2**43 claimed elements: refused, counted as stored (1 NaN),
    the model unchanged."""
    path = attacks.broadcast_head(tmp_path, rows, value=float("nan"))
    model = make_net(3)
    before = snapshot(model)
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.load(model, path, num_classes=3, class_map=[0, 1, 2])
    assert caught.value.problem == (
        "non-finite values in 2 tensor(s): fc.weight (1 NaN), fc.bias (1 NaN)"
    )
    assert_unchanged(model, before)


@pytest.mark.parametrize("rows", ROWS)
def test_a_scan_reads_the_stored_values(
    tmp_path: Path, rows: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """``scan`` (``inspect --scan``) reads 4 bytes per view of the one stored float, whatever the
    rows claimed (it asked torch for 35 TB)."""
    path = attacks.broadcast_head(tmp_path, rows, value=float("nan"))
    read: list[int] = []
    found = scan(str(path), progress=read.append)
    assert read == [4, 4]
    assert [(f.key, f.nan, f.inf, f.all_zero) for f in found] == [
        ("fc.weight", 1, 0, False),
        ("fc.bias", 1, 0, False),
    ]
    assert main(["inspect", str(path), "--scan", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scan"]["nonfinite"] == {
        "fc.weight": {"nan": 1, "inf": 0},
        "fc.bias": {"nan": 1, "inf": 0},
    }


@pytest.mark.parametrize("n", [2**10, 2**14, 2**18])
def test_overlapping_rows_are_scanned_by_their_span(tmp_path: Path, n: int) -> None:
    """Shape (n, n), strides (1, 1), over 2n - 1 stored floats (n² claimed): the scan reads the
    stored span once."""
    path = attacks.overlapping_rows(tmp_path, n)
    read: list[int] = []
    (found,) = scan(str(path), progress=read.append)
    assert read == [4 * (2 * n - 1)]
    assert (found.nan, found.inf, found.all_zero) == (0, 0, False)


def test_views_alike_are_scanned_once(tmp_path: Path) -> None:
    """Tied weights (two keys, one view of one storage) are read once, reported twice."""
    view = tensor("0", 4, (2, 2), (2, 1))
    path = torch_zip(tmp_path / "tied.pth", assemble({"a": view, "b": view}), {"0": bytes(16)})
    read: list[int] = []
    found = scan(str(path), progress=read.append)
    assert read == [16]
    assert [(f.key, f.all_zero) for f in found] == [("a", True), ("b", True)]


@pytest.mark.parametrize("rows", ROWS)
def test_convert_writes_at_most_its_budget(tmp_path: Path, rows: int) -> None:
    """Converting writes every key in full (safetensors has no views): up to 8 bytes per stored
    byte + 256 MiB. 2**16 rows fit (2.3 MB); 2**30 and 2**40 (35 TB) are refused before a
    byte is written."""
    path, out = attacks.broadcast_head(tmp_path, rows), tmp_path / "out.safetensors"
    written = rows * 9 * 4
    if written <= 8 * 4 + 256 * MiB:
        assert convert_to_safetensors(str(path), str(out))["bytes"] == written
        return
    with pytest.raises(CheckpointFormatError) as caught:
        convert_to_safetensors(str(path), str(out))
    assert caught.value.problem == (
        "converting the state dict would take more than 268,435,488 bytes (8 per byte of the 4 "
        "stored + 256 MiB), reached at tensor 'fc.weight': its tensors claim far more elements "
        "than are stored (strides of 0, overlapping or shared views)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broadcast.pth"]
    assert main(["convert", str(path), str(out)]) == 3  # one line on stderr, no traceback


@pytest.mark.parametrize("rows", ROWS)
def test_diff_compares_what_both_repeat_once(
    tmp_path: Path, rows: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """``smartload diff A B`` of two broadcast heads (0.5 and 0.25 everywhere): the dimensions
    both repeat are compared once, the counts are of the elements claimed (it hung)."""
    a = attacks.broadcast_head(tmp_path / "a", rows)
    b = attacks.broadcast_head(tmp_path / "b", rows, value=0.25)
    started = time.perf_counter()
    assert main(["diff", str(a), str(b), "--json"]) == 1
    assert time.perf_counter() - started < 5
    assert json.loads(capsys.readouterr().out)["value_differs"] == {
        "fc.weight": {"elements": rows * 8, "numel": rows * 8, "max_abs_diff": 0.25},
        "fc.bias": {"elements": rows, "numel": rows, "max_abs_diff": 0.25},
    }


@pytest.mark.parametrize("n", [2**10, 2**14, 2**18])
def test_diff_of_overlapping_rows_stays_within_the_budget(
    tmp_path: Path, n: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two files of n × n overlapping rows over 2n - 1 floats: compared while n² fits 8 bytes
    per stored byte + 256 MiB (n = 2**10), refused past it (2 GB and 512 GB claimed)."""
    a, b = attacks.overlapping_rows(tmp_path / "a", n), attacks.overlapping_rows(tmp_path / "b", n)
    code = main(["diff", str(a), str(b)])
    err = capsys.readouterr().err
    if n * n * 8 <= 8 * 8 * (2 * n - 1) + 256 * MiB:
        assert (code, err) == (0, "")
        return
    assert code == 3
    assert "smartload: unreadable: " in err and "comparing the state dict would take" in err


# --------------------------------------------------------------------------------------------------
# class 5: references that lead back to themselves


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (attacks.index_naming_itself, "names itself as a shard"),
        (
            attacks.indexes_naming_each_other,
            "{tmp}/b.bin names {tmp}/a.bin, which is already being read (shard indexes naming "
            "each other)",
        ),
    ],
)
def test_indexes_naming_themselves_are_refused(
    tmp_path: Path, make: Any, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An index that is its own shard, or two that are each other's: refused at the second
    visit, naming the file given and the one that names it back."""
    path = make(tmp_path)
    model = torch.nn.Linear(2, 1)
    before = snapshot(model)
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.load(model, path)
    assert_unchanged(model, before)
    assert (caught.value.path, caught.value.problem) == (str(path), problem.format(tmp=tmp_path))
    assert caught.value.hint == "The shards of an index must be weights files; regenerate the index"
    assert _cli_fails_cleanly(path, capsys)


@pytest.mark.parametrize("n", [2, 7, 8, 2_000])
def test_index_chains_are_followed_eight_deep(
    tmp_path: Path, n: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Indexes naming indexes: followed iteratively up to 8 files deep, then refused."""
    path = attacks.index_chain(tmp_path, n)
    if n <= 7:
        assert list(smartload.inspect(path).tensors) == ["weight"]
        return
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.inspect(path)
    assert caught.value.problem == (
        f"shard indexes or directories nested more than 8 deep (at {tmp_path}/i8.bin)"
    )
    assert _cli_fails_cleanly(path, capsys)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (attacks.symlink_chain, "cannot stat: Too many levels of symbolic links"),
        (
            attacks.shard_symlink_chain,
            "shard 'shard0.bin': cannot resolve its symbolic links (a loop, or a chain too long)",
        ),
    ],
)
@pytest.mark.parametrize("n", [10, 30, 1_500])
def test_symlink_chains_are_resolved_with_a_limit(
    tmp_path: Path, make: Any, problem: str, n: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint (or a shard) behind n symbolic links: read up to the kernel's 40 links,
    refused with a typed error at 1,500 (it overflowed Python's stack)."""
    path = make(tmp_path, n)
    if n <= 30:
        assert list(smartload.inspect(path).tensors) == ["weight"]
        return
    model = torch.nn.Linear(2, 1)
    before = snapshot(model)
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.load(model, path)
    assert_unchanged(model, before)
    assert (caught.value.path, caught.value.problem) == (str(path), problem)
    assert _cli_fails_cleanly(path, capsys)


def _cli_fails_cleanly(path: Path, capsys: pytest.CaptureFixture[str]) -> bool:
    """``smartload inspect`` exits 3 with one line, no traceback."""
    capsys.readouterr()
    code = main(["inspect", str(path)])
    err = capsys.readouterr().err
    return code == 3 and err.startswith("smartload: unreadable: ") and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# a global's name: one long memoized string named again and again


def _long_global_name(size: int, lookups: int) -> bytes:
    """``STACK_GLOBAL`` of one memoized ``size``-character module name, ``lookups`` times."""
    module = b"m" * size
    body = b"X" + len(module).to_bytes(4, "little") + module + b"\x940"  # BINUNICODE, MEMOIZE, POP
    body += b"h\x00\x8c\x01x\x930" * lookups  # BINGET 0, "x", STACK_GLOBAL, POP
    return b"\x80\x04" + body + b"}."


@pytest.mark.parametrize("lookups", [2_000, 20_000])
def test_a_long_global_name_is_refused_before_it_is_copied(tmp_path: Path, lookups: int) -> None:
    """Each lookup used to copy and hash the 500 KB name (20,000 lookups: 10 s)."""
    path = tmp_path / "names.pkl"
    path.write_bytes(_long_global_name(500_000, lookups))
    started = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match="a global named by 500,001 characters"):
        smartload.inspect(path)
    assert time.perf_counter() - started < 2.0
