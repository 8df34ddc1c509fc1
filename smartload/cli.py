"""The ``smartload`` command line: a thin layer over the library; ``main(argv) -> exit code``.

Exit codes: 0 ok; 1 ``diff A B`` found a difference; 2 usage error; 3 the file cannot be read
(corrupt, truncated, unknown format); 4 the file is hostile, verdict UNSAFE (nothing was run); 5
the checkpoint does not fit the model; 6 ``inspect``'s verdict is UNKNOWN: the file names globals
smartload does not know (kept inert, nothing was run), or a DCP ``.metadata`` names globals that
DCP never writes there (refused, nothing built), whatever the command.

``inspect`` imports no torch (unless ``--scan``), so it answers in a fraction of a second.
Output for people goes through rich (colours only on a terminal; ``NO_COLOR`` honoured); ``--json``
prints JSON alone on stdout, and diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from . import __version__
from ._dcp import UnknownGlobalsError
from ._inspect import CheckpointInfo, TensorInfo, inspect
from ._module_tree import ModuleTree
from ._report import group_keys
from .errors import (
    CheckpointFormatError,
    IncompatibleCheckpointError,
    InvalidArgumentError,
    SmartloadError,
    UnsafeCheckpointError,
)

if TYPE_CHECKING:
    import torch

    from ._compare import CheckpointComparison
    from ._report import LoadPlan

__all__ = ["main"]

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2  # 1: diff A B found a difference
EXIT_UNREADABLE, EXIT_UNSAFE, EXIT_INCOMPATIBLE, EXIT_UNKNOWN = 3, 4, 5, 6
_COLLAPSE_AT = 60
_MODEL_KINDS = (
    "timm:NAME, torchvision:NAME, d2:CONFIG (model zoo), a detectron2 .yaml path, "
    "yolo:CONFIG (an ultralytics model yaml, e.g. yolo11n.yaml), "
    "yolov5:CONFIG (an original YOLOv5 model yaml, e.g. yolov5s.yaml or "
    "models/hub/yolov5s-transformer.yaml), "
    "or hf:CONFIG_DIR | hf:CLASS | hf:CLASS:CONFIG_DIR (a transformers model: from a "
    "save_pretrained folder's config.json, its class from 'architectures'; a class such as "
    "ViTForImageClassification with its default config; built on the meta device)"
)

_EPILOG = """\
examples:
  smartload inspect model_final.pth                 format, safety, state dict, keys (no data read)
  smartload inspect ckpt.pth --scan                 also read the data: NaN/Inf and all-zero tensors
  smartload inspect ckpt.pth --json | jq .num_params
  smartload inspect checkpoints/step-1000           a torch.distributed.checkpoint (DCP) directory
  smartload diff ckpt.pth.tar --model timm:convnext_tiny --num-classes 10
  smartload diff model_final.pth --model d2:COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml \\
      --num-classes 3 --class-map person,car,dog --source-classes coco_2017_train
  smartload diff yolov8n.pt --model yolo:yolov8n.yaml --num-classes 3 --class-map person,car,dog
  smartload diff yolov5s.pt --model yolov5:models/hub/yolov5s-transformer.yaml --num-classes 3
  smartload diff vit-base/ --model hf:my-vit/         a transformers model from a config folder
  smartload diff a.pth b.safetensors                compare two checkpoints: keys, shapes, values
  smartload convert ckpt.pth model.safetensors      safe conversion (contiguous, metadata)

