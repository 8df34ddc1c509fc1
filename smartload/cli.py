"""The ``smartload`` command line. A thin layer over the library; ``main(argv) -> exit code``.

Exit codes: 0 ok; 2 usage error; 3 the file cannot be read (corrupt, truncated, unknown format);
4 the file is hostile (nothing was run); 5 the checkpoint does not fit the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence

from . import __version__
from ._inspect import CheckpointInfo, TensorInfo, inspect
from ._report import group_keys
from .errors import (
    CheckpointFormatError,
    IncompatibleCheckpointError,
    SmartloadError,
    UnsafeCheckpointError,
)

__all__ = ["main"]

EXIT_OK, EXIT_USAGE, EXIT_UNREADABLE, EXIT_UNSAFE, EXIT_INCOMPATIBLE = 0, 2, 3, 4, 5
_COLLAPSE_AT = 60

_EPILOG = """\
examples:
  smartload inspect model_final.pth          what the file holds, and whether it is safe
  smartload inspect ckpt.pth --json | jq .num_params
  smartload inspect model.safetensors --all  every key, even for large files

exit codes: 0 ok, 2 usage, 3 unreadable file, 4 hostile file (nothing was run), 5 incompatible
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartload",
        description="Read PyTorch checkpoints without running code from them.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"smartload {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ins = commands.add_parser(
        "inspect",
        help="show a checkpoint's format, safety, state dict and keys (reads no tensor data)",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ins.add_argument("path", help="checkpoint file or directory")
    ins.add_argument("--json", action="store_true", help="print JSON on stdout")
    ins.add_argument("--all", action="store_true", help="list every key group, never collapse")
    ins.add_argument("--ema", action="store_true", help="describe the EMA weights")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help, --version and usage errors
        return int(exc.code or 0)
    try:
        info = inspect(args.path, ema=args.ema)
    except UnsafeCheckpointError as exc:
        return _fail(args, exc, EXIT_UNSAFE, "unsafe")
    except CheckpointFormatError as exc:
        return _fail(args, exc, EXIT_UNREADABLE, "unreadable")
    except IncompatibleCheckpointError as exc:
        return _fail(args, exc, EXIT_INCOMPATIBLE, "incompatible")
    except SmartloadError as exc:
        return _fail(args, exc, EXIT_USAGE, "error")
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(_render(info, show_all=args.all))
    return EXIT_OK


def _fail(args: argparse.Namespace, exc: SmartloadError, code: int, verdict: str) -> int:
    if args.json:
        out = {
            "path": args.path,
            "safe": verdict != "unsafe",
            "error": verdict,
            "message": str(exc),
        }
        if isinstance(exc, UnsafeCheckpointError):
            out["globals"] = exc.globals
        print(json.dumps(out, indent=2))
    print(f"smartload: {verdict}: {exc}", file=sys.stderr)
    return code


def _render(info: CheckpointInfo, *, show_all: bool) -> str:
    lines = [
        f"{info.path}",
        f"  format      {info.format}",
        "  safety      safe: nothing in the file can run; globals: "
        + (", ".join(info.globals) if info.globals else "none"),
        f"  state dict  {_path(info.state_dict_path)}: {info.num_tensors:,} tensors, "
        f"{info.num_params:,} parameters, {_bytes(info.nbytes)} "
        f"({', '.join(f'{d} ×{n}' for d, n in info.dtypes.items())})",
    ]
    if info.other_state_dicts:
        lines.append("  also        " + ", ".join(_path(p) for p in info.other_state_dicts))
    for key, value in info.extras.items():
        lines.append(f"  {key:<11} {value}")
    if info.inert_globals:
        lines.append(
            "  inert       " + ", ".join(info.inert_globals) + " (recorded, never executed)"
        )
    for head in info.heads:
        lines.append(
            f"  head        {head.key}: {head.rows} rows → {head.num_classes} classes ({head.kind})"
        )
    if info.shared_storages:
        lines.append(f"  shared      {info.shared_storages} storage(s) viewed by several tensors")
    if info.non_contiguous:
        lines.append(f"  strided     {len(info.non_contiguous)} non-contiguous tensor(s)")
    for key, value in info.metadata.items():
        lines.append(f"  metadata    {key} = {value[:80]}")
    rows = _key_rows(info.tensors)
    if len(rows) > _COLLAPSE_AT and not show_all:
        hidden = len(rows) - 40
        rows = [*rows[:30], (f"... {hidden} more groups (--all shows them)", "", ""), *rows[-10:]]
    width = min(max((len(r[0]) for r in rows), default=0), 70)
    lines.append("")
    lines.extend(f"  {k:<{width}}  {s:<18} {d}".rstrip() for k, s, d in rows)
    return "\n".join(lines)


def _key_rows(tensors: Mapping[str, TensorInfo]) -> list[tuple[str, str, str]]:
    grouped: dict[tuple[str, tuple[int, ...], str], list[str]] = {}
    for key, t in tensors.items():
        grouped.setdefault((key.rpartition(".")[0], t.shape, t.dtype), []).append(key)
    rows = []
    for (_, shape, dtype), keys in grouped.items():
        for group in group_keys(keys):
            rows.append((group, "[" + ", ".join(map(str, shape)) + "]", dtype))
    return rows


def _path(path: Sequence[str]) -> str:
    return "/".join(path) if path else "(top level)"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"
