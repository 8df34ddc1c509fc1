"""The timm adapter on real timm models of many families (pretrained=False, no download)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from conftest import assert_same_tensors, assert_unchanged, snapshot
from timm.models import adapt_input_conv

import smartload

# One small model per family; heads from pretrained_cfg["classifier"].
ARCHS = {
    "resnet18": ("fc",),
    "vit_tiny_patch16_224": ("head",),
    "convnext_atto": ("head.fc",),
    "efficientnet_b0": ("classifier",),
    "deit_tiny_distilled_patch16_224": ("head", "head_dist"),
    "regnetx_002": ("head.fc",),
    "swin_tiny_patch4_window7_224": ("head.fc",),
    "levit_128s": ("head.linear", "head_dist.linear"),
    "densenet121": ("classifier",),
    "mobilenetv4_conv_small": ("classifier",),
    "coat_lite_tiny": ("head",),
    "nf_regnet_b0": ("head.fc",),
    "efficientformer_l1": ("head", "head_dist"),
}
CLASS_MAP = [0, 5, 999, None, 10, 20, 30]


def _input(model: torch.nn.Module) -> torch.Tensor:
    size = model.pretrained_cfg["input_size"][1:]
    return torch.randn(1, 3, *size)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """A 1000-class timm training checkpoint per architecture, as timm's train.py writes it."""
    out = {}
    folder = tmp_path_factory.mktemp("timm")
    for arch in ARCHS:
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False)
        sd = model.state_dict()
        ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
        path = folder / f"{arch}.pth.tar"
        torch.save(
            {
                "epoch": 300,
                "arch": arch,
                "state_dict": sd,
                "state_dict_ema": ema,
                "args": argparse.Namespace(model=arch, lr=0.1),
            },
            path,
        )
        out[arch] = (path, sd)
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_1000_to_7_classes(arch: str, checkpoints: dict) -> None:
    """Every backbone tensor copied exactly, every head reinitialised, a forward pass runs."""
    path, sd = checkpoints[arch]
    model = timm.create_model(arch, pretrained=False, num_classes=7)
    report = smartload.load(model, path, num_classes=7)
    heads = ARCHS[arch]
    head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    assert report.adapter == "timm"
    assert {e.key for e in report.entries if e.action == "reinit-normal"} == head_keys
    assert [(h.name, h.old_classes, h.new_classes) for h in report.heads] == [
        (h, 1000, 7) for h in heads
    ]
    got = model.state_dict()
    for key, value in sd.items():
        if key in head_keys:
            assert got[key].shape[0] == 7
        else:
            assert torch.equal(got[key], value), key
    for h in heads:
        assert torch.equal(got[f"{h}.bias"], torch.zeros(7))
    model.eval()
    with torch.no_grad():
        assert model(_input(model)).shape == (1, 7)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_class_map_rows_are_the_checkpoint_rows(arch: str, checkpoints: dict) -> None:
    path, sd = checkpoints[arch]
    model = timm.create_model(arch, pretrained=False, num_classes=7)
    report = smartload.load(model, path, num_classes=7, class_map=CLASS_MAP)
    got = model.state_dict()
    for h in ARCHS[arch]:
        for new, old in enumerate(CLASS_MAP):
            for p in ("weight", "bias"):
                key = f"{h}.{p}"
                if old is None:
                    continue
                assert torch.equal(got[key][new], sd[key][old]), (key, new)
        assert float(got[f"{h}.bias"][3]) == 0.0
    assert {e.action for e in report.entries if e.head} == {"slice"}


def test_ema_weights_on_request(checkpoints: dict) -> None:
    path, sd = checkpoints["resnet18"]
    model = timm.create_model("resnet18", pretrained=False)
    report = smartload.load(model, path, ema=True)
    assert (report.state_dict_path, report.other_state_dicts) == (
        ("state_dict_ema",),
        (("state_dict",),),
    )
    assert torch.equal(model.conv1.weight.detach(), sd["conv1.weight"] + 1)


