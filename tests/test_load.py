"""smartload.load / diff: policies, heads, class maps, key matching, report and all-or-nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import assert_unchanged, make_net, snapshot
from torch import nn

import smartload
from smartload import IncompatibleCheckpointError, InvalidArgumentError

NUM_BACKBONE = 7  # SmallNet keys outside fc


@pytest.fixture
def ckpt100(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 100-class SmallNet checkpoint, saved the way timm's train.py saves one."""
    sd = make_net(100, seed=1).state_dict()
    path = tmp_path / "ckpt100.pth.tar"
    torch.save({"epoch": 3, "state_dict": sd}, path)
    return path, sd


def test_head_is_reinitialised_when_the_class_count_changes(ckpt100: tuple[Path, dict]) -> None:
    path, sd = ckpt100
    torch.manual_seed(0)
    model = make_net(10, seed=2)
    report = smartload.load(model, path, num_classes=10)
    for key in sd:
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], sd[key]), key
    fc = {e.key: e for e in report.entries if e.key.startswith("fc.")}
    assert {k: (e.action, e.ckpt_shape, e.model_shape, e.reason) for k, e in fc.items()} == {
        "fc.weight": (
            "reinit-normal",
            (100, 8),
            (10, 8),
            "head fc: 100 → 10 classes, no class map",
        ),
        "fc.bias": ("reinit-normal", (100,), (10,), "head fc: 100 → 10 classes, no class map"),
    }
    assert torch.equal(model.fc.bias.detach(), torch.zeros(10))
    assert 0.005 < float(model.fc.weight.detach().std()) < 0.015  # normal(0, 0.01), 80 samples
    assert report.summary == {
        "copy": NUM_BACKBONE, "slice": 0, "reinit-normal": 2, "skip": 0, "unused": 0,
        "reused_params": 347 - 90, "model_params": 347,
    }  # fmt: skip
    assert [h.to_dict() for h in report.heads] == [
        {"name": "fc", "keys": ["fc.weight", "fc.bias"], "old_classes": 100, "new_classes": 10,
         "class_map": None, "unmatched_classes": []}
    ]  # fmt: skip
    assert report.state_dict_path == ("state_dict",)
    assert report.extras == {"epoch": "3"}


def test_mismatch_without_num_classes_lists_every_key(ckpt100: tuple[Path, dict]) -> None:
    path, _ = ckpt100
    model = make_net(10, seed=2)
    before = snapshot(model)
    with pytest.raises(IncompatibleCheckpointError) as caught:
        smartload.load(model, path)
    assert caught.value.mismatches == [("fc.weight", (100, 8), (10, 8)), ("fc.bias", (100,), (10,))]
    assert str(caught.value) == (
        f"cannot load 2 key(s) from {path}:\n"
        "  fc.weight: checkpoint [100, 8] vs model [10, 8]\n"
        "  fc.bias: checkpoint [100] vs model [10]\n"
        "Nothing was loaded. If these are the classifier head, pass num_classes=<the model's class "
        "count>; to choose per key, pass policies={'<key or glob>': 'reinit-normal' | 'skip' | 'slice'}"
    )
    assert_unchanged(model, before)


def test_num_classes_that_disagrees_with_the_model_is_an_error(ckpt100: tuple[Path, dict]) -> None:
    path, _ = ckpt100
    model = make_net(100, seed=2)
    before = snapshot(model)
    with pytest.raises(
        IncompatibleCheckpointError, match=r"num_classes=10, but the model's head has 100 classes"
    ):
        smartload.load(model, path, num_classes=10)
    assert_unchanged(model, before)


def test_backbone_mismatch_is_never_silently_skipped(tmp_path: Path) -> None:
    """num_classes covers the head only: a conv with another in_chans is still an error."""
    ckpt = make_net(100, seed=1).state_dict()
    path = tmp_path / "c.pth"
    torch.save(ckpt, path)
    model = make_net(10)
    model.conv = nn.Conv2d(1, 8, 3)
    with pytest.raises(IncompatibleCheckpointError) as caught:
        smartload.load(model, path, num_classes=10)
    assert caught.value.mismatches == [("conv.weight", (8, 3, 3, 3), (8, 1, 3, 3))]


