"""The adversarial corpus through smartload.load, smartload.inspect and `smartload inspect`, under
an audit hook that fails on any process start, code compilation or import while they run."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, make_net, snapshot
from corpus import CASES, Case

import smartload
from smartload import CheckpointFormatError, UnsafeCheckpointError
from smartload.cli import main

FORBIDDEN = (
    "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "exec", "compile", "import", "ctypes.dlopen", "pty.spawn", "socket.connect", "webbrowser.open",
    "shutil.rmtree", "os.remove", "os.unlink",
)  # fmt: skip


class _Recorder:
    """sys.addaudithook cannot be undone: one recorder for the session, armed around each call."""

    def __init__(self) -> None:
        self.armed = False
        self.events: list[str] = []
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if self.armed and event.startswith(FORBIDDEN):
            self.events.append(f"{event}{str(args)[:120]}")


@pytest.fixture(scope="module")
def recorder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Recorder]:
    rec = _Recorder()
    warm = tmp_path_factory.mktemp("warm") / "warm.pth"  # import everything a clean run needs
    torch.save({"state_dict": make_net(10).state_dict()}, warm)
    smartload.load(make_net(10), warm)
    smartload.inspect(warm)
    main(["inspect", str(warm), "--json"])
    main(["inspect", str(warm)])
    # zipfile decodes non-UTF-8 member names with cp437, imported on first use
    for name in ("numpy.core.multiarray", "numpy._core.multiarray", "encodings.cp437"):
        __import__(name)
    yield rec


EXIT = {UnsafeCheckpointError: 4, CheckpointFormatError: 3, None: 0}
READABLE_EXIT = {"SAFE": 0, "UNKNOWN": 6}


def _expect(case: Case, call: Any) -> BaseException | None:
    if case.error is None:
        call()
        return None
    with pytest.raises(case.error) as caught:
        call()
    assert case.fragment in str(caught.value)
    if case.globals:
        assert caught.value.globals == case.globals  # type: ignore[attr-defined]
    return caught.value


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_case(
    name: str, tmp_path: Path, touch: str, recorder: _Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    case = CASES[name]
    path = case.make(tmp_path, touch)
    model = make_net(10)
    before = snapshot(model)
    started = time.perf_counter()
    recorder.events.clear()
    recorder.armed = True
    try:
        error = _expect(case, lambda: smartload.load(model, path, **case.load_kwargs))
        inspect_case = (
            case
            if case.error is not None and "non-finite" not in case.fragment
            else Case(case.make, None)
        )
        _expect(inspect_case, lambda: smartload.inspect(path))
        code = main(["inspect", str(path), "--json"])
    finally:
        recorder.armed = False
    assert recorder.events == [], "the file made smartload do something it never should"
    assert time.perf_counter() - started < 20
    out = capsys.readouterr().out
    if inspect_case.error is None:
        assert (code, json.loads(out)["verdict"]) == (READABLE_EXIT[case.verdict], case.verdict)
    else:
        assert code == EXIT[inspect_case.error]
    if code == 4:
        assert json.loads(out)["globals"] == case.globals
    if error is not None:
        assert_unchanged(model, before)
        assert str(error).startswith(str(path))  # names the file (and member, for zips)


def test_corpus_has_every_case_the_issue_lists() -> None:
    assert len(CASES) >= 35
    assert sum(c.error is UnsafeCheckpointError for c in CASES.values()) >= 20
