"""Sharded loads on 2 gloo ranks (FSDP2, tensor parallel): ``tests/dist/scenarios.py`` runs
under ``torch.distributed.run`` once, and each test checks what every rank saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

WORLD = 2
SCENARIOS = Path(__file__).parent / "dist" / "scenarios.py"


def run_scenarios(out: Path, world: int, *names: str) -> list[dict[str, Any]]:
    """Run ``names`` (default: all for 2 ranks) on ``world`` gloo ranks; each rank's results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={world}", str(SCENARIOS), str(out), *names]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for rank in results:
        crashed = {k: v["crash"] for k, v in rank.items() if isinstance(v, dict) and "crash" in v}
        assert not crashed, crashed
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_scenarios(tmp_path_factory.mktemp("sharded"), WORLD)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    names = ("fsdp_safetensors", "hsdp_safetensors", "tiny_head", "same_shape_bytes")
    return run_scenarios(tmp_path_factory.mktemp("sharded4"), 4, *names)


FORMATS = ("torch", "safetensors", "index", "dcp")
HEAD_LOADS = [f"{k}_{f}" for k in ("fsdp", "tp") for f in FORMATS]


@pytest.mark.parametrize("name", HEAD_LOADS)
def test_head_load_equals_one_process_load(ranks: list[dict[str, Any]], name: str) -> None:
    """1000 → 10 classes, rows from both halves of the old head and two new classes: every
    local shard is bit-exact the same box of a one-process load with the same seed, parameters
    are the same objects, and the report is identical on both ranks."""
    for rank in ranks:
        result = rank[name]
        assert result["error"] is None
        assert result["equal"] == dict.fromkeys(result["equal"], True)
        assert set(result["equal"]) == {
            "body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias",
            "norm.weight", "norm.bias", "head.weight", "head.bias",
        }  # fmt: skip
        assert result["same_params"] is True
    assert ranks[0][name]["report"] == ranks[1][name]["report"]
    report = ranks[0][name]["report"]
    assert report["summary"]["slice"] == 2 and report["summary"]["copy"] == 6
    assert report["heads"][0]["class_map"] == [0, 999, 500, 3, None, 7, 600, 998, None, 1]
    assert report["distributed"]["world_size"] == WORLD
    assert [r["rank"] for r in report["distributed"]["ranks"]] == [0, 1]


def test_each_rank_reads_about_half_of_a_same_shape_checkpoint(
    ranks: list[dict[str, Any]],
) -> None:
    """Bytes read as /proc/self/io counts them (read() calls, from outside the loader): at most
    1/2 + 5 % of the checkpoint per rank, and what the report says within the headers' few KB
    (the files' and, for DCP, each chunk's own small archive header)."""
    for name in ("same_shape_bytes", "dcp_same_shape_bytes"):
        for rank, result in enumerate(r[name] for r in ranks):
            assert result["error"] is None
            size = result["file_bytes"]
            reported = result["report"]["distributed"]["ranks"][rank]["bytes_read"]
            assert 0.49 * size < reported <= 0.51 * size, (name, rank)
            assert reported <= result["bytes_outside"] <= reported + 32_768, (name, rank)
            checkpoint_bytes = result["report"]["distributed"]["checkpoint_bytes"]
            assert checkpoint_bytes == pytest.approx(size, rel=0.02)


def test_head_loads_read_about_half_too(ranks: list[dict[str, Any]]) -> None:
    """With a class map the rows a rank's head needs may lie anywhere; the head is small."""
    for name in HEAD_LOADS:
        dist = ranks[0][name]["report"]["distributed"]
        for r in dist["ranks"]:
            assert r["bytes_read"] <= 0.6 * dist["checkpoint_bytes"], (name, r)


def test_forward_after_fsdp_load_equals_the_unsharded_model(ranks: list[dict[str, Any]]) -> None:
    assert [r["forward_after_fsdp_load"]["forward_equal"] for r in ranks] == [True, True]