def test_class_map_by_index_takes_exact_rows(ckpt100: tuple[Path, dict]) -> None:
    path, sd = ckpt100
    model = make_net(4, seed=2)
    report = smartload.load(model, path, num_classes=4, class_map=[7, None, 0, 99])
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    for new, old in ((0, 7), (2, 0), (3, 99)):
        assert torch.equal(w[new], sd["fc.weight"][old])
        assert torch.equal(b[new], sd["fc.bias"][old])
    assert float(b[1]) == 0.0
    entry = next(e for e in report.entries if e.key == "fc.weight")
    assert (entry.action, entry.reason, entry.reused) == (
        "slice",
        "head fc: 100 → 4 classes, 3 of 4 rows kept by class map",
        3 * 8,
    )
    assert report.heads[0].class_map == (7, None, 0, 99)


def test_class_map_by_names(ckpt100: tuple[Path, dict]) -> None:
    path, sd = ckpt100
    old = [f"class{i}" for i in range(100)]
    old[5], old[42] = "traffic_light", "dog"
    assert smartload.class_map_by_names(old, ["Traffic Light", "dog", "zebra"]) == [5, 42, None]
    model = make_net(3, seed=2)
    report = smartload.load(
        model,
        path,
        num_classes=3,
        source_classes=old,
        target_classes=["Traffic Light", "dog", "zebra"],
    )
    assert torch.equal(model.fc.weight.detach()[1], sd["fc.weight"][42])
    assert report.heads[0].unmatched == ("zebra",)
    model2 = make_net(3, seed=2)
    smartload.load(
        model2, path, num_classes=3, class_map=["dog", None, "class9"], source_classes=old
    )
    assert torch.equal(model2.fc.weight.detach()[0], sd["fc.weight"][42])
    assert torch.equal(model2.fc.weight.detach()[2], sd["fc.weight"][9])


@pytest.mark.parametrize(
    ("class_map", "message"),
    [
        ([1, 2], "class_map has 2 entries but the model (head fc) has 3 classes; give one entry"),
        (
            [1, 2, 100],
            "class_map[2] = 100 is not a checkpoint class index (head fc) (0..99) or None",
        ),
        ([1, 2, "dog"], "class_map names class 'dog' but the checkpoint's class names are unknown"),
    ],
)
def test_bad_class_map(ckpt100: tuple[Path, dict], class_map: list, message: str) -> None:
    path, _ = ckpt100
    model = make_net(3, seed=2)
    before = snapshot(model)
    with pytest.raises(InvalidArgumentError) as caught:
        smartload.load(model, path, num_classes=3, class_map=class_map)
    assert message in str(caught.value)
    assert_unchanged(model, before)


def test_policies_override_defaults(ckpt100: tuple[Path, dict]) -> None:
    path, sd = ckpt100
    model = make_net(10, seed=2)
    fc_before = model.fc.weight.detach().clone()
    report = smartload.load(model, path, policies={"fc.*": "skip", "bn.running_*": "reinit-normal"})
    actions = {e.key: (e.action, e.reason) for e in report.entries}
    assert actions["fc.weight"] == ("skip", "policy 'fc.*'")
    assert actions["bn.running_mean"] == ("reinit-normal", "policy 'bn.running_*'")
    assert actions["conv.weight"] == ("copy", "same shape")
    assert torch.equal(model.fc.weight.detach(), fc_before)
    assert not torch.equal(model.bn.running_mean, sd["bn.running_mean"])
    with pytest.raises(
        InvalidArgumentError,
        match="unknown action 'zero'; use one of copy, slice, reinit-normal, skip",
    ):
        smartload.diff(model, path, policies={"fc.*": "zero"})


def test_slice_policy_without_map_keeps_the_first_rows(ckpt100: tuple[Path, dict]) -> None:
    path, sd = ckpt100
    model = make_net(10, seed=2)
    smartload.load(model, path, policies={"fc.*": "slice"})
    assert torch.equal(model.fc.weight.detach(), sd["fc.weight"][:10])
    assert torch.equal(model.fc.bias.detach(), sd["fc.bias"][:10])


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    sd = make_net(10, seed=1).state_dict()
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}}, path)
    model = make_net(10, seed=2)
    report = smartload.load(model, path)
    assert report.summary["copy"] == 9 and report.unused == ()
    assert {e.source for e in report.entries} == {prefix + k for k in sd}
    assert torch.equal(model.fc.weight.detach(), sd["fc.weight"])


