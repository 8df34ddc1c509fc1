"""torch is the reference: for a file ``torch.load(weights_only=True)`` reads, ``smartload.load``
gives exactly what ``load_state_dict`` gives (pre-hooks and ``_load_from_state_dict`` overrides
included), or a typed refusal with the model unchanged. Also meta-device models and the
non-finite policy."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_tensors, assert_unchanged, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import smartload

Pair = tuple[Callable[[], nn.Module], Callable[[], nn.Module]]


def _old_weight_norm() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated API is the point
        return nn.Sequential(nn.utils.weight_norm(nn.Conv1d(3, 4, 3)), nn.ReLU())


def _new_weight_norm() -> nn.Module:
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3)), nn.ReLU())


class _Transposed(nn.Linear):
    """Keeps its weight transposed in old checkpoints (``w_t``): a pre-hook computes it."""

    def __init__(self) -> None:
        super().__init__(5, 3)
        self._register_load_state_dict_pre_hook(self._from_old)

    @staticmethod
    def _from_old(state: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "w_t" in state:
            state[prefix + "weight"] = state.pop(prefix + "w_t").t()


class _OldTransposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_t = nn.Parameter(torch.randn(5, 3))
        self.bias = nn.Parameter(torch.randn(3))


class _Scaled(nn.Linear):
    """A public pre-hook (with the module) that reads values: it cannot run on meta tensors."""

    def __init__(self) -> None:
        super().__init__(4, 2)
        self.register_load_state_dict_pre_hook(self._normalise)

    @staticmethod
    def _normalise(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "weight"
        if key in state:
            state[key] = state[key] / float(state[key].abs().max())


class _InPlace(nn.Linear):
    """A pre-hook that writes into the checkpoint's tensor."""

    def __init__(self) -> None:
        super().__init__(4, 2)
        self._register_load_state_dict_pre_hook(self._double)

    @staticmethod
    def _double(state: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "bias" in state:
            state[prefix + "bias"].mul_(2)


class _Refuses(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 2)
        self._register_load_state_dict_pre_hook(self._refuse)

    @staticmethod
    def _refuse(state: dict[str, Any], prefix: str, *args: Any) -> None:
        args[-1].append(f"{prefix}weight: written by an incompatible version")


class _OldSpectral(nn.Module):
    """spectral_norm's keys before its version 1: ``weight`` saved, ``weight_v`` not."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(3))
        self.weight_orig = nn.Parameter(torch.randn(3, 4))
        self.register_buffer("weight", self.weight_orig.detach() / 2)
        self.register_buffer("weight_u", nn.functional.normalize(torch.randn(3), dim=0))


def _wrapped(inner: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(2, 2), nn.Sequential(inner()))


PAIRS: dict[str, Pair] = {
    "weight_norm old → parametrizations": (_old_weight_norm, _new_weight_norm),
    "weight_norm nested": (_wrapped(_old_weight_norm), _wrapped(_new_weight_norm)),
    "spectral_norm": (
        lambda: nn.utils.spectral_norm(nn.Linear(4, 3)),
        lambda: nn.utils.spectral_norm(nn.Linear(4, 3)),
    ),
    "spectral_norm before version 1": (
        _OldSpectral,
        lambda: nn.utils.spectral_norm(nn.Linear(4, 3)),
    ),
    "computed by a pre-hook": (_OldTransposed, _Transposed),
    "pre-hook reading values": (_Scaled, _Scaled),
    "pre-hook writing in place": (_InPlace, _InPlace),
    "frozen batch norm": (
        lambda: nn.BatchNorm2d(4),
        lambda: __import__("torchvision").ops.FrozenBatchNorm2d(4),
    ),
    "min-max observer": (
        lambda: _observer(torch.randn(8)),
        lambda: _observer(None),
    ),
}


def _observer(data: torch.Tensor | None) -> nn.Module:
    """Its ``_load_from_state_dict`` resizes its buffers to the checkpoint's."""
    from torch.ao.quantization.observer import MinMaxObserver

    observer = MinMaxObserver()
    if data is not None:
        observer(data)
    return observer


def _torch_load(make: Callable[[], nn.Module], path: Path) -> nn.Module | Exception:
    torch.manual_seed(1)
    model = make()
    try:
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    except RuntimeError as exc:
        return exc
    return model


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_same_tensors_as_load_state_dict(tmp_path: Path, case: str) -> None:
    """Every module kind loads to exactly torch's tensors (or both refuse, the model unchanged)."""
    make_old, make_new = PAIRS[case]
    torch.manual_seed(0)
    path = tmp_path / "old.pth"
    torch.save(make_old().state_dict(), path)
    expected = _torch_load(make_new, path)
    torch.manual_seed(1)
    model = make_new()
    before = snapshot(model)
    if isinstance(expected, Exception):
        with pytest.raises(smartload.SmartloadError):
            smartload.load(model, path)
        assert_unchanged(model, before)
        return
    report = smartload.load(model, path)
    assert_same_tensors(model.state_dict(), expected.state_dict())
    # FrozenBatchNorm2d's own loader drops the key torch would otherwise call unexpected
    assert report.unused == (("num_batches_tracked",) if case == "frozen batch norm" else ())


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cases=st.lists(st.sampled_from(sorted(PAIRS)), min_size=1, max_size=4))
def test_compositions_load_as_load_state_dict(tmp_path: Path, cases: list[str]) -> None:
    """Module kinds nested side by side (each hook sees only its slice) still load as torch."""
    torch.manual_seed(0)
    path = tmp_path / "composed.pth"
    torch.save(nn.Sequential(*(PAIRS[c][0]() for c in cases)).state_dict(), path)

    def make() -> nn.Module:
        return nn.Sequential(*(PAIRS[c][1]() for c in cases))

    expected = _torch_load(make, path)
    torch.manual_seed(1)
    model = make()
    before = snapshot(model)
    if isinstance(expected, Exception):
        with pytest.raises(smartload.SmartloadError):
            smartload.load(model, path)
        assert_unchanged(model, before)
    else:
        smartload.load(model, path)
        assert_same_tensors(model.state_dict(), expected.state_dict())


