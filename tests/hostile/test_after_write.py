"""Nothing is raised once writing has started: casts are decided in the plan and made (and their
values checked) before the first write, warnings cannot escape mid-write, and a module's own loader
that refuses leaves every module loaded before it as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, make_net, snapshot
from torch import nn

import smartload
from smartload import CheckpointFormatError, IncompatibleCheckpointError, InvalidArgumentError
from smartload._plan import cast_kind, cast_refusal

# --------------------------------------------------------------------------------------------------
# under `python -W error`: the model is either fully written or unchanged

SCRIPT = """
import json, logging, sys, warnings
import torch, smartload
from torch import nn

class Warns(nn.Linear):
    def _load_from_state_dict(self, *args):
        warnings.warn("old layout, converted", UserWarning)
        super()._load_from_state_dict(*args)

logging.basicConfig(level=logging.WARNING)
path, policy = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 2), Warns(2, 2))
before = {k: v.clone() for k, v in model.state_dict().items()}
saved = torch.load(path, weights_only=True)
try:
    smartload.load(model, path, policies={"0.weight": policy} if policy != "none" else None)
    outcome = "loaded"
except smartload.SmartloadError as exc:
    outcome = f"{type(exc).__name__}: {exc}"
after = model.state_dict()
if all(torch.equal(after[k], before[k]) for k in before):
    state = "unchanged"
elif all(torch.equal(after[k], saved[k].real) for k in before):
    state = "written"
else:
    state = "partial"
print(json.dumps({"outcome": outcome, "state": state}))
"""


def _run_under_w_error(path: Path, policy: str) -> tuple[dict[str, str], str]:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", SCRIPT, str(path), policy],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture
def complex_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    source = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    sd = source.state_dict()
    sd["0.weight"] = torch.complex(sd["0.weight"], torch.ones(2, 3))
    torch.save(sd, tmp_path / "complex.pth")
    return tmp_path / "complex.pth"


def test_complex_into_float_under_w_error_is_refused_before_writing(
    complex_checkpoint: Path,
) -> None:
    """The plan refuses complex → real, naming the key and the fix; the model is unchanged."""
    result, _ = _run_under_w_error(complex_checkpoint, "none")
    assert result == {
        "outcome": (
            f"IncompatibleCheckpointError: cannot load 1 key(s) from {complex_checkpoint}:\n"
            "  0.weight: checkpoint [2, 3] vs model [2, 3]\n"
            "dtypes that cannot be cast: 0.weight (complex64 → float32: a complex → real cast "
            "discards the imaginary part). Nothing was loaded. Build the model in the "
            "checkpoint's dtype, pass policies={'0.weight': 'copy'} to keep only the real part "
            "(what load_state_dict does, with a warning), or pass policies={'0.weight': 'skip' "
            "| 'reinit-normal'} to leave the key out"
        ),
        "state": "unchanged",
    }


def test_complex_into_float_asked_for_under_w_error_is_written_whole(
    complex_checkpoint: Path,
) -> None:
    """With a copy policy the real part loads; a module loader's warning is logged, not raised."""
    result, stderr = _run_under_w_error(complex_checkpoint, "copy")
    assert result == {"outcome": "loaded", "state": "written"}
    assert "while loading: UserWarning: old layout, converted" in stderr