@pytest.mark.parametrize("in_chans", [1, 4])
@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_in_chans_adapted_with_timm(arch: str, in_chans: int, checkpoints: dict) -> None:
    path, sd = checkpoints[arch]
    model = timm.create_model(arch, pretrained=False, in_chans=in_chans)
    report = smartload.load(model, path)
    key = model.pretrained_cfg["first_conv"] + ".weight"
    entry = next(e for e in report.entries if e.key == key)
    assert (entry.action, entry.reason) == (
        "copy",
        f"input conv 3 → {in_chans} channels (timm adapt_input_conv)",
    )
    assert torch.equal(model.state_dict()[key], adapt_input_conv(in_chans, sd[key]))
    model.eval()
    size = model.pretrained_cfg["input_size"][1:]
    with torch.no_grad():
        assert model(torch.randn(1, in_chans, *size)).shape == (1, 1000)


def test_label_offset_drops_the_background_row(tmp_path: Path) -> None:
    """A 1001-class checkpoint (background first) into a 1000-class model with label_offset=1."""
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False, num_classes=1001)
    path = tmp_path / "tf_port.pth"
    torch.save(source.state_dict(), path)
    model = timm.create_model(
        "resnet18", pretrained=False, pretrained_cfg_overlay={"label_offset": 1}
    )
    report = smartload.load(model, path)
    assert torch.equal(model.fc.weight.detach(), source.fc.weight.detach()[1:])
    assert torch.equal(model.fc.bias.detach(), source.fc.bias.detach()[1:])
    entry = next(e for e in report.entries if e.key == "fc.weight")
    assert (entry.action, entry.reason) == (
        "slice",
        "head fc: 1000 → 1000 classes, 1000 of 1000 rows kept by position",
    )


def test_compiled_and_dataparallel_checkpoints(tmp_path: Path, checkpoints: dict) -> None:
    _, sd = checkpoints["convnext_atto"]
    for prefix in ("module.", "_orig_mod."):
        path = tmp_path / f"{prefix.strip('.')}.pth"
        torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}}, path)
        model = timm.create_model("convnext_atto", pretrained=False, num_classes=7)
        report = smartload.load(model, path, num_classes=7)
        assert report.summary["unused"] == 0
        assert torch.equal(model.stem[0].weight.detach(), sd["stem.0.weight"])


def test_safetensors_checkpoint(tmp_path: Path, checkpoints: dict) -> None:
    from safetensors.torch import save_file

    _, sd = checkpoints["efficientnet_b0"]
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=7)
    smartload.load(model, path, num_classes=7)
    assert torch.equal(model.conv_stem.weight.detach(), sd["conv_stem.weight"])


def test_class_map_by_imagenet_names(checkpoints: dict) -> None:
    """source_classes="imagenet-1k" (timm's label set) + target names → rows by name."""
    path, sd = checkpoints["resnet18"]
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    report = smartload.load(
        model,
        path,
        num_classes=3,
        source_classes="imagenet-1k",
        target_classes=["goldfish", "Great White Shark", "unicorn"],
    )
    assert report.heads[0].class_map == (1, 2, None)
    assert report.heads[0].unmatched == ("unicorn",)
    assert torch.equal(model.fc.weight.detach()[1], sd["fc.weight"][2])
    with pytest.raises(
        smartload.InvalidArgumentError,
        match="source_classes='coco' is not a label set the timm adapter knows",
    ):
        smartload.diff(
            model, path, num_classes=3, source_classes="coco", target_classes=["a", "b", "c"]
        )


# One architecture per kind of input stem, with kwargs that keep it small where the smallest
# variant is large: plain, deep and space-to-depth convs, patch embeds (a Linear one too),
# re-parameterisable stems and two input convs (first_conv a tuple).
IN_CHANS_ARCHS: dict[str, dict[str, Any]] = {
    "test_resnet": {},  # deep stem: conv1.0
    "tresnet_m": {"layers": [1, 1, 1, 1]},  # space-to-depth: 48 = 16 × 3 input channels
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"depth": 1},
    "deit_tiny_distilled_patch16_224": {"depth": 1},
    "test_efficientnet": {},
    "regnetx_002": {},
    "swin_tiny_patch4_window7_224": {"depths": (1, 1, 1, 1), "embed_dim": 32},
    "mobilenetv3_small_050": {},
    "levit_128s": {"depth": (1, 1, 1)},
    "crossvit_9_240": {"depth": ((1, 1, 0),) * 3},  # two input convs
    "fastvit_t8": {},  # two input convs, re-parameterisable
    "xcit_nano_12_p8_224": {"depth": 1},
    "efficientvit_m0": {},
    "hgnetv2_b0": {},
    "test_nfnet": {},  # ScaledStdConv2d
    "dla46x_c": {},
    "naflexvit_base_patch16_parfac_gap": {"depth": 1, "embed_dim": 64, "num_heads": 2},  # Linear
}
# where timm's adapt_input_conv cannot convert: timm drops the weight, the layer keeps its init
KEPT: dict[tuple[str, int], tuple[int, ...]] = {
    ("tresnet_m", 2): (64, 48, 3, 3),
    ("tresnet_m", 4): (64, 48, 3, 3),
    **{("naflexvit_base_patch16_parfac_gap", c): (64, 768) for c in (1, 2, 4)},
}