def test_weight_norm_rename_is_reported(tmp_path: Path) -> None:
    """The old weight_norm keys are planned as what the pre-hook makes of them."""
    path = tmp_path / "old.pth"
    torch.save(_old_weight_norm().state_dict(), path)
    plan = smartload.diff(_new_weight_norm(), path)
    by_key = {e.key: e for e in plan.entries}
    original0 = by_key["0.parametrizations.weight.original0"]
    assert (original0.action, original0.source) == ("copy", "0.weight_g")
    assert original0.reason == (
        "same shape; renamed from 0.weight_g by ParametrizedConv1d pre-hook "
        "_weight_norm_compat_hook at '0'"
    )
    assert by_key["0.parametrizations.weight.original1"].source == "0.weight_v"
    assert plan.summary["copy"] == 3 and plan.unused == ()
    assert "renamed from 0.weight_v" in str(plan)


def test_computed_value_is_reported_with_its_inputs(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    torch.save(_OldTransposed().state_dict(), path)
    entry = next(e for e in smartload.diff(_Transposed(), path).entries if e.key == "weight")
    assert (entry.action, entry.source, entry.ckpt_shape, entry.transform) == (
        "copy",
        "w_t",
        (3, 5),
        "load pre-hook",
    )
    assert (
        entry.reason
        == "computed by _Transposed pre-hook _Transposed._from_old at '(root)' from w_t"
    )


def test_a_pre_hook_that_refuses_leaves_the_model_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(nn.Linear(4, 2).state_dict(), path)
    model = _Refuses()
    before = snapshot(model)
    with pytest.raises(smartload.IncompatibleCheckpointError) as info:
        smartload.load(model, path)
    assert "a load pre-hook of 'the model' refused: weight: written by an incompatible" in str(
        info.value
    )
    assert_unchanged(model, before)


def test_one_element_vector_into_a_scalar(tmp_path: Path) -> None:
    """load_state_dict accepts a [1] tensor for a 0-d parameter; so does smartload."""

    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.0))

    path = tmp_path / "ckpt.pth"
    torch.save({"scale": torch.tensor([3.5])}, path)
    model = Scalar()
    report = smartload.load(model, path)
    assert model.scale.shape == () and model.scale.item() == 3.5
    assert report.entries[0].reason == "one element → 0-d (as load_state_dict)"


# -------------------------------------------------------------------------------------------------
# meta-device models


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(4)


