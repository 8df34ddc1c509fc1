"""Errors raised by smartload.

::

    SmartloadError
     ├── CheckpointFormatError (+ ValueError)    the file is corrupt, truncated, or of no known format
     ├── UnsafeCheckpointError                    the file names dangerous globals or constructs
     ├── IncompatibleCheckpointError (+ ValueError)  keys that no policy can place
     └── InvalidArgumentError (+ ValueError)      a keyword given to smartload is wrong

Every message names the file, key or global concerned and ends with what to do next. The context
is also available as attributes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CheckpointFormatError",
    "IncompatibleCheckpointError",
    "InvalidArgumentError",
    "SmartloadError",
    "UnsafeCheckpointError",
]


class SmartloadError(Exception):
    """Base class of every error smartload raises on purpose."""


class CheckpointFormatError(SmartloadError, ValueError):
    """The checkpoint cannot be read: unknown format, corrupt, truncated or refused by design."""

    def __init__(self, path: str, problem: str, hint: str = "") -> None:
        self.path = path
        self.problem = problem
        self.hint = hint
        message = f"{path}: {problem}"
        if hint:
            message += f". {hint}"
        super().__init__(message)


class UnsafeCheckpointError(SmartloadError):
    """The checkpoint names globals or constructs that only a hostile file would contain.

    ``globals`` lists every offending global found (``"posix.system"``, ...), in file order;
    ``calls`` what the file would have run with them (``"posix.system('rm -rf ~')"``), described.
    Nothing from the file was imported or called.
    """

    def __init__(
        self, path: str, globals: Sequence[str], detail: str = "", calls: Sequence[str] = ()
    ) -> None:
        self.path = path
        self.globals = list(globals)
        self.detail = detail
        self.calls = list(calls)
        found = ", ".join(self.globals) if self.globals else "(no global)"
        message = f"{path}: refusing a hostile checkpoint: it names {found}"
        if detail:
            message += f" ({detail})"
        message += (
            ". Nothing from the file was run. Do not load this file with torch.load or pickle; "
            "get the weights from a trusted source (or as .safetensors)"
        )
        super().__init__(message)


class IncompatibleCheckpointError(SmartloadError, ValueError):
    """Some keys cannot be placed by any policy.

    ``mismatches`` holds ``(key, checkpoint_shape, model_shape)`` for every such key.
    """

    def __init__(
        self,
        mismatches: Sequence[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]],
        hint: str,
        checkpoint: str = "",
    ) -> None:
        self.mismatches = list(mismatches)
        self.checkpoint = checkpoint
        lines = [
            f"  {key}: checkpoint {_shape(ckpt)} vs model {_shape(model)}"
            for key, ckpt, model in self.mismatches
        ]
        where = f" from {checkpoint}" if checkpoint else ""
        message = (
            f"cannot load {len(self.mismatches)} key(s){where}:\n" + "\n".join(lines) + f"\n{hint}"
            if self.mismatches
            else (f"{checkpoint}: {hint}" if checkpoint else hint)
        )
        super().__init__(message)


class InvalidArgumentError(SmartloadError, ValueError):
    """A keyword passed to smartload is malformed (unknown policy, bad class map, ...)."""


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else "[" + ", ".join(map(str, shape)) + "]"