def test_prefix_added_for_a_wrapped_model_and_kept_where_it_matches(tmp_path: Path) -> None:
    """A DataParallel model takes a plain checkpoint; a real `model.` submodule keeps its prefix."""
    sd = make_net(10, seed=1).state_dict()
    wrapped = nn.DataParallel(make_net(10, seed=2))
    smartload.load(wrapped, sd)
    assert torch.equal(wrapped.module.fc.weight.detach(), sd["fc.weight"])

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_net(10, seed=2)
            self.fc = nn.Linear(2, 2)

    outer_sd = Outer().state_dict()
    report = smartload.diff(Outer(), outer_sd)
    assert all(e.source == e.key for e in report.entries)


def test_rename_rules(tmp_path: Path) -> None:
    sd = make_net(10, seed=1).state_dict()
    renamed = {k.replace("fc.", "classifier."): v for k, v in sd.items()}
    model = make_net(10, seed=2)
    report = smartload.load(model, renamed, rename={r"^classifier\.": "fc."})
    assert torch.equal(model.fc.weight.detach(), sd["fc.weight"])
    assert next(e for e in report.entries if e.key == "fc.weight").source == "classifier.weight"
    with pytest.raises(InvalidArgumentError, match="rename must map regular expressions"):
        smartload.diff(model, renamed, rename={"(": "x"})


def test_ema_weights_only_when_asked(tmp_path: Path) -> None:
    raw, ema = make_net(10, seed=1).state_dict(), make_net(10, seed=9).state_dict()
    path = tmp_path / "ema.pth.tar"
    torch.save({"state_dict": raw, "state_dict_ema": ema, "optimizer": {}}, path)
    model = make_net(10, seed=2)
    report = smartload.load(model, path)
    assert (report.state_dict_path, report.ema, report.other_state_dicts) == (
        ("state_dict",),
        False,
        (("state_dict_ema",),),
    )
    assert torch.equal(model.fc.weight.detach(), raw["fc.weight"])
    report = smartload.load(model, path, ema=True)
    assert (report.state_dict_path, report.ema) == (("state_dict_ema",), True)
    assert torch.equal(model.fc.weight.detach(), ema["fc.weight"])
    only_ema = tmp_path / "only_ema.pth"
    torch.save({"model_ema": ema}, only_ema)
    with pytest.raises(
        InvalidArgumentError, match=r"holds only EMA weights \(\['model_ema'\]\); pass ema=True"
    ):
        smartload.load(model, only_ema)


def test_dry_run_touches_nothing_and_writes_the_report(
    ckpt100: tuple[Path, dict], tmp_path: Path
) -> None:
    path, _ = ckpt100
    model = make_net(10, seed=2)
    before = snapshot(model)
    out = tmp_path / "reports" / "smartload_report.json"
    report = smartload.load(model, path, num_classes=10, dry_run=True, report_path=out)
    assert_unchanged(model, before)
    data = json.loads(out.read_text())
    assert data == report.to_dict()
    assert data["dry_run"] is True
    assert {k: data[k] for k in ("checkpoint", "format", "state_dict_path", "unused")} == {
        "checkpoint": str(path), "format": "torch-zip", "state_dict_path": ["state_dict"], "unused": []
    }  # fmt: skip
    assert data["summary"] == {
        "copy": 7, "slice": 0, "reinit-normal": 2, "skip": 0, "unused": 0,
        "reused_params": 257, "model_params": 347,
    }  # fmt: skip
    assert data["entries"][-2] == {
        "key": "fc.weight", "action": "reinit-normal", "source": "fc.weight",
        "ckpt_shape": [100, 8], "model_shape": [10, 8],
        "reason": "head fc: 100 → 10 classes, no class map",
        "ckpt_dtype": "float32", "model_dtype": "float32", "reused_params": 0, "head": "fc",
    }  # fmt: skip
    assert [p.name for p in out.parent.iterdir()] == ["smartload_report.json"]  # no temp left


def test_casts_are_reported(tmp_path: Path) -> None:
    sd = {
        k: (v.half() if v.is_floating_point() else v)
        for k, v in make_net(10, seed=1).state_dict().items()
    }
    model = make_net(10, seed=2)
    report = smartload.load(model, sd)
    entry = next(e for e in report.entries if e.key == "fc.weight")
    assert (entry.ckpt_dtype, entry.model_dtype, entry.cast) == ("float16", "float32", "exact")
    assert torch.equal(model.fc.weight.detach(), sd["fc.weight"].float())
    half = make_net(10, seed=2).half()
    report = smartload.load(half, make_net(10, seed=1).state_dict())
    assert next(e for e in report.entries if e.key == "fc.weight").cast == "lossy"
    assert "cast float32 → float16 (lossy)" in str(report)


