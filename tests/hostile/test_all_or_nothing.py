"""Property tests: whatever the mismatches, values and policies, load either succeeds and the model
equals the plan, or raises a SmartloadError and the model is bit-for-bit unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import snapshot
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import smartload

ACTIONS = ("copy", "slice", "reinit-normal", "skip")


def build(dims: list[int], norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if norm and i < len(dims) - 2:
            layers.append(nn.BatchNorm1d(dims[i + 1]))
    return nn.Sequential(*layers)


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    dims = draw(st.lists(st.integers(1, 4), min_size=2, max_size=4))
    norm = draw(st.booleans())
    other = [d if draw(st.integers(0, 4)) else draw(st.integers(1, 4)) for d in dims]
    model = build(dims, norm)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    source = build(other, norm)
    ckpt = dict(source.state_dict())
    keys = sorted(ckpt)
    for key in draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)):
        del ckpt[key]  # missing keys
    if draw(st.booleans()):
        ckpt["extra.weight"] = torch.ones(2)
    for key in draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)):
        if key in ckpt and ckpt[key].is_floating_point() and ckpt[key].numel():
            ckpt[key] = ckpt[key].clone()
            ckpt[key].view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e30]))
    if draw(st.booleans()):
        ckpt = {k: v.half() if v.is_floating_point() else v for k, v in ckpt.items()}
    model_keys = sorted(model.state_dict())
    policies = {
        k: draw(st.sampled_from(ACTIONS))
        for k in draw(st.lists(st.sampled_from(model_keys), max_size=3, unique=True))
    }
    num_classes = dims[-1] if draw(st.booleans()) else None
    return {"model": model, "ckpt": ckpt, "policies": policies, "num_classes": num_classes}


def _check_against_plan(
    model: nn.Module, before: dict, ckpt: dict, report: smartload.LoadReport
) -> None:
    after = model.state_dict()
    for e in report.entries:
        got = after[e.key]
        assert tuple(got.shape) == e.model_shape
        if e.action == "copy":
            assert torch.equal(got, ckpt[e.source].to(got.dtype)), e.key
        elif e.action == "skip":
            assert torch.equal(got, before[e.key]), e.key
        elif e.action == "slice":
            assert e.rows is not None
            for i, r in enumerate(e.rows):
                if r is not None:
                    src = ckpt[e.source].select(e.dim, r).to(got.dtype)
                    assert torch.equal(got.select(e.dim, i), src), (e.key, i)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.booleans())
def test_load_is_all_or_nothing(tmp_path_factory, scenario: dict, through_file: bool) -> None:  # type: ignore[no-untyped-def]
    model, ckpt = scenario["model"], scenario["ckpt"]
    source: object = ckpt
    if through_file:
        path = Path(tmp_path_factory.mktemp("ckpt")) / "ckpt.pth"
        torch.save({"state_dict": ckpt}, path)
        source = path
    before = snapshot(model)
    try:
        report = smartload.load(
            model, source, policies=scenario["policies"], num_classes=scenario["num_classes"]
        )
    except smartload.SmartloadError as exc:
        event(f"refused: {type(exc).__name__}")
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        return
    event("loaded")
    _check_against_plan(model, before, ckpt, report)
