"""The rename hint: model keys missing and checkpoint keys unused in numbers, with matching
shapes, are said first as a naming difference, with the ``rename`` rules that place them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import smartload
from smartload._rename_hint import rename_hint
from smartload.cli import main


class Old(nn.Module):
    """Modules named as a framework's previous version named them."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict(
            {"layer": nn.ModuleList(nn.ModuleDict({"query": nn.Linear(8, 8), "key": nn.Linear(8, 4)}) for _ in range(3))}
        )  # fmt: skip
        self.head = nn.Linear(8, 5)


class New(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(8, 8), "k_proj": nn.Linear(8, 4)}) for _ in range(3)
        )
        self.head = nn.Linear(8, 5)


RULES = {
    r"^encoder\.layer\.(\d+)\.query\.": r"layers.\1.q_proj.",
    r"^encoder\.layer\.(\d+)\.key\.": r"layers.\1.k_proj.",
}


@pytest.fixture
def old_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "old.pt"
    torch.save(Old().state_dict(), path)
    return path


def test_the_plan_says_it_first_and_the_proposal_places_every_key(old_checkpoint: Path) -> None:
    plan = smartload.diff(New(), old_checkpoint)

    assert plan.summary["skip"] == 12 and plan.summary["unused"] == 12
    hint = plan.rename_hint
    assert hint is not None
    assert (hint.missing, hint.unused, hint.paired, hint.placed) == (12, 12, 12, 12)
    assert dict(hint.rename) == RULES
    assert plan.notes[0] == (
        "12 model key(s) missing and 12 checkpoint key(s) unused, 12 of them with matching "
        f"shapes: probably a naming difference; rename={RULES!r} would place 12 of them (or use "
        "the framework's own adapter, if it has one, which knows its names)"
    )
    lines = str(plan).splitlines()
    assert lines[2] == f"hint: {plan.notes[0]}"  # right under the summary line
    assert sum(line.startswith("hint: ") or plan.notes[0] in line for line in lines) == 1
    assert plan.to_dict()["rename_hint"] == {
        "missing": 12, "unused": 12, "paired": 12, "rename": RULES, "placed": 12,
    }  # fmt: skip

    model = New()
    report = smartload.load(model, old_checkpoint, rename=dict(hint.rename))
    assert report.summary["copy"] == 14 and report.rename_hint is None
    saved = torch.load(old_checkpoint, weights_only=True)
    assert torch.equal(model.layers[2].q_proj.weight, saved["encoder.layer.2.query.weight"])
    assert torch.equal(model.layers[1].k_proj.bias, saved["encoder.layer.1.key.bias"])


def test_no_hint_when_the_keys_do_not_pair() -> None:
    assert rename_hint({"a.weight": (3, 3)}, {"b.weight": (3, 3)}) is None  # one pair: too few
    assert rename_hint({"a.w": (3,), "b.w": (4,)}, {"c.w": (5,), "d.w": (6,)}) is None
    many = {f"x{i}.w": (i + 1,) for i in range(10)}
    unpaired = {f"z{i}.w": (100 + i,) for i in range(4)}
    # 2 pairs, but 6 unused keys: under half of them pair
    assert rename_hint(many, {"y0.w": (1,), "y1.w": (2,), **unpaired}) is None
    assert rename_hint(many, {"y0.w": (1,), "y1.w": (2,)}) is not None


def test_a_rule_that_would_misplace_a_key_is_not_proposed() -> None:
    """``^enc\\.`` → ``model.`` would also turn the unpaired ``enc.extra.w`` into the model's
    ``model.extra.w``, which is paired with another key: the rule is not proposed."""
    missing = {"model.a.w": (2,), "model.b.w": (2,), "model.extra.w": (3,)}
    unused = {"enc.a.w": (2,), "enc.b.w": (2,), "enc.extra.w": (4,), "other.extra.w": (3,)}
    hint = rename_hint(missing, unused)
    assert hint is not None
    assert r"^enc\." not in dict(hint.rename)
    assert dict(hint.rename) == {r"^other\.": "model."}
    assert hint.placed == 1