def test_parameters_keep_identity_and_optimizer_stays_valid(ckpt100: tuple[Path, dict]) -> None:
    path, sd = ckpt100
    model = make_net(100, seed=2)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    smartload.load(model, path)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert all(p.requires_grad for p in model.parameters())
    assert opt.param_groups[0]["params"][0] is model.conv.weight
    assert torch.equal(model.conv.weight.detach(), sd["conv.weight"])


def test_tied_weights_are_reported_as_loaded_through_their_twin() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.embed.weight

    source = Tied()
    model = Tied()
    report = smartload.load(model, {"embed.weight": source.embed.weight.detach()})
    entry = next(e for e in report.entries if e.key == "out.weight")
    assert (entry.action, entry.reason) == (
        "skip",
        "missing; tied to embed.weight, loaded through it",
    )
    assert torch.equal(model.out.weight, source.embed.weight)


def test_unused_checkpoint_keys_are_listed() -> None:
    sd = dict(make_net(10, seed=1).state_dict())
    sd["aux.weight"] = torch.ones(2)
    sd["aux.bias"] = torch.ones(2)
    report = smartload.load(make_net(10), sd)
    assert report.unused == ("aux.bias", "aux.weight")
    assert "  unused        aux.{bias, weight}" in str(report).splitlines()


def test_custom_load_from_state_dict_is_respected() -> None:
    """A module that transforms its weights on load gets its own _load_from_state_dict called."""

    class Doubling(nn.Linear):
        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
            state_dict = {k: v * 2 for k, v in state_dict.items()}
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    model = nn.Sequential(Doubling(2, 2))
    sd = {"0.weight": torch.ones(2, 2), "0.bias": torch.ones(2)}
    smartload.load(model, sd)
    assert torch.equal(model[0].weight.detach(), torch.full((2, 2), 2.0))


def test_one_line_summary_is_logged(
    ckpt100: tuple[Path, dict], caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = ckpt100
    with caplog.at_level(logging.INFO, logger="smartload"):
        smartload.load(make_net(10), path, num_classes=10)
    assert caplog.messages == [
        "reused 257/347 parameters (74.0%) from ckpt100.pth.tar: 7 copy, 2 reinit-normal"
    ]


def test_report_text_is_a_grouped_table(ckpt100: tuple[Path, dict]) -> None:
    path, _ = ckpt100
    report = smartload.load(make_net(4), path, num_classes=4, class_map=[0, 1, 2, None])
    assert str(report).splitlines() == [
        f"loaded {path} (torch-zip, state dict: state_dict, adapter: generic)",
        "reused 284/293 parameters (96.9%) from ckpt100.pth.tar: 7 copy, 2 slice",
        "head fc: 100 → 4 classes, 3 taken from the checkpoint",
        "",
        "  copy          bn.*       5 tensor(s), same shape",
        "  copy          conv.*     2 tensor(s), same shape",
        "  slice         fc.bias    [100] → [4]  head fc: 100 → 4 classes, 3 of 4 rows kept by class map",
        "  slice         fc.weight  [100, 8] → [4, 8]  head fc: 100 → 4 classes, 3 of 4 rows kept by class map",
    ]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "vit_b_16", "efficientnet_b0"])
def test_torchvision_classifiers_1000_to_7_classes(tmp_path: Path, arch: str) -> None:
    """Every backbone tensor copied exactly, the head reinitialised, a forward pass runs."""
    torch.manual_seed(0)
    source = getattr(torchvision.models, arch)(weights=None)
    path = tmp_path / f"{arch}.pth"
    torch.save(source.state_dict(), path)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=7)
    report = smartload.load(model, path, num_classes=7)
    head = {e.key for e in report.entries if e.action == "reinit-normal"}
    assert len(head) == 2 and all(k.endswith(("weight", "bias")) for k in head)
    got = model.state_dict()
    for key, value in source.state_dict().items():
        if key not in head:
            assert torch.equal(got[key], value), key
    model.eval()
    size = 224 if arch == "vit_b_16" else 64
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)
