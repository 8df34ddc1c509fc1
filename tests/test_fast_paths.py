"""The paths taken for speed (benchmarks/) give exactly what the simple ones would.

Batched value checks, one ``_foreach_copy_`` for the whole model, the model walk that replaces
``state_dict()``, our own zip directory reader (zip64 included), the opcode prescan on truncated
input, and the garbage collector paused only for the duration of a load.
"""

from __future__ import annotations

import gc
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, make_net, snapshot
from torch import nn

import smartload
from smartload._plan import model_tensors
from smartload.errors import CheckpointFormatError


class Mixed(nn.Module):
    """Small tensors of three float dtypes (checked in batches) and large ones (one by one)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4, 4))
        self.b = nn.Parameter(torch.zeros(8, dtype=torch.float16))
        self.c = nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
        self.big = nn.Parameter(torch.zeros(300, 300))  # 90,000 elements: checked alone
        self.huge = nn.Parameter(torch.zeros(300, 300))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def _mixed_checkpoint(tmp_path: Path, poison: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in Mixed().state_dict().items()}
    sd["steps"] = torch.tensor(41)
    sd["huge"] = torch.full((300, 300), 3e38)  # finite, but its sum overflows to inf
    if poison:
        sd["a"][1, 2] = float("nan")
        sd["b"][3] = float("inf")
        sd["big"][7, 7] = float("-inf")
        sd["big"][8, 8] = float("nan")
    path = tmp_path / "mixed.pth"
    torch.save(sd, path)
    return path, sd


def test_batched_and_single_checks_name_exactly_the_broken_tensors(tmp_path: Path) -> None:
    path, _ = _mixed_checkpoint(tmp_path, poison=True)
    model = Mixed()
    before = snapshot(model)
    with pytest.raises(CheckpointFormatError) as caught:
        smartload.load(model, path)
    assert "non-finite values in 3 tensor(s): a (1 NaN), b (1 Inf), big (1 NaN, 1 Inf). " in str(
        caught.value
    )
    assert_unchanged(model, before)


def test_finite_values_whose_sum_overflows_load(tmp_path: Path) -> None:
    path, sd = _mixed_checkpoint(tmp_path, poison=False)
    model = Mixed()
    smartload.load(model, path)
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), key


class Float8(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.zeros(5, dtype=torch.float8_e4m3fn))


def test_float8_tensors_are_checked_and_copied(tmp_path: Path) -> None:
    """torch has no sum or isfinite for float8: they are checked through an upcast."""
    good = torch.tensor([0.5, -1.0, 2.0, 0.0, 448.0]).to(torch.float8_e4m3fn)
    torch.save({"w": good}, tmp_path / "good.pth")
    model = Float8()
    smartload.load(model, tmp_path / "good.pth")
    assert torch.equal(model.w.view(torch.uint8), good.view(torch.uint8))

    bad = good.clone()
    bad.view(torch.uint8)[1] = 0x7F  # e4m3fn's NaN
    torch.save({"w": bad}, tmp_path / "bad.pth")
    model = Float8()
    with pytest.raises(
        CheckpointFormatError, match=r"non-finite values in 1 tensor\(s\): w \(1 NaN\)"
    ):
        smartload.load(model, tmp_path / "bad.pth")
    assert torch.equal(model.w.float(), torch.zeros(5))


def test_fp16_file_into_fp32_model_in_one_batched_copy(tmp_path: Path) -> None:
    sd = {
        k: v.half() if v.is_floating_point() else v
        for k, v in make_net(10, seed=3).state_dict().items()
    }
    torch.save(sd, tmp_path / "half.pth")
    model = make_net(10)
    params = {k: v for k, v in model.named_parameters()}
    report = smartload.load(model, tmp_path / "half.pth")
    assert {e.cast for e in report.entries} == {"exact", None}  # num_batches_tracked: int64
    for key, value in model.state_dict().items():
        assert value.dtype == (
            torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        )
        assert torch.equal(value, sd[key].to(value.dtype)), key
    assert all(params[k] is p for k, p in model.named_parameters())  # identity kept


class WithExtras(nn.Module):
    """Everything the direct model walk must agree with state_dict() on."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(2, 2)
        self.again = self.shared  # the same module under two names: both prefixes listed
        self.register_buffer("kept", torch.ones(1))
        self.register_buffer("dropped", torch.ones(1), persistent=False)
        self.register_parameter("absent", None)
        self.bn = nn.BatchNorm1d(2)