def test_numbers_become_groups_only_where_they_correspond() -> None:
    missing = {f"blocks.{i}.mlp.fc{j}.weight": (4, 4) for i in range(2) for j in (1, 2)}
    unused = {f"layer.{i}.ffn.linear{j}.weight": (4, 4) for i in range(2) for j in (1, 2)}
    hint = rename_hint(missing, unused)
    assert hint is not None and hint.placed == 4
    assert dict(hint.rename) == {
        r"^layer\.(\d+)\.ffn\.linear1\.": r"blocks.\1.mlp.fc1.",
        r"^layer\.(\d+)\.ffn\.linear2\.": r"blocks.\1.mlp.fc2.",
    }


def test_diff_of_two_checkpoints_says_it_too(
    old_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new = tmp_path / "new.safetensors"
    from safetensors.torch import save_file

    save_file(New().state_dict(), new)
    assert main(["diff", str(old_checkpoint), str(new)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("hint: 12 key(s) only in the second and 12 only in the first")
    assert out[2].endswith("(rename applies to the first's keys)")
    assert main(["diff", str(old_checkpoint), str(new), "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert got["rename_hint"]["rename"] == RULES and got["rename_hint"]["placed"] == 12


class Flat(nn.Module):
    """A backbone's layers at the top (``0.*``, ``1.*``) beside the head."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("0", nn.Linear(4, 4))
        self.add_module("1", nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)


class Wrapped(nn.Module):
    """The same layers under ``backbone.``; the head where it was."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)


BACKBONE = {r"^(\d+)\.": r"backbone.\1."}


def test_a_rule_that_would_move_a_loading_key_is_narrowed(tmp_path: Path) -> None:
    """``^`` → ``backbone.`` places the four backbone keys but takes ``head.*`` away from the
    head, which loads as it is: the rule is narrowed to the next shared name, and leaves
    ``head.*`` alone."""
    path = tmp_path / "flat.pt"
    torch.manual_seed(0)
    torch.save(Flat().state_dict(), path)
    plan = smartload.diff(Wrapped(), path)
    assert plan.rename_hint is not None
    assert dict(plan.rename_hint.rename) == BACKBONE and plan.rename_hint.placed == 4

    model = Wrapped()
    report = smartload.load(model, path, rename=dict(plan.rename_hint.rename))
    assert report.summary["copy"] == 6 and report.unused == ()
    saved = torch.load(path, weights_only=True)
    assert torch.equal(model.backbone[1].weight, saved["1.weight"])
    assert torch.equal(model.head.bias, saved["head.bias"])


def test_rules_leave_loading_keys_and_their_model_keys_alone() -> None:
    """A rule is dropped when it renames a key that loads, or an unused key onto a model key
    that another key feeds; without a narrower rule that places a pair, no rule is proposed."""
    missing = {"backbone.0.w": (2,), "backbone.1.w": (2,)}
    unused = {"0.w": (2,), "1.w": (2,)}
    broad = rename_hint(missing, unused)
    assert broad is not None and dict(broad.rename) == {"^": "backbone."}
    moved = rename_hint(missing, unused, {"head.w": "head.w"})
    assert moved is not None and dict(moved.rename) == BACKBONE and moved.placed == 2
    leaf = rename_hint({"backbone.w": (2,), "backbone.v": (2,)}, {"w": (2,), "v": (2,)}, {"u": "u"})
    assert leaf is not None and leaf.rename == () and leaf.placed == 0  # no name to narrow on

    missing = {"new.a.w": (2,), "new.b.w": (2,)}
    unused = {"old.a.w": (2,), "old.b.w": (2,), "old.c.w": (3,)}
    broad = rename_hint(missing, unused)
    assert broad is not None and dict(broad.rename) == {r"^old\.": "new."}
    onto = rename_hint(missing, unused, {"other.c.w": "new.c.w"})  # old.c.w would land on it
    assert onto is not None and dict(onto.rename) == {
        r"^old\.a\.": "new.a.", r"^old\.b\.": "new.b.",
    }  # fmt: skip


def test_diff_of_two_checkpoints_leaves_the_keys_both_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In ``diff A B`` the keys both files have stay as they are: the hint's rule moves only
    the first's keys that the second names otherwise."""
    flat, wrapped = tmp_path / "flat.pt", tmp_path / "wrapped.pt"
    torch.save(Flat().state_dict(), flat)
    torch.save(Wrapped().state_dict(), wrapped)
    assert main(["diff", str(flat), str(wrapped), "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert got["rename_hint"] == {
        "missing": 4, "unused": 4, "paired": 4, "rename": BACKBONE, "placed": 4,
    }  # fmt: skip