def _first_convs(model: torch.nn.Module) -> list[str]:
    names = model.pretrained_cfg["first_conv"]
    return [f"{n}.weight" for n in ((names,) if isinstance(names, str) else names)]


@pytest.fixture(scope="module")
def plain_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-channel state dict per architecture, saved as timm's released weights are."""
    folder = tmp_path_factory.mktemp("timm_in_chans")
    out = {}
    for arch, kwargs in IN_CHANS_ARCHS.items():
        torch.manual_seed(0)
        out[arch] = folder / f"{arch}.pth"
        torch.save(timm.create_model(arch, **kwargs).state_dict(), out[arch])
    return out


def timm_pretrained(arch: str, path: Path, seed: int, **kwargs: Any) -> torch.nn.Module:
    """timm's own pretrained loading of a local file (``load_pretrained`` with ``file``)."""
    torch.manual_seed(seed)
    overlay = {"file": str(path)}
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


@pytest.mark.parametrize("in_chans", [1, 2, 4])
@pytest.mark.parametrize("arch", sorted(IN_CHANS_ARCHS))
def test_in_chans_loads_as_timm_pretrained_loading(
    arch: str, in_chans: int, plain_checkpoints: dict[str, Path]
) -> None:
    """Every tensor, the input convs too, equals timm's own pretrained loading of the file."""
    kwargs = {**IN_CHANS_ARCHS[arch], "in_chans": in_chans}
    expected = timm_pretrained(arch, plain_checkpoints[arch], seed=1, **kwargs).state_dict()
    torch.manual_seed(1)
    model = timm.create_model(arch, **kwargs)

    report = smartload.load(model, plain_checkpoints[arch])

    assert_same_tensors(model.state_dict(), expected)
    shape = KEPT.get((arch, in_chans))
    outcome = (
        ("copy", f"input conv 3 → {in_chans} channels (timm adapt_input_conv)")
        if shape is None
        else (
            "skip",
            f"input conv: timm's adapt_input_conv cannot take {list(shape)} from 3 to {in_chans} "
            "channels; kept as initialised, as timm's pretrained loading does",
        )
    )
    keys = _first_convs(model)
    assert {e.key: (e.action, e.reason) for e in report.entries if e.key in keys} == dict.fromkeys(
        keys, outcome
    )


def test_space_to_depth_stem_sums_each_pixel_block(plain_checkpoints: dict[str, Path]) -> None:
    """tresnet_m, in_chans=1: the RGB filters of each of the 16 pixels summed, 48 → 16."""
    model = timm.create_model("tresnet_m", in_chans=1, **IN_CHANS_ARCHS["tresnet_m"])
    smartload.load(model, plain_checkpoints["tresnet_m"])
    weight = torch.load(plain_checkpoints["tresnet_m"])["body.conv1.conv.weight"]
    assert torch.equal(
        model.body.conv1.conv.weight.detach(), weight.reshape(64, 16, 3, 3, 3).sum(2)
    )


@pytest.mark.parametrize(("saved", "in_chans"), [(1, 3), (4, 1)])
def test_source_channels_timm_refuses_are_refused(
    saved: int, in_chans: int, tmp_path: Path
) -> None:
    """A stem that does not hold the 3 channels pretrained_cfg declares: timm raises, so does
    smartload, naming the key, and the model is untouched."""
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", in_chans=saved).state_dict(), path)
    with pytest.raises(RuntimeError, match="is inconsistent with input_size"):
        timm_pretrained("test_resnet", path, seed=0, in_chans=in_chans)
    model = timm.create_model("test_resnet", in_chans=in_chans)
    before = snapshot(model)

    with pytest.raises(smartload.IncompatibleCheckpointError) as caught:
        smartload.load(model, path)

    assert caught.value.mismatches == [("conv1.0.weight", (16, saved, 3, 3), (16, in_chans, 3, 3))]
    assert_unchanged(model, before)