class Extra(nn.Linear):
    """Extra state as a tensor: a fresh one from each ``get_extra_state`` call."""

    def __init__(self, *args: int) -> None:
        super().__init__(*args)
        self.extra = torch.tensor([1.0])

    def get_extra_state(self) -> torch.Tensor:
        return self.extra.clone()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.extra = state.clone()


def _hooked() -> nn.Module:
    model = WithExtras()
    model.bn._register_state_dict_hook(lambda module, sd, prefix, local: sd)
    return model


@pytest.mark.parametrize("build", [WithExtras, _hooked, lambda: nn.Sequential(Extra(2, 2))])
def test_model_walk_equals_state_dict(build: type[nn.Module]) -> None:
    model = build()
    expected = {
        k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)
    }
    got = model_tensors(model)
    assert list(got) == list(expected)
    assert all(got[k] is expected[k] for k in got if not k.endswith("._extra_state"))


def test_extra_state_goes_through_set_extra_state(tmp_path: Path) -> None:
    source = nn.Sequential(Extra(2, 2))
    source[0].extra = torch.tensor([7.0])
    torch.save(source.state_dict(), tmp_path / "extra.pth")
    model = nn.Sequential(Extra(2, 2))
    smartload.load(model, tmp_path / "extra.pth")
    assert torch.equal(model[0].extra, torch.tensor([7.0]))
    assert torch.equal(model[0].weight, source[0].weight)


def _to_zip64(data: bytes) -> bytes:
    """Rewrite a stored zip so every entry takes the zip64 path (sizes and offsets in extras)."""
    end = data.rindex(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack_from("<HLL", data, end + 10)
    pos, central = cd_offset, b""
    for _ in range(count):
        fields = list(struct.unpack_from("<4s4B4HL2L5H2L", data, pos))
        nlen, xlen, clen = fields[12:15]
        name = data[pos + 46 : pos + 46 + nlen]
        csize, usize, offset = fields[10], fields[11], fields[18]
        extra = struct.pack("<2H3Q", 1, 24, usize, csize, offset)
        fields[10] = fields[11] = fields[18] = 0xFFFFFFFF
        fields[13], fields[14] = len(extra), 0
        central += struct.pack("<4s4B4HL2L5H2L", *fields) + name + extra
        pos += 46 + nlen + xlen + clen
    body = data[:cd_offset]
    eocd64_at = len(body) + len(central)
    eocd64 = struct.pack(
        "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), len(body)
    )
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd64_at, 1)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return body + central + eocd64 + locator + eocd


def test_zip64_archives_load(tmp_path: Path) -> None:
    """torch.save writes zip64 records past 4 GB; the directory reader follows them."""
    sd = make_net(10, seed=5).state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    path = tmp_path / "zip64.pth"
    path.write_bytes(_to_zip64((tmp_path / "plain.pth").read_bytes()))
    with zipfile.ZipFile(path) as archive:  # the rewrite is a valid zip64 archive
        assert archive.testzip() is None
        assert archive.infolist()[0].extra[:2] == b"\x01\x00"
    model = make_net(10)
    smartload.load(model, path)
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_zip64_entry_without_its_extra_field_is_refused(tmp_path: Path) -> None:
    torch.save(make_net(10).state_dict(), tmp_path / "plain.pth")
    data = bytearray(_to_zip64((tmp_path / "plain.pth").read_bytes()))
    first = data.index(b"PK\x01\x02")
    data[first + 30 : first + 32] = b"\x00\x00"  # extra length 0: the 64-bit values are gone
    (tmp_path / "broken.pth").write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="corrupt zip archive"):
        smartload.inspect(tmp_path / "broken.pth")