def test_meta_model_is_materialised_as_assign_would(tmp_path: Path) -> None:
    """New tensors on the device, in the model's dtypes, parameter type, requires_grad and ties
    kept; values equal to load_state_dict(assign=True)."""
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pth"
    torch.save(_Tied().state_dict(), path)
    with torch.device("meta"):
        model = _Tied()
        reference = _Tied()
    model.head.bias.requires_grad_(False)
    reference.load_state_dict(torch.load(path, weights_only=True), assign=True)
    report = smartload.load(model, path, device="cpu")
    assert_same_tensors(model.state_dict(), reference.state_dict())
    assert all(not t.is_meta for t in model.state_dict().values())
    assert isinstance(model.head.bias, nn.Parameter) and not model.head.bias.requires_grad
    assert model.head.weight is model.embed.weight
    assert report.notes == (
        "8 model tensor(s) on the meta device: load() gives them new tensors (device=..., "
        "default cpu)",
    )


def test_meta_model_with_keys_nothing_can_fill_is_refused(tmp_path: Path) -> None:
    """A key missing from the checkpoint (or a non-persistent buffer) has no value to take."""
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pth"
    state = _Tied().state_dict()
    del state["head.bias"]
    torch.save(state, path)
    with torch.device("meta"):
        model = _Tied()
    with pytest.raises(smartload.IncompatibleCheckpointError) as info:
        smartload.load(model, path)
    assert [m[0] for m in info.value.mismatches] == ["head.bias"]
    assert "model.to_empty(device=...)" in str(info.value)
    assert model.head.bias.is_meta and model.embed.weight.is_meta
    smartload.load(model, path, policies={"head.bias": "reinit-normal"})
    assert not model.head.bias.is_meta and model.head.bias.abs().max() == 0  # bias: filled with 0


# -------------------------------------------------------------------------------------------------
# non-finite values: divergence is refused, infinities by design are not


class _Clipped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("clip", torch.tensor([-float("inf"), float("inf"), 1.0]))


def test_infinite_buffers_by_design_load(tmp_path: Path) -> None:
    """±Inf where the model's own buffer is non-finite too (clip bounds) is not divergence."""
    path = tmp_path / "ckpt.pth"
    torch.save(_Clipped().state_dict(), path)
    model = _Clipped()
    smartload.load(model, path)
    assert torch.equal(model.clip, torch.tensor([-float("inf"), float("inf"), 1.0]))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("clip", [float("inf"), float("inf"), float("inf")], "clip (3 Inf)"),  # where it was 1.0
        ("clip", [float("nan"), 0.0, 1.0], "clip (1 NaN)"),
        ("linear.bias", [float("inf"), 0.0, 0.0], "linear.bias (1 Inf)"),  # learned
    ],
)
def test_divergence_is_still_refused(
    tmp_path: Path, key: str, value: list[float], expected: str
) -> None:
    state = _Clipped().state_dict()
    state[key] = torch.tensor(value)
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    model = _Clipped()
    before = snapshot(model)
    message = re.escape(f"non-finite values in 1 tensor(s): {expected}. Nothing was loaded")
    with pytest.raises(smartload.CheckpointFormatError, match=message):
        smartload.load(model, path)
    assert_unchanged(model, before)


def test_num_classes_zero_is_timms_no_classifier(tmp_path: Path) -> None:
    """``num_classes=0`` (timm's Identity head): the backbone loads, the classifier is unused."""
    import timm

    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    report = smartload.load(model, path, num_classes=0)
    assert report.unused == ("fc.bias", "fc.weight")
    assert report.summary["copy"] == len(model.state_dict())


def test_a_pre_hook_that_fails_is_a_typed_refusal(tmp_path: Path) -> None:
    """A hook that raises (on meta stand-ins and on the real tensors) refuses the load."""

    class Fails(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 2)
            self._register_load_state_dict_pre_hook(self._needs)

        @staticmethod
        def _needs(state: dict[str, Any], prefix: str, *args: Any) -> None:
            state[prefix + "weight"] = state.pop(prefix + "w")

    path = tmp_path / "ckpt.pth"
    torch.save(nn.Linear(4, 2).state_dict(), path)
    model = Fails()
    before = snapshot(model)
    with pytest.raises(KeyError):
        Fails().load_state_dict(torch.load(path, weights_only=True))
    with pytest.raises(smartload.IncompatibleCheckpointError) as info:
        smartload.load(model, path)
    assert str(info.value) == (
        "a load pre-hook under 'the model' failed on this checkpoint (KeyError: 'w'); "
        "load_state_dict would fail too. Nothing was loaded"
    )
    assert_unchanged(model, before)


