"""Shared fixtures: small real models, checkpoint writers and a sentinel for hostile payloads."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn


class SmallNet(nn.Module):
    """Conv + BN + a classifier: a backbone and a class-count head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def make_net(num_classes: int = 10, seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet(num_classes)
    with torch.no_grad():  # non-trivial buffers, so copies are visible
        net.bn.running_mean.uniform_()
        net.bn.running_var.uniform_(1, 2)
        net.bn.num_batches_tracked.fill_(7)
    return net


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(
    got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    """The same keys, and every tensor equal in shape, dtype and value."""
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def assert_unchanged(model: nn.Module, before: Mapping[str, torch.Tensor]) -> None:
    assert_same_tensors(model.state_dict(), before)


def write_zip(path: Path, members: Mapping[str, bytes]) -> Path:
    """A zip laid out like torch.save's (stored members)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


class Payload:
    """Pickles as ``posix.system(command)``: what a hostile checkpoint carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A file that a payload would create: it must never exist."""
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a payload ran"


@pytest.fixture
def touch(sentinel: Path) -> str:
    return f"touch {sentinel}"


def hostile_pickle(command: str, protocol: int = 2) -> bytes:
    return pickle.dumps({"state_dict": {}, "x": Payload(command)}, protocol=protocol)