def test_pickle_cut_inside_an_opcode_argument(tmp_path: Path) -> None:
    """The prescan reads 4-byte arguments with struct; a cut one is a malformed pickle."""
    data = pickle.dumps([f"k{i}" for i in range(300)], protocol=2)  # 301 memo entries
    at = next(pos for op, _, pos in pickletools.genops(data) if op.name == "LONG_BINPUT")
    cut = data[: at + 3]  # the first LONG_BINPUT and two bytes of its four
    path = tmp_path / "cut.pkl"
    path.write_bytes(cut)
    with pytest.raises(CheckpointFormatError, match="malformed pickle"):
        smartload.inspect(path)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_left_as_it_was(tmp_path: Path, enabled: bool) -> None:
    torch.save(make_net(10).state_dict(), tmp_path / "ckpt.pth")
    (gc.enable if enabled else gc.disable)()
    try:
        smartload.load(make_net(10), tmp_path / "ckpt.pth")
        assert gc.isenabled() is enabled
        with pytest.raises(CheckpointFormatError):
            smartload.load(make_net(10), tmp_path / "missing.pth")
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


class Odd(nn.Module):
    """An empty buffer (no values to check) and a complex32 one (torch cannot sum it)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("empty", torch.empty(0))
        self.register_buffer("half_complex", torch.zeros(3, dtype=torch.complex32))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_empty_and_complex32_tensors_are_checked(tmp_path: Path) -> None:
    values = torch.tensor([1 + 2j, -0.5j, 3.0], dtype=torch.complex64).to(torch.complex32)
    torch.save({"empty": torch.empty(0), "half_complex": values}, tmp_path / "good.pth")
    model = Odd()
    smartload.load(model, tmp_path / "good.pth")
    assert torch.equal(model.half_complex.to(torch.complex64), values.to(torch.complex64))

    broken = values.clone()
    broken[1] = complex(0, float("nan"))
    torch.save({"empty": torch.empty(0), "half_complex": broken}, tmp_path / "bad.pth")
    with pytest.raises(
        CheckpointFormatError, match=r"non-finite values in 1 tensor\(s\): half_complex \(1 NaN\)"
    ):
        smartload.load(Odd(), tmp_path / "bad.pth")


def test_zip64_extra_field_longer_than_its_space(tmp_path: Path) -> None:
    torch.save(make_net(10).state_dict(), tmp_path / "plain.pth")
    data = bytearray(_to_zip64((tmp_path / "plain.pth").read_bytes()))
    first = data.index(b"PK\x01\x02")
    name_length = struct.unpack_from("<H", data, first + 28)[0]
    extra = first + 46 + name_length
    data[extra + 2 : extra + 4] = struct.pack("<H", 400)  # the zip64 field claims 400 bytes
    (tmp_path / "broken.pth").write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="an extra field longer than the space it has"):
        smartload.inspect(tmp_path / "broken.pth")


def test_state_dict_overridden_on_an_instance_is_honoured() -> None:
    model = WithExtras()
    original = model.state_dict
    model.state_dict = lambda *a, **k: {  # type: ignore[method-assign]
        k2: v for k2, v in original(*a, **k).items() if k2 != "kept"
    }
    assert "kept" not in model_tensors(model)
    assert "shared.weight" in model_tensors(model)


class Refuses(nn.Linear):
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ):  # type: ignore[no-untyped-def]
        errors.append("refused on purpose")


def test_a_module_that_refuses_leaves_the_whole_model_unchanged(tmp_path: Path) -> None:
    """Modules with their own loading run before the batched copy: theirs is the step that can
    fail, and nothing else has been written when it does."""
    source = nn.Sequential(nn.Linear(2, 2), Refuses(2, 2))
    torch.save(source.state_dict(), tmp_path / "ckpt.pth")
    model = nn.Sequential(nn.Linear(2, 2), Refuses(2, 2))
    before = snapshot(model)
    with pytest.raises(CheckpointFormatError, match="module '1' refused: refused on purpose"):
        smartload.load(model, tmp_path / "ckpt.pth")
    assert_unchanged(model, before)