def test_complex_cast_is_in_the_plan(complex_checkpoint: Path) -> None:
    """diff refuses it too (the plan decides), and reports an asked-for one as lossy."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with pytest.raises(IncompatibleCheckpointError) as caught:
        smartload.diff(model, complex_checkpoint)
    assert caught.value.mismatches == [("0.weight", (2, 3), (2, 3))]
    plan = smartload.diff(model, complex_checkpoint, policies={"0.*": "copy"})
    entry = next(e for e in plan.entries if e.key == "0.weight")
    assert (entry.cast, entry.reason) == ("lossy", "policy '0.*'; imaginary part discarded")


def test_cast_decisions() -> None:
    """Exact, lossy and refused casts, as the plan names them."""
    assert cast_kind("float16", "complex64") == "exact"
    assert cast_kind("uint16", "int32") == "exact"
    assert cast_kind("int64", "int8") == "lossy"
    assert cast_kind("float32", "int64") == "lossy"
    assert cast_kind("complex64", "float32") == "lossy"
    assert cast_refusal("complex128", "float64") == (
        "a complex → real cast discards the imaginary part"
    )
    assert cast_refusal("complex64", "complex128") is None
    assert cast_refusal("bits8", "uint8") == "torch has no conversion from bits8 to uint8"
    assert cast_refusal("float32", "int8") is None


# --------------------------------------------------------------------------------------------------
# lossy casts: made before writing when every value fits, refused when one does not

MATRIX = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
    torch.complex64, torch.int64, torch.int32, torch.int8, torch.uint8, torch.uint16,
    torch.uint64, torch.bool,
)  # fmt: skip
VALUES = (0.0, 1.0, -1.0, 2.5, -127.9, 200.0, -129.0, 300.0, 7e4, 3e9, 1e19, 3e38, 1e300)
SPECIAL = (float("nan"), float("inf"))


def _in(dtype: torch.dtype) -> list[torch.Tensor]:
    """One-element tensors of ``dtype`` holding each candidate value it can hold exactly."""
    out = []
    floating = dtype.is_floating_point or dtype.is_complex
    for v in VALUES + (SPECIAL if floating else ()):
        x = torch.tensor([v], dtype=torch.float64)
        if dtype is torch.uint64 and v < 0:
            continue
        with torch.no_grad():
            y = x.to(dtype)
        back = y.real.to(torch.float64) if y.is_complex() else y.to(torch.float64)
        if torch.equal(back, x) or (v != v and bool(back.isnan().all())):
            out.append(y)
    return out


def _faithful(value: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether torch's cast keeps the value, up to rounding (or truncation into integers)."""
    if dtype is torch.bool:
        return True
    got = torch.empty(1, dtype=dtype).copy_(value)
    x, y = (t.real if t.is_complex() else t for t in (value, got))
    x, y = x.to(torch.float64), y.to(torch.float64)
    if bool(x.isnan().all()):
        return bool(y.isnan().all())
    if dtype.is_floating_point or dtype.is_complex:
        return bool(((x - y).abs() <= 0.07 * x.abs()).all()) or torch.equal(x, y)
    return bool(((x - y).abs() < 1).all())


class _Holder(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("b", torch.ones(1).to(dtype))


@pytest.mark.parametrize("src", MATRIX, ids=str)
@pytest.mark.parametrize("dst", MATRIX, ids=str)
def test_every_cast_is_torchs_or_refused_before_writing(src: torch.dtype, dst: torch.dtype) -> None:
    """Each value loads as torch's own cast makes it when that keeps the value; otherwise the load
    is refused with the model unchanged. Complex → real is always refused without a policy."""
    for value in _in(src):
        model = _Holder(dst)
        before = snapshot(model)
        try:
            smartload.load(model, {"b": value}, on_nonfinite="allow")
        except IncompatibleCheckpointError as exc:
            assert_unchanged(model, before)
            if src.is_complex and not dst.is_complex:
                assert "a complex → real cast discards the imaginary part" in str(exc)
            else:
                assert not _faithful(value, dst), (value, dst)
                assert "values that the model's dtype cannot hold: b" in str(exc)
            continue
        assert not (src.is_complex and not dst.is_complex)
        got = model.get_buffer("b")
        assert _faithful(value, dst), (value, dst, got)
        expected = torch.empty(1, dtype=dst).copy_(value)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_misfits_are_listed_all_at_once(tmp_path: Path) -> None:
    """Every key whose values do not fit is named with its dtypes and range, nothing written."""
    model = nn.Module()
    model.register_buffer("count", torch.zeros(3, dtype=torch.int8))
    model.register_buffer("scale", torch.zeros(2, dtype=torch.float16))
    model.register_buffer("index", torch.zeros(2, dtype=torch.int32))
    before = snapshot(model)
    torch.save(
        {
            "count": torch.tensor([1, 300, -2]),
            "scale": torch.tensor([1.0, 1e5], dtype=torch.float64),
            "index": torch.tensor([float("nan"), 1.0]),
        },
        tmp_path / "big.pth",
    )
    with pytest.raises(IncompatibleCheckpointError) as caught:
        smartload.load(model, tmp_path / "big.pth", on_nonfinite="allow")
    assert str(caught.value).splitlines()[-1] == (
        "values that the model's dtype cannot hold: "
        "count (int64 → int8: values from -2 to 300, beyond int8's range [-128, 127]); "
        "scale (float64 → float16: values from 1 to 100000, beyond float16's range "
        "[-65504, 65504]); index (float32 → int32: NaN or Inf cannot be stored in int32). "
        "Nothing was loaded. Build the model in the checkpoint's dtype, or pass "
        "policies={'count': 'skip' | 'reinit-normal'} to leave the key out"
    )
    assert [m[0] for m in caught.value.mismatches] == ["count", "scale", "index"]
    assert_unchanged(model, before)


def test_a_sliced_head_is_checked_too(tmp_path: Path) -> None:
    """Rows a class map keeps are cast and checked like a copy."""
    source = make_net(5, seed=2).double()
    with torch.no_grad():
        source.fc.weight[3, 0] = 1e6
    torch.save(source.state_dict(), tmp_path / "head.pth")
    model = make_net(3).half()
    before = snapshot(model)
    with pytest.raises(IncompatibleCheckpointError, match=r"fc\.weight \(float64 → float16: "):
        smartload.load(model, tmp_path / "head.pth", num_classes=3, class_map=[0, 3, None])
    assert_unchanged(model, before)
    smartload.load(model, tmp_path / "head.pth", num_classes=3, class_map=[0, 1, None])
    assert torch.equal(model.fc.weight[:2], source.fc.weight[:2].half())


# --------------------------------------------------------------------------------------------------
# modules with their own loading: a refusal puts back the ones loaded before it


class Swaps(nn.Linear):
    """Its loader replaces its parameter objects and its buffer's storage, as some do."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.register_buffer("stat", torch.arange(3.0))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.weight = nn.Parameter(state_dict[prefix + "weight"].clone())
        self.bias.copy_(state_dict[prefix + "bias"])
        self.stat.data = state_dict[prefix + "stat"].clone()


class Refuses(nn.Linear):
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.weight.copy_(state_dict[prefix + "weight"])  # written, then refused
        args[-1].append("written by an incompatible version")


class Raises(nn.Linear):
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.bias.copy_(state_dict[prefix + "bias"])
        raise KeyError("scale")


def _identities(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {k: (id(v), v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize(
    ("last", "message"),
    [
        (Refuses, "<model>: module '2' refused: written by an incompatible version"),
        (Raises, "<model>: module '2' failed: KeyError: 'scale'"),
    ],
)
def test_a_refusing_module_leaves_earlier_ones_as_they_were(
    tmp_path: Path, last: type[nn.Linear], message: str
) -> None:
    """Tensors, parameter objects and storages of the modules loaded before are put back."""
    torch.manual_seed(3)
    torch.save(nn.Sequential(Swaps(), Swaps(), last(2, 2)).state_dict(), tmp_path / "c.pth")
    torch.manual_seed(4)
    model = nn.Sequential(Swaps(), Swaps(), last(2, 2))
    before, identities = snapshot(model), _identities(model)
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.load(model, tmp_path / "c.pth")
    assert str(caught.value) == (
        f"{message}. Nothing was loaded (modules loaded before it were put back)"
    )
    assert_unchanged(model, before)
    assert _identities(model) == identities


def test_a_refusing_module_leaves_a_meta_model_on_meta(tmp_path: Path) -> None:
    """Meta tensors get their new tensors only after every module's own loader agreed."""
    torch.save(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).state_dict(), tmp_path / "c.pth")
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 2))
    refusing = Refuses(2, 2)
    model.append(refusing)
    before = refusing.weight.detach().clone()
    with pytest.raises(CheckpointFormatError, match="module '1' refused"):
        smartload.load(model, tmp_path / "c.pth")
    assert all(t.is_meta for t in model[0].parameters())
    assert torch.equal(refusing.weight, before)