def test_default_seed_is_rank_0s_draw_from_the_default_generator(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in ranks:
        result = rank["default_seed_follows_manual_seed"]
        assert result["equal"] == dict.fromkeys(result["equal"], True)


def test_a_head_with_fewer_rows_than_ranks(ranks: list[dict[str, Any]]) -> None:
    assert [r["tiny_head"]["local_rows"] for r in ranks] == [1, 0]
    for rank in ranks:
        assert rank["tiny_head"]["equal"] == dict.fromkeys(rank["tiny_head"]["equal"], True)


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        (
            "nan_in_dropped_row",
            "CheckpointFormatError",
            "rank 1: {root}/nan_dropped_row.safetensors: non-finite values in 1 tensor(s): "
            "head.weight (1 NaN).",
        ),
        (
            "nan_in_rank1_rows",
            "CheckpointFormatError",
            "rank 1: {root}/nan_rank1_rows.safetensors: non-finite values in 1 tensor(s): "
            "body.0.weight (1 NaN).",
        ),
        (
            "path_missing_on_rank1",
            "CheckpointFormatError",
            "rank 1: {root}/gone.safetensors: no such file or directory\n"
            "Nothing was loaded on any rank (a failure while planning).",
        ),
        (
            "different_plans",
            "InvalidArgumentError",
            "the ranks made different plans (rank 0 and rank(s) 1 differ). Nothing was loaded "
            "on any rank.",
        ),
        (
            "partial_placement",
            "InvalidArgumentError",
            "ranks 0, 1: 1 model key(s) are sharded in a way that is not a box of the global "
            "tensor: head.bias (Partial(sum)). Nothing was loaded on any rank.",
        ),
    ],
)
def test_a_failure_on_one_rank_fails_every_rank_and_writes_nothing(
    ranks: list[dict[str, Any]], name: str, error: str, message: str
) -> None:
    root = ranks[0]["checkpoints"]
    for rank in ranks:
        result = rank[name]
        assert result["error"] == error
        assert result["message"].startswith(message.format(root=root))
        assert result["ranks"] == ([0, 1] if message.startswith("ranks 0, 1") else [1]) or (
            name == "different_plans" and result["ranks"] is None
        )
        assert result["untouched"] is True
    assert ranks[0][name]["message"] == ranks[1][name]["message"]


def test_a_replicated_model_with_a_process_group_loads_all_or_nothing(
    ranks: list[dict[str, Any]],
) -> None:
    root = ranks[0]["checkpoints"]
    for rank in ranks:
        failed = rank["ddp_group_missing_path"]
        assert failed["error"] == "CheckpointFormatError"
        assert failed["message"].startswith(f"rank 1: {root}/gone.safetensors: no such file")
        assert failed["untouched"] is True
        loaded = rank["ddp_group_load"]
        assert loaded["equal"] == dict.fromkeys(loaded["equal"], True)
        assert loaded["report"]["distributed"]["world_size"] == WORLD


def test_four_ranks_fsdp_and_hsdp(four_ranks: list[dict[str, Any]]) -> None:
    """FSDP2 over 4 ranks and HSDP (2 replicas × 2 shards): bit-exact, a quarter (FSDP) or a
    half (HSDP) of the file per rank; a 1-class head held by rank 0 alone."""
    for rank, result in enumerate(four_ranks):
        for name in ("fsdp_safetensors", "hsdp_safetensors", "tiny_head"):
            assert result[name]["equal"] == dict.fromkeys(result[name]["equal"], True), name
        same = result["same_shape_bytes"]
        assert 0.20 * same["file_bytes"] < same["bytes_outside"] <= 0.30 * same["file_bytes"]
        hsdp = result["hsdp_safetensors"]["report"]["distributed"]["ranks"][rank]["bytes_read"]
        assert (
            hsdp <= 0.55 * result["hsdp_safetensors"]["report"]["distributed"]["checkpoint_bytes"]
        )
    assert [r["tiny_head"]["local_rows"] for r in four_ranks] == [1, 0, 0, 0]