def test_timm_gemma4_clip_bounds_are_not_divergence(tmp_path: Path) -> None:
    """timm's gemma4 ViT holds ±Inf clip bounds in its own fresh state: they load; a NaN in one
    of its learned weights is still refused."""
    import timm

    def make() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model("gemma4_vit_167m", depth=1, embed_dim=64, num_heads=2)

    state = make().state_dict()
    path = tmp_path / "gemma4.pth"
    torch.save(state, path)
    model = make()
    smartload.load(model, path)
    assert_same_tensors(model.state_dict(), state)
    assert sum(not bool(torch.isfinite(v).all()) for v in state.values()) == 28

    state["encoder.blocks.0.attn.q_proj.linear.weight"][0, 0] = float("nan")
    torch.save(state, path)
    with pytest.raises(smartload.CheckpointFormatError, match=r"q_proj\.linear\.weight \(1 NaN\)"):
        smartload.load(make(), path)


def test_unwritable_report_path_fails_before_the_model_is_touched(tmp_path: Path) -> None:
    """The report's file is made before loading: a path that cannot be written is an error with
    the model unchanged, never a loaded model and a lost report."""
    path = tmp_path / "ckpt.pth"
    torch.save(nn.Linear(4, 2).state_dict(), path)
    (tmp_path / "file").write_text("not a folder")
    model = nn.Linear(4, 2)
    before = snapshot(model)
    with pytest.raises(smartload.InvalidArgumentError, match="cannot be written"):
        smartload.load(model, path, report_path=tmp_path / "file" / "report.json")
    assert_unchanged(model, before)
    smartload.load(model, path, report_path=tmp_path / "out" / "report.json")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json"]


class _ScalarFromHook(nn.Module):
    """A pre-hook computes a one-element vector for a 0-d buffer, beside a module with its own
    loader: the value is reshaped as for any [1] → 0-d copy, and nothing is half-written."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0))
        self.observer = _observer(None)
        self._register_load_state_dict_pre_hook(self._old_scale)

    @staticmethod
    def _old_scale(state: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix + "old_scale" in state:
            state[prefix + "scale"] = state.pop(prefix + "old_scale") * 2


def test_a_computed_one_element_value_loads_into_a_scalar(tmp_path: Path) -> None:
    state = {k: v for k, v in _ScalarFromHook().state_dict().items() if k != "scale"}
    state["old_scale"] = torch.tensor([3.5])
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    expected = _ScalarFromHook()
    expected.load_state_dict(torch.load(path, weights_only=True))
    model = _ScalarFromHook()
    smartload.load(model, path)
    assert_same_tensors(model.state_dict(), expected.state_dict())
    assert model.scale.item() == 7.0


def test_a_refusing_pre_hook_reads_no_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook's error is known from the meta stand-ins: no value is read to find it."""
    from smartload._tensors import Materializer

    path = tmp_path / "ckpt.pth"
    torch.save(nn.Linear(4, 2).state_dict(), path)
    reads: list[object] = []
    real = Materializer.tensor
    monkeypatch.setattr(
        Materializer, "tensor", lambda self, leaf: reads.append(leaf) or real(self, leaf)
    )
    with pytest.raises(smartload.IncompatibleCheckpointError, match="refused: weight: written by"):
        smartload.diff(_Refuses(), path)
    assert reads == []
    smartload.diff(_Scaled(), path)  # a hook that needs values does read them
    assert len(reads) == 2


def test_lazy_modules_are_refused_before_anything_runs(tmp_path: Path) -> None:
    """torch materialises a lazy module from the checkpoint; smartload says what to do and
    leaves it uninitialised (its load hook is not run by a plan)."""
    path = tmp_path / "ckpt.pth"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    model = nn.LazyLinear(2)
    with pytest.raises(
        smartload.InvalidArgumentError, match="uninitialized \\(lazy\\) parameters: weight, bias"
    ):
        smartload.diff(model, path)
    assert torch.nn.parameter.is_lazy(model.weight)


def test_a_meta_module_with_its_own_loader_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(nn.Sequential(nn.Linear(3, 3), _observer(torch.randn(4))).state_dict(), path)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 3), _observer(None))
    with pytest.raises(
        smartload.InvalidArgumentError, match="module\\(s\\) 1 load through their own"
    ):
        smartload.load(model, path)
    assert model[0].weight.is_meta


@pytest.mark.parametrize(
    ("device", "message"),
    [("bogus", "device='bogus' cannot hold tensors here"), ("cpu", "this model has none on meta")],
)
def test_device_is_checked(tmp_path: Path, device: str, message: str) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    model = nn.Linear(3, 2)
    before = snapshot(model)
    with pytest.raises(smartload.InvalidArgumentError, match=message):
        smartload.load(model, path, device=device)
    assert_unchanged(model, before)
