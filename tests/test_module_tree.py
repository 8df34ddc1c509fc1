"""Extracting state dicts from pickled modules, at the edges: the same weights torch.load gives,
refusals naming what they refuse, and limits that keep small crafted files cheap."""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_tensors, make_net
from pickle_asm import Build, Call, Get, Global, New, Put, Raw, Seq, assemble, tensor, torch_zip
from torch import nn

import smartload
from smartload import CheckpointFormatError, UnsafeCheckpointError
from smartload.cli import main

W = tensor("0", 4, (2, 2), (2, 1))
B = tensor("1", 2, (2,), (1,))
STORAGES = {
    "0": struct.pack("<4f", 1, 2, 3, 4),
    "1": struct.pack("<2f", 5, 6),
    "2": struct.pack("<4f", 666, 666, 666, 666),
}
LINEAR = "torch.nn.modules.linear.Linear"


def module(
    cls: str, params: Any = None, modules: Any = None, buffers: Any = None, **attrs: Any
) -> Build:
    """NEWOBJ(cls) + BUILD(__dict__): a module as torch pickles it."""
    owner, _, name = cls.rpartition(".")
    state = {
        "training": True,
        "_parameters": params or {},
        "_buffers": buffers or {},
        "_modules": modules or {},
    }
    return Build(New(Global(owner, name)), {**state, **attrs})


def write(tmp: Path, obj: Any, name: str = "m.pt") -> Path:
    return torch_zip(tmp / name, assemble(obj), STORAGES)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict smartload extracts, as tensors (through convert: no model needed)."""
    from safetensors.torch import load_file

    out = path.with_suffix(".safetensors")
    assert main(["convert", str(path), str(out)]) == 0
    return load_file(out)


def torch_reference(path: Path) -> dict[str, torch.Tensor]:
    """What torch.load gives for a file these tests made (only torch's own classes in it)."""
    return dict(torch.load(path, weights_only=False).state_dict())


def test_state_changed_after_build_is_not_seen(tmp_path: Path) -> None:
    # nn.Module.__setstate__ copies the state dict: a change the pickle makes to it after BUILD
    # (memo get, SETITEM) does not reach the module
    state = {
        "training": True,
        "_parameters": {"weight": W, "bias": B},
        "_buffers": {},
        "_modules": {},
    }
    later = {"weight": tensor("2", 4, (2, 2), (2, 1)), "bias": B}
    path = write(
        tmp_path,
        Seq((Build(New(Global("torch.nn.modules.linear", "Linear")), Put(state, 900)), Get(900), "_parameters", later, Raw(b"s0"))),
    )  # fmt: skip

    got, expected = weights(path), torch_reference(path)

    assert expected["weight"].flatten().tolist() == [1, 2, 3, 4]
    assert_same_tensors(got, expected)


def test_non_persistent_names_are_those_of_the_call(tmp_path: Path) -> None:
    # set(L) copies L when it is called: a name the pickle appends to L afterwards does not count
    names = Call(Global("builtins", "set"), (Put([], 901),))
    net = module(LINEAR, {"weight": W}, buffers={"bias": B}, _non_persistent_buffers_set=names)
    path = write(tmp_path, Seq((net, Get(901), "bias", Raw(b"a0"))))  # APPEND, POP
    assert sorted(weights(path)) == sorted(torch_reference(path)) == ["bias", "weight"]


def test_buffers_named_in_a_set_call_are_left_out(tmp_path: Path) -> None:
    names = Call(Global("builtins", "set"), (["bias"],))
    path = write(
        tmp_path,
        module(LINEAR, {"weight": W}, buffers={"bias": B}, _non_persistent_buffers_set=names),
    )
    assert sorted(weights(path)) == sorted(torch_reference(path)) == ["weight"]


def test_a_set_made_by_newobj_is_refused(tmp_path: Path) -> None:
    odd = New(Global("builtins", "set"), (["bias"],))  # torch never writes this; set() ignores it
    path = write(tmp_path, module(LINEAR, {"weight": W}, _non_persistent_buffers_set=odd))
    with pytest.raises(CheckpointFormatError) as caught:  # not a call: malformed, not hostile
        smartload.inspect(path)
    assert "_non_persistent_buffers_set is an object of builtins.set, not a set of names" in str(
        caught.value
    )


def test_refused_module_beside_the_weights_stays_inert(tmp_path: Path) -> None:
    bad = module("zoo.Net", {"w": Call(Global("zoo", "make"), ())})
    path = write(tmp_path, {"model": bad, "w": {"x": W}})

    info = smartload.inspect(path)
    assert info.state_dict_path == ("w",)
    assert info.extras == {"model": "zoo.Net module object [inert, not executed]"}
    with pytest.raises(
        UnsafeCheckpointError, match=r"it names zoo\.make \(in the pickled module at \['model'\]"
    ):
        smartload.inspect(path, state_dict_path=["model"])


def test_a_module_shared_a_million_times_is_refused(tmp_path: Path) -> None:
    shared = Put(module("zoo.X", {f"p{j}": W for j in range(1000)}), 1)
    fan = {"m0": shared, **{f"m{i}": Get(1) for i in range(1, 1001)}}
    path = write(tmp_path, module("zoo.Net", {"w": W}, fan))

    with pytest.raises(CheckpointFormatError) as caught:
        smartload.inspect(path)
    assert str(caught.value) == (
        f"{path}: in the pickled module: the module tree has more than 1,000,000 entries "
        "(tensors, modules, repeats of shared modules). Where the model's code is trusted, save "
        "model.state_dict() and load that"
    )


def test_shared_empty_slots_are_checked_once(tmp_path: Path) -> None:
    # 2,000 names for one module of 2,000 empty slots: checked per name, that would be 4M
    # entries and over the budget; checked once, it loads
    shared = Put(module("zoo.X", {f"p{j}": None for j in range(2000)}), 1)
    fan = {"m0": shared, **{f"m{i}": Get(1) for i in range(1, 2000)}}
    path = write(tmp_path, module("zoo.Net", {"w": W}, fan))
    info = smartload.inspect(path)
    assert (info.num_tensors, info.module_tree.modules if info.module_tree else 0) == (1, 2)


@pytest.mark.parametrize(("depth", "ok"), [(200, True), (201, False)])
def test_nesting_limit(tmp_path: Path, depth: int, ok: bool) -> None:
    node = module("zoo.Leaf", {"w": W})
    for _ in range(depth):
        node = module("zoo.Box", modules={"c": node})
    path = write(tmp_path, node)
    if ok:
        assert list(smartload.inspect(path).tensors) == ["c." * depth + "w"]
    else:
        with pytest.raises(
            CheckpointFormatError, match=r"modules nested more than 200 deep \(at 'c\.c\.c"
        ):
            smartload.inspect(path)


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (module("zoo.Net", {"w": W}, _buffers={"w": B}), "two tensors of the module tree are named 'w'"),
        (module("zoo.Net", [W]), "the top module: _parameters is a list of 1, not the dict torch pickles"),
        (module("zoo.Net", {"w": W}, _non_persistent_buffers_set=Call(Global("builtins", "set"), ([1],))),
         "the top module: _non_persistent_buffers_set holds a non-name"),
        (module("zoo.Net", modules={"fc": 3}), "the submodule 'fc' is 3, not a module"),
        (module("zoo.Net", {"w": 1.5}), "the parameter 'w' is a float, not a tensor"),
        (Build(New(Global("zoo", "Net")), {"_parameters": {}, 1: 2}), "the top module has an attribute named 1, not a str"),
    ],
)  # fmt: skip
def test_malformed_module_state(tmp_path: Path, net: Build, message: str) -> None:
    with pytest.raises(CheckpointFormatError, match=re.escape(message)):
        smartload.inspect(write(tmp_path, net))