exit codes: 0 ok (inspect: SAFE, every global the file names is known to be data),
            2 usage, 3 unreadable file, 4 hostile file: UNSAFE (nothing was run),
            5 the checkpoint does not fit the model,
            6 inspect: UNKNOWN, the file names globals smartload does not know (kept inert,
              nothing was run; torch.load without weights_only would import them; a DCP
              .metadata naming any is refused, by every command);
            diff A B: 0 identical (same keys, shapes, dtypes and values), 1 they differ
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartload",
        description="Read PyTorch checkpoints without running code from them; plan and convert.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"smartload {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    ins = command("inspect", "show a checkpoint's format, safety, state dict and keys")
    ins.add_argument("path", help="checkpoint file or directory")
    ins.add_argument("--json", action="store_true", help="print JSON on stdout")
    ins.add_argument("--all", action="store_true", help="list every key group, never collapse")
    ins.add_argument("--scan", action="store_true", help="read the data: NaN/Inf, all-zero")
    ins.add_argument("--ema", action="store_true", help="describe the EMA weights")

    dif = command("diff", "what loading a checkpoint into a model would do (nothing is written)")
    dif.add_argument("path", help="checkpoint file or directory")
    dif.add_argument(
        "other",
        nargs="?",
        help="a second checkpoint: compare keys, shapes, dtypes and values (exit 1 if any differ)",
    )
    dif.add_argument(
        "--model",
        help=_MODEL_KINDS,
    )
    dif.add_argument("--num-classes", type=int, help="the model's class count")
    dif.add_argument(
        "--class-map", help="old class per new class: indices or names, 'none' for new ones"
    )
    dif.add_argument("--source-classes", help="the checkpoint's label set or names (a,b,c)")
    dif.add_argument("--ema", action="store_true", help="plan with the EMA weights")
    dif.add_argument("--json", action="store_true", help="print JSON on stdout")

    con = command("convert", "write the checkpoint's state dict as safetensors, safely")
    con.add_argument("path", help="checkpoint file or directory")
    con.add_argument("out", help="the .safetensors file to write")
    con.add_argument("--ema", action="store_true", help="convert the EMA weights")
    con.add_argument("--allow-nonfinite", action="store_true", help="convert NaN/Inf values too")
    con.add_argument("--json", action="store_true", help="print JSON on stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help, --version and usage errors
        return int(exc.code or 0)
    run: Callable[[argparse.Namespace, Console], int] = {
        "inspect": _inspect,
        "diff": _diff,
        "convert": _convert,
    }[args.command]
    out = _console()
    try:
        return run(args, out)
    except UnsafeCheckpointError as exc:
        return _fail(args, exc, EXIT_UNSAFE, "unsafe")
    except UnknownGlobalsError as exc:  # a DCP .metadata refused for what it names
        return _fail(args, exc, EXIT_UNKNOWN, "unknown")
    except CheckpointFormatError as exc:
        return _fail(args, exc, EXIT_UNREADABLE, "unreadable")
    except IncompatibleCheckpointError as exc:
        return _fail(args, exc, EXIT_INCOMPATIBLE, "incompatible")
    except SmartloadError as exc:
        return _fail(args, exc, EXIT_USAGE, "error")
    except OSError as exc:  # a path the user gave: missing, unreadable, a full disk
        failure = CheckpointFormatError(exc.filename or "?", exc.strerror or str(exc))
        return _fail(args, failure, EXIT_UNREADABLE, "unreadable")


def _console(stderr: bool = False) -> Console:
    """Colours on a terminal only (rich also honours NO_COLOR); wide lines when piped."""
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(stderr=stderr, highlight=False, soft_wrap=True, width=200)
    return console


def _fail(args: argparse.Namespace, exc: SmartloadError, code: int, verdict: str) -> int:
    err = _console(stderr=True)
    if args.json:
        out: dict[str, Any] = {"path": args.path, "safe": verdict != "unsafe", "error": verdict}
        out["verdict"] = "UNSAFE" if isinstance(exc, UnsafeCheckpointError) else None
        out["message"] = str(exc)
        if isinstance(exc, UnsafeCheckpointError):
            out["globals"] = exc.globals
            out["calls"] = exc.calls
        if isinstance(exc, UnknownGlobalsError):
            out["verdict"] = "UNKNOWN"
            out["unknown_globals"] = exc.globals
        if isinstance(exc, IncompatibleCheckpointError):
            out["mismatches"] = [
                {"key": k, "ckpt_shape": _list(c), "model_shape": _list(m)}
                for k, c, m in exc.mismatches
            ]
        print(json.dumps(out, indent=2))
    if isinstance(exc, UnsafeCheckpointError):
        err.print(Text(f"UNSAFE {args.path}", style="bold red"))
        err.print(f"  hostile globals: {_printable(', '.join(exc.globals))}", markup=False)
        for call in exc.calls:
            err.print(f"  would have run:  {_printable(call)}", markup=False)
        err.print("  nothing from the file was run", markup=False)
    if isinstance(exc, UnknownGlobalsError):
        err.print(Text(f"UNKNOWN {args.path}", style="bold yellow"))
        err.print(f"  unknown globals: {_printable(', '.join(exc.globals))}", markup=False)
    err.print(
        Text(_printable(f"smartload: {verdict}: {exc}")),
        style="red" if code != EXIT_USAGE else None,
    )
    return code


def _list(shape: Sequence[int] | None) -> list[int] | None:
    return None if shape is None else list(shape)


# --------------------------------------------------------------------------------------------------
# inspect


def _inspect(args: argparse.Namespace, out: Console) -> int:
    info = inspect(args.path, ema=args.ema)
    scanned = _scan(args.path, args.ema, info.nbytes, args.json) if args.scan else None
    code = EXIT_UNKNOWN if info.verdict == "UNKNOWN" else EXIT_OK
    if args.json:
        data = info.to_dict()
        if scanned is not None:
            data["scan"] = scanned
        print(json.dumps(data, indent=2))
        return code
    _render_inspect(out, info, show_all=args.all)
    if scanned is not None:
        _render_scan(out, scanned)
    return code


def _render_inspect(out: Console, info: CheckpointInfo, *, show_all: bool) -> None:
    out.print(Text(_printable(info.path), style="bold"))
    out.print(_verdict_line(info))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="cyan")
    facts.add_column()
    fact = _plain_row(facts)
    fact(
        "state dict",
        f"{_path(info.state_dict_path)}: {info.num_tensors:,} tensors, "
        f"{info.num_params:,} parameters, {_bytes(info.nbytes)} "
        f"({', '.join(f'{d} ×{n}' for d, n in info.dtypes.items())})",
    )
    if info.module_tree is not None:
        _module_facts(fact, info.module_tree)
    if info.other_state_dicts:
        fact("also", ", ".join(_path(p) for p in info.other_state_dicts))
    for key, value in info.extras.items():
        fact(key, value)
    if info.inert_globals:
        fact("inert", ", ".join(info.inert_globals) + " (recorded, never executed)")
    for head in info.heads:
        fact("head", f"{head.key}: {head.rows} rows → {head.num_classes} classes ({head.kind})")
    if info.shared_storages:
        fact("shared", f"{info.shared_storages} storage(s) viewed by several tensors")
    if info.non_contiguous:
        fact("strided", f"{len(info.non_contiguous)} non-contiguous tensor(s)")
    if info.format == "dcp":
        fact("chunks", _chunk_fact(info))
    for key, value in info.metadata.items():
        fact("metadata", f"{key} = {value[:80]}")
    _print_trimmed(out, facts)
    rows = _key_rows(info.tensors)
    hidden = len(rows) - 40 if len(rows) > _COLLAPSE_AT and not show_all else 0
    table = Table(box=None, padding=(0, 2), show_header=True, header_style="bold")
    table.add_column("key")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("params", justify="right")
    for i, row in enumerate(rows):
        if hidden and i == 30:
            table.add_row(Text(f"... {hidden} more groups (--all shows them)", style="dim"))
        if hidden and 30 <= i < len(rows) - 10:
            continue
        _plain_row(table)(*row)
    _print_trimmed(out, table)


def _verdict_line(info: CheckpointInfo) -> Text:
    """SAFE (green) or UNKNOWN (yellow), the format, and the globals the file names."""
    if info.verdict == "SAFE":
        line = Text("SAFE", style="bold green")
        line.append(
            f"  {info.format}; nothing in the file can run; globals: "
            + (_printable(", ".join(info.globals)) if info.globals else "none"),
            style="default",
        )
        return line
    line = Text("UNKNOWN", style="bold yellow")
    line.append(f"  {info.format}; {_printable(info.verdict_reason)}", style="default")
    return line


def _chunk_fact(info: CheckpointInfo) -> str:
    """How a DCP state dict is split: ``14 chunks for 12 tensors; split: fc.weight ×2``."""
    split = [(k, t.chunks) for k, t in info.tensors.items() if t.chunks > 1]
    line = f"{info.num_chunks:,} for {info.num_tensors:,} tensors"
    if split:
        shown = ", ".join(f"{k} ×{n}" for k, n in split[:4])
        line += f"; split: {shown}" + (f", ... {len(split) - 4} more" if len(split) > 4 else "")
    return line


def _print_trimmed(out: Console, renderable: RenderableType) -> None:
    """Print line by line without the spaces rich pads table cells with to the column width."""
    for line in out.render_lines(renderable, out.options, pad=False):
        text = Text()
        for segment in line:
            if not segment.control:
                text.append(segment.text, segment.style)
        text.rstrip()
        out.print(text)


def _module_facts(fact: Callable[..., None], tree: ModuleTree) -> None:
    """A whole-model pickle: the module classes it names, none of them imported or run."""
    fact(
        "modules",
        f"{tree.root.qualname}, {tree.modules:,} modules (inert records: no class imported, "
        "nothing executed; the state dict is read from their tensors)",
    )
    for line in tree.outline():
        fact("", line)
    shown = list(tree.classes.items())
    classes = ", ".join(f"{name.rpartition('.')[2]} ×{n}" for name, n in shown[:12])
    fact("classes", classes + (f", ... {len(shown) - 12} more" if len(shown) > 12 else ""))
    if tree.class_names is not None:
        names = tree.class_names
        fact(
            "names",
            f"{len(names)} classes: {', '.join(names[:10])}" + (", ..." if len(names) > 10 else ""),
        )
    if tree.hooked:
        fact("hooks", "state-dict hooks (not run) on " + ", ".join(tree.hooked[:8]))
    attributes = {k: v for k, v in tree.attributes.items() if k != "names"}
    if attributes:
        fact("attributes", ", ".join(f"{k}: {v}" for k, v in attributes.items()))


def _plain_row(table: Table) -> Callable[..., None]:
    """Add a row of text from the file: never read as rich markup (``[inert]`` is not a tag)."""

    def add(*cells: str) -> None:
        table.add_row(*(Text(_printable(cell)) for cell in cells))

    return add


def _printable(text: str) -> str:
    """Names from the file, with control characters escaped: they must not drive the terminal."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c == "\n" else c.encode("unicode_escape").decode() for c in text
    )


def _key_rows(tensors: Mapping[str, TensorInfo]) -> list[tuple[str, str, str, str]]:
    """One row per module and (shape, dtype): ``layer1.0.bn1.{bias, weight}``."""
    grouped: dict[tuple[str, tuple[int, ...], str], list[str]] = {}
    for key, t in tensors.items():
        grouped.setdefault((key.rpartition(".")[0], t.shape, t.dtype), []).append(key)
    rows = []
    for (_, shape, dtype), keys in grouped.items():
        numel = tensors[keys[0]].numel
        for group in group_keys(keys):
            count = numel * (group.count(",") + 1)
            rows.append((group, "[" + ", ".join(map(str, shape)) + "]", dtype, f"{count:,}"))
    return rows


def _scan(path: str, ema: bool, total: int, quiet: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from ._convert import scan

    err = Console(stderr=True)
    show = not quiet and total > 64 * 1024**2 and err.is_terminal
    with Progress(
        "scanning", BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=err,
        disable=not show, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task("scan", total=total)
        found = scan(path, ema=ema, progress=lambda n: progress.advance(task, n))
    problems = [f for f in found if f.nan or f.inf or f.all_zero]
    return {
        "tensors": len(found),
        "nonfinite": {f.key: {"nan": f.nan, "inf": f.inf} for f in problems if f.nan or f.inf},
        "all_zero": [f.key for f in problems if f.all_zero],
    }


def _render_scan(out: Console, scanned: Mapping[str, Any]) -> None:
    bad, zero = scanned["nonfinite"], scanned["all_zero"]
    style = "bold red" if bad else "bold green"
    out.print(
        Text(f"scan: {scanned['tensors']:,} tensors read", style=style).append(
            f"; {len(bad)} with NaN/Inf, {len(zero)} all zero", style="default"
        )
    )
    for key, counts in bad.items():
        out.print(f"  non-finite  {key}: {counts['nan']} NaN, {counts['inf']} Inf", markup=False)
    for group in group_keys(zero):
        out.print(f"  all zero    {group}", markup=False)


# --------------------------------------------------------------------------------------------------
# diff


def _diff(args: argparse.Namespace, out: Console) -> int:
    if args.other is not None:
        if args.model:
            raise InvalidArgumentError("give either a second checkpoint or --model, not both")
        return _compare(args, out)
    if not args.model:
        raise InvalidArgumentError("diff needs --model SPEC (or a second checkpoint)")
    import smartload

    model = _build_model(args.model, args.num_classes)
    source: Any = args.source_classes
    if source and "," in source:
        source = [s.strip() for s in source.split(",")]
    plan = smartload.diff(
        model,
        args.path,
        num_classes=args.num_classes,
        class_map=_class_map(args.class_map),
        source_classes=source,
        ema=args.ema,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        _render_plan(out, plan)
    return EXIT_OK


def _class_map(text: str | None) -> list[int | str | None] | None:
    if not text:
        return None
    out: list[int | str | None] = []
    for part in (p.strip() for p in text.split(",")):
        out.append(
            None
            if part.lower() in ("none", "-", "")
            else int(part)
            if part.isdecimal() and part.isascii()
            else part
        )
    return out


def _build_model(spec: str, num_classes: int | None) -> torch.nn.Module:
    try:
        return _build(spec, num_classes)
    except InvalidArgumentError:
        raise
    except Exception as exc:  # unknown names, bad configs: the frameworks raise many types
        raise InvalidArgumentError(
            f"--model {spec!r}: cannot build it ({type(exc).__name__}: {exc})"
        ) from None


def _build(spec: str, num_classes: int | None) -> torch.nn.Module:
    kind, _, name = spec.partition(":")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "timm":
        import timm

        model: torch.nn.Module = timm.create_model(name, pretrained=False, **kwargs)
        return model
    if kind == "torchvision":
        import torchvision

        built: torch.nn.Module = torchvision.models.get_model(name, weights=None, **kwargs)
        return built
    if kind == "yolo":
        from ultralytics.nn import tasks

        cfg = tasks.yaml_model_load(name)  # type: ignore[no-untyped-call]
        task = tasks.guess_model_task(cfg)  # type: ignore[no-untyped-call]
        classes = {
            "detect": tasks.DetectionModel, "segment": tasks.SegmentationModel,
            "pose": tasks.PoseModel, "obb": tasks.OBBModel, "classify": tasks.ClassificationModel,
        }  # fmt: skip
        if task == "detect" and "rtdetr" in name:
            classes["detect"] = tasks.RTDETRDetectionModel
        if task not in classes:
            raise InvalidArgumentError(
                f"--model {spec!r}: an ultralytics {task} model is not supported"
            )
        quiet = logging.getLogger("ultralytics")  # it logs to stdout, where --json writes
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            yolo: torch.nn.Module = classes[task](cfg, nc=num_classes, verbose=False)
        finally:
            quiet.setLevel(level)
        return yolo
    if kind == "yolov5":
        from .adapters.yolov5 import build_model as build_yolov5

        return build_yolov5(name, num_classes)
    if kind == "hf":
        from .adapters.transformers import build_model as build_transformers

        return build_transformers(name, num_classes)
    if kind == "d2" or spec.endswith((".yaml", ".yml")):
        from detectron2.config import get_cfg
        from detectron2.model_zoo import get_config_file
        from detectron2.modeling import build_model

        cfg = get_cfg()
        cfg.merge_from_file(get_config_file(name) if kind == "d2" else spec)
        cfg.MODEL.DEVICE = "cpu"
        if num_classes is not None:
            cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
            cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
        return build_model(cfg)  # type: ignore[no-any-return]
    raise InvalidArgumentError(f"--model {spec!r}: use {_MODEL_KINDS}")


def _render_plan(out: Console, plan: LoadPlan) -> None:
    styles = {"copy": "green", "slice": "yellow", "reinit-normal": "magenta", "skip": "dim"}
    lines = str(plan).splitlines()
    out.print(Text(_printable(lines[0]), style="bold"))
    out.print(Text(_printable(lines[1])))
    for line in lines[2:]:
        action = line.split()[0] if line.startswith("  ") and line.split() else ""
        out.print(Text(_printable(line), style=styles.get(action, "default")))


def _compare(args: argparse.Namespace, out: Console) -> int:
    from ._compare import compare_checkpoints

    result = compare_checkpoints(args.path, args.other, ema=args.ema)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _render_comparison(out, result)
    return EXIT_OK if result.identical else EXIT_DIFFERENT


def _render_comparison(out: Console, result: CheckpointComparison) -> None:
    a, b = result.a.tensors, result.b.tensors
    out.print(Text(_printable(f"{result.a.path}  vs  {result.b.path}"), style="bold"))
    counts = (
        f"{len(result.same):,} keys alike, {len(result.value_differs)} of other values, "
        f"{len(result.shape_differs)} of another shape, {len(result.dtype_differs)} of another "
        f"dtype, {len(result.only_in_a)} only in the first, {len(result.only_in_b)} only in the "
        "second"
    )
    out.print(Text(counts + (" (identical)" if result.identical else "")))
    if result.rename_hint is not None:
        hint = result.rename_hint.note("key(s) only in the second", "only in the first")
        out.print(Text(_printable(f"hint: {hint} (rename applies to the first's keys)")))
    lines = [
        f"  value  {k}: {v.elements:,} of {v.numel:,} elements differ, max |a - b| {v.max_abs:.6g}"
        for k, v in result.value_differs.items()
    ]
    lines += [
        f"  shape  {k}: {list(a[k].shape)} vs {list(b[k].shape)}" for k in result.shape_differs
    ]
    lines += [f"  dtype  {k}: {a[k].dtype} vs {b[k].dtype}" for k in result.dtype_differs]
    for label, keys in (("first", result.only_in_a), ("second", result.only_in_b)):
        lines += [f"  only in the {label}: {group}" for group in group_keys(list(keys))]
    for line in lines:
        out.print(Text(_printable(line)))


# --------------------------------------------------------------------------------------------------
# convert


def _convert(args: argparse.Namespace, out: Console) -> int:
    from ._convert import convert_to_safetensors

    if not args.out.endswith(".safetensors"):
        raise InvalidArgumentError(f"{args.out}: the output must be a .safetensors file")
    written = convert_to_safetensors(
        args.path, args.out, ema=args.ema, allow_nonfinite=args.allow_nonfinite
    )
    if args.json:
        print(json.dumps(written, indent=2))
    else:
        out.print(
            f"wrote {written['out']}: {written['tensors']:,} tensors, {_bytes(written['bytes'])} "
            f"(state dict {written['metadata']['state_dict_path'] or '(top level)'})",
            markup=False,
        )
    return EXIT_OK


def _path(path: Sequence[str]) -> str:
    return "/".join(path) if path else "(top level)"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