# --------------------------------------------------------------------------------------------------
# model tensors a copy into would fail on: refused before writing


def test_inference_tensors_are_refused_before_writing(tmp_path: Path) -> None:
    torch.save(make_net(10, seed=1).state_dict(), tmp_path / "net.pth")
    with torch.inference_mode():
        model = make_net(10)
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError) as caught:
        smartload.load(model, tmp_path / "net.pth")
    assert str(caught.value).startswith(
        "cannot write into 9 model tensor(s): conv.weight (an inference tensor: the model was "
        "built under inference_mode); conv.bias"
    )
    assert_unchanged(model, before)


def test_expanded_buffers_are_refused_before_writing(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    model.register_buffer("mask", torch.ones(1).expand(4))
    torch.save({**nn.Linear(2, 2).state_dict(), "mask": torch.zeros(4)}, tmp_path / "m.pth")
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError) as caught:
        smartload.load(model, tmp_path / "m.pth")
    assert str(caught.value) == (
        "cannot write into 1 model tensor(s): mask (its elements share memory, as an expanded "
        "tensor's do). Nothing was loaded. Build the model outside torch.inference_mode(), with "
        "tensors of their own (clone() expanded buffers), then load"
    )
    assert_unchanged(model, before)


def test_values_viewing_the_model_are_read_before_writing() -> None:
    """An in-memory checkpoint made of the model's own tensors, in another order or layout:
    every value is read before anything is written (torch refuses a half-overlapping copy)."""
    model = nn.Module()
    model.register_buffer("a", torch.zeros(2))
    model.register_buffer("b", torch.ones(2))
    a, b = model.get_buffer("a"), model.get_buffer("b")
    smartload.load(model, {"a": b, "b": a})
    assert (a.tolist(), b.tolist()) == ([1.0, 1.0], [0.0, 0.0])
    linear = nn.Linear(2, 2)
    weight = linear.weight.detach().clone()
    smartload.load(linear, {"weight": linear.weight.detach().t(), "bias": linear.bias.detach()})
    assert torch.equal(linear.weight, weight.t())