def test_a_dcp_save_loads_in_its_own_layout_reading_each_ranks_own_chunks(
    ranks: list[dict[str, Any]],
) -> None:
    """Every shard equals what torch's own ``dcp.load`` reads there (and, for the same load
    from a .safetensors file, what safetensors' ``load_file`` reads)."""
    for rank in ranks:
        for name in ("dcp_same_shape_bytes", "same_shape_bytes"):
            equal = rank[name]["equal_to_torch"]
            assert equal == dict.fromkeys(equal, True) and len(equal) == 8, name
        result = rank["dcp_same_shape_bytes"]
        assert result["error"] is None and result["report"]["format"] == "dcp"
        assert result["bytes_outside"] <= 0.55 * result["file_bytes"]


def test_a_hostile_dcp_metadata_is_refused_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        result = rank["dcp_hostile_metadata"]
        assert result["error"] == "UnsafeCheckpointError"
        assert result["message"].startswith("ranks 0, 1: ")
        assert "posix.system" in result["message"]
        assert result["untouched"] is True


def test_a_chunk_only_the_last_rank_reads_is_broken(ranks: list[dict[str, Any]]) -> None:
    root = ranks[0]["checkpoints"]
    for rank in ranks:
        result = rank["dcp_chunk_broken_on_last_rank"]
        assert result["error"] == "CheckpointFormatError"
        assert result["message"].startswith(f"rank 1: {root}/dcp_broken/__1_0.distcp")
        assert result["message"].endswith(
            "Nothing was loaded on any rank (a failure while reading)."
        )
        assert result["untouched"] is True


def test_finite_half_precision_values_whose_sum_overflows_are_loaded(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in ranks:
        result = rank["half_precision_sums_overflow"]
        assert result["error"] is None and result["all_twos"] is True
        assert result["report"]["summary"]["copy"] == 2


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        (
            "meta_model_with_a_group",
            "InvalidArgumentError",
            "ranks 0, 1: 8 model tensor(s) are on the meta device (body.0.bias, body.0.weight, "
            "body.2.bias, body.2.weight, head.bias ...): a collective load copies into the tensors "
            "each rank has.",
        ),
        (
            "own_loader_module",
            "InvalidArgumentError",
            "ranks 0, 1: module(s) norm load through their own _load_from_state_dict, which "
            "cannot be run shard by shard.",
        ),
        (
            "dry_run_on_rank1_only",
            "InvalidArgumentError",
            "the ranks made different plans (rank 0 and rank(s) 1 differ).",
        ),
        (
            "report_path_unwritable_on_rank0",
            "InvalidArgumentError",
            "rank 0: report_path '{root}/not_a_directory/report.json' cannot be written",
        ),
        (
            "dcp_bit_flip_with_checksums",
            "CheckpointFormatError",
            "ranks 0, 1: {root}/dcp_flipped/__0_0.distcp: CRC mismatch in the chunk at byte",
        ),
    ],
)
def test_arguments_that_would_put_ranks_out_of_step_are_agreed_on(
    ranks: list[dict[str, Any]], name: str, error: str, message: str
) -> None:
    root = ranks[0]["checkpoints"]
    for rank in ranks:
        result = rank[name]
        assert (result["error"], result["untouched"]) == (error, True)
        assert result["message"].startswith(message.format(root=root)), result["message"]


def test_report_is_written_by_rank_0_only(ranks: list[dict[str, Any]]) -> None:
    result = ranks[0]["report_file"]
    assert result["file"] == result["report"] == ranks[1]["report_file"]["report"]
    assert result["leftovers"] == []
    assert "sharded over 2 ranks" in result["text"].splitlines()[1]