@pytest.mark.parametrize("save", ["legacy", "protocol 4", "protocol 5"])
def test_real_modules_every_way_torch_saves_them(tmp_path: Path, save: str) -> None:
    net = nn.Sequential(make_net(10, seed=1), nn.LSTM(4, 3), nn.BatchNorm1d(3))
    net[0].register_buffer("scratch", torch.ones(2), persistent=False)
    net.add_module("again", net[0])  # shared under two names
    path = tmp_path / "net.pt"
    if save == "legacy":
        torch.save(net, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(net, path, pickle_protocol=int(save[-1]))

    assert_same_tensors(weights(path), net.state_dict())


def _hook(module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
    state[prefix + "extra"] = torch.zeros(1)


def test_state_dict_hooks_are_reported_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = make_net(10, seed=1)
    net.fc._register_state_dict_hook(_hook)
    path = tmp_path / "hooked.pt"
    torch.save(net, path)

    report = smartload.load(make_net(10, seed=2), path)

    assert report.notes[-1] == (
        "modules with state-dict hooks, not run: fc; their keys are the raw parameters and "
        "buffers, which the model's own state_dict() may rename or add to"
    )
    assert main(["inspect", str(path)]) == 6  # UNKNOWN: the module classes are not known data
    assert re.search(r"\nhooks\s+state-dict hooks \(not run\) on fc\s*\n", capsys.readouterr().out)


def test_classes_of_the_saving_script_are_not_hostile(tmp_path: Path) -> None:
    path = write(tmp_path, module("__main__.Net", {"w": W}))  # torch.save(model) from a notebook
    assert list(smartload.inspect(path).tensors) == ["w"]
    with pytest.raises(UnsafeCheckpointError, match="it names __main__.__builtins__"):
        smartload.inspect(write(tmp_path, module("__main__.__builtins__", {"w": W}), "b.pt"))


def test_control_characters_in_names_are_escaped_on_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path, module("zoo.Net", modules={"x\x1b[2J": module("zoo.\x1b]0;t\x07Sub", {"w": W})})
    )
    assert main(["inspect", str(path)]) == 6  # UNKNOWN: zoo.Net is not known data
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "x\\x1b[2J.w" in out


def test_modules_inside_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "dict.pt"
    torch.save(OrderedDict(student=make_net(10, seed=1), teacher=make_net(4, seed=2)), path)
    info = smartload.inspect(path)
    assert (info.state_dict_path, info.other_state_dicts) == (("student",), (("teacher",),))


def test_modules_pickled_without_buffers(tmp_path: Path) -> None:
    old = Build(
        New(Global("zoo", "Old")), {"_parameters": {"w": W}, "_buffers": None, "_modules": {}}
    )
    assert list(smartload.inspect(write(tmp_path, old)).tensors) == ["w"]  # torch < 1.0 wrote that
