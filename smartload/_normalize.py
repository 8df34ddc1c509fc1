"""Normalizing: find the state dict inside a checkpoint's containers, and match its keys to a model's.

No torch import: leaves are records from the reader, or tensors/arrays of an in-memory mapping
(recognised by their ``shape`` and ``dtype``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

from ._module_tree import Budget, ModuleTree, ModuleTreeError, extract
from ._records import ArrayRecord, Describer, StandIn, TensorRecord, brief, is_leaf, is_module
from .errors import CheckpointFormatError, InvalidArgumentError, UnsafeCheckpointError

__all__ = [
    "Found",
    "StateDictChoice",
    "choose_state_dict",
    "describe_extras",
    "leaf_dtype",
    "leaf_shape",
    "match_keys",
]

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Containers of training state, never model weights: never searched for a state dict. torchtitan
# saves its model keys at the top level next to "optimizer", "lr_scheduler", "dataloader" and
# "train_state" (whose own tensors, a step counter or the optimizer's moments, are not weights).
_NOT_WEIGHTS = frozenset(
    """optimizer optimizers optimizer_states optimizer_state_dict opt optim lr_scheduler
    lr_schedulers scheduler schedulers scaler grad_scaler amp loops callbacks dataloader
    dataloaders data_loader train_state trainer_state rng rng_state rng_states""".split()
)
_MAX_DEPTH = 4


def leaf_shape(value: Any) -> tuple[int, ...]:
    if type(value) is TensorRecord:  # already a tuple of ints
        return value.shape
    return tuple(int(s) for s in value.shape)


def leaf_dtype(value: Any) -> str:
    if isinstance(value, TensorRecord | ArrayRecord):
        return value.dtype
    return str(value.dtype).removeprefix("torch.")  # numpy spells dtypes as torch does


def _is_ema(path: Sequence[Any]) -> bool:
    return any("ema" in re.split(r"[^a-z0-9]+", str(part).lower()) for part in path)


@dataclass(frozen=True)
class StateDictChoice:
    path: tuple[str, ...]
    tensors: Mapping[str, Any]
    others: tuple[tuple[str, ...], ...]  # every other state dict found (EMA copies, ...)
    ema: bool
    module: ModuleTree | None = None  # the pickled module the tensors come from, if any


class Found(NamedTuple):
    path: tuple[str, ...]
    tensors: Mapping[str, Any]
    module: ModuleTree | None = None  # set when the tensors come from a pickled module
    refused: Exception | None = None  # a pickled module smartload will not extract: why


def find_state_dicts(tree: Any, where: str) -> list[Found]:
    """Every mapping of str → tensor in the tree (outside optimizer state), with its path, and
    the state dict of every pickled ``nn.Module`` (``torch.save(model)``, YOLO ``.pt`` files).

    A mapping whose tensors sit next to other entries (torchtitan's top level: the model's keys
    beside ``optimizer``, ``lr_scheduler``, ``dataloader``, ``train_state``) gives its tensors
    when nothing under it is a state dict and each other entry is training state or holds no
    tensor (see :func:`_tensors_beside_state`).

    A pickled module that cannot be extracted is listed with ``refused`` (a smartload error
    naming ``where``, the file): it is raised only if the weights would be taken from it.
    """
    found: list[Found] = []
    seen: set[int] = set()  # a pickle can share one dict many times (or contain itself)
    budget = Budget()  # one for every module tree in the file
    describe = Describer()  # counts the tensors under each container once

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if id(node) in seen:
            return
        if is_module(node):
            seen.add(id(node))
            try:
                tensors, module = extract(node, budget)
            except ModuleTreeError as exc:
                found.append(Found(path, {}, refused=_tree_error(exc, where, path)))
                return
            if tensors:
                found.append(Found(path, tensors, module))
            return
        if not isinstance(node, Mapping) or not node:
            return
        seen.add(id(node))
        if all(isinstance(k, str) for k in node) and all(is_leaf(v) for v in node.values()):
            found.append(Found(path, node, None))
            return
        below = len(found)
        if len(path) < _MAX_DEPTH:
            for key, value in node.items():
                if isinstance(key, str) and key not in _NOT_WEIGHTS:
                    walk(value, (*path, key))
        if len(found) == below:  # the weights are not further down: maybe here, beside the rest
            tensors = _tensors_beside_state(node, describe)
            if tensors:
                found.append(Found(path, tensors, None))

    walk(tree, ())
    return found


def _tensors_beside_state(node: Mapping[Any, Any], describe: Describer) -> dict[str, Any]:
    """The str-keyed tensors of ``node`` if every other entry is training state (a key of
    :data:`_NOT_WEIGHTS`) or holds no tensor at all (``epoch``, ``args``, a DCP bytes item);
    else none. Never the tensors beside a container of other tensors: which would be the
    weights is then a guess. The others are looked into only when there are tensors."""
    tensors = {k: v for k, v in node.items() if isinstance(k, str) and is_leaf(v)}
    if not tensors:
        return {}
    for key, value in node.items():
        if key in tensors or (isinstance(key, str) and key in _NOT_WEIGHTS):
            continue
        if is_leaf(value) or is_module(value) or describe.count_leaves(value):
            return {}
    return tensors


def _tree_error(exc: ModuleTreeError, where: str, path: tuple[str, ...]) -> Exception:
    at = f"in the pickled module at {_show_path(path)}: " if path else "in the pickled module: "
    if exc.global_name is not None:
        return UnsafeCheckpointError(where, [exc.global_name], detail=at + str(exc))
    if exc.limit:
        hint = "Where the model's code is trusted, save model.state_dict() and load that"
    else:
        hint = "torch.save does not write this; do not trust the file"
    return CheckpointFormatError(where, at + str(exc), hint)


def choose_state_dict(
    path: str,
    tree: Any,
    *,
    ema: bool = False,
    state_dict_path: Sequence[str] | None = None,
    describing: bool = False,
) -> StateDictChoice:
    """Pick the model weights: the largest non-EMA state dict, or the largest EMA one if ``ema``.
    ``describing`` (``inspect``): a file holding only EMA weights gives those, not an error."""
    if is_leaf(tree):
        raise CheckpointFormatError(
            path, "the file holds a single tensor, not a state dict", "Save model.state_dict()"
        )
    found = find_state_dicts(tree, path)
    if found and all(f.refused is not None for f in found):
        _raise_refused(found[0])
    if not found:
        raise CheckpointFormatError(
            path,
            f"no state dict found (top level: {_describe_top(tree)})",
            "smartload needs a mapping of parameter names to tensors somewhere in the file",
        )
    if state_dict_path is not None:
        wanted = tuple(state_dict_path)
        chosen = [f for f in found if f.path == wanted]
        if not chosen:
            paths = ", ".join(_show_path(f.path) for f in found)
            raise InvalidArgumentError(
                f"{path}: no state dict at {_show_path(wanted)}; state dicts found: {paths}"
            )
    else:
        chosen = [f for f in found if _is_ema(f.path) == ema]
        if not chosen and describing:  # inspect describes EMA-only files all the same
            chosen = found
        if not chosen:
            paths = ", ".join(_show_path(f.path) for f in found)
            if ema:
                raise InvalidArgumentError(
                    f"{path}: ema=True but the file has no EMA weights (state dicts: {paths}); "
                    "drop ema=True"
                )
            raise InvalidArgumentError(
                f"{path}: the file holds only EMA weights ({paths}); pass ema=True to load them"
            )
    usable = [f for f in chosen if f.refused is None]
    if not usable:  # the weights asked for are in a module smartload refuses to extract
        _raise_refused(chosen[0])
    best = max(usable, key=lambda f: (len(f.tensors), -len(f.path)))
    others = tuple(f.path for f in found if f.path != best.path and f.refused is None)
    return StateDictChoice(best.path, best.tensors, others, _is_ema(best.path), best.module)


def _raise_refused(found: Found) -> NoReturn:
    assert found.refused is not None
    raise found.refused


def _describe_top(tree: Any) -> str:
    if isinstance(tree, Mapping):
        keys = [brief(k) for k in list(tree)[:8]]
        return "keys " + ", ".join(keys) + (" ..." if len(tree) > 8 else "")
    if isinstance(tree, StandIn):
        return f"a pickled {tree.qualname} object"
    return type(tree).__name__


def _show_path(path: Sequence[str]) -> str:
    return "[" + ", ".join(repr(p) for p in path) + "]" if path else "the top level"


def describe_extras(tree: Any, skip: Iterable[tuple[str, ...]]) -> dict[str, str]:
    """One line for each non-weight entry at the top level: what it holds. Each container is
    walked once, however many keys share it."""
    skipped = set(skip)
    out: dict[str, str] = {}
    if not isinstance(tree, Mapping):
        return out
    describe = Describer()
    for key, value in tree.items():
        name = key if isinstance(key, str) else brief(key)
        if (name,) in skipped or is_leaf(value):
            continue
        out[name] = describe(value)
    return out


def compile_renames(rename: Any) -> list[tuple[re.Pattern[str], str]]:
    if rename is None:
        return []
    pairs = rename.items() if isinstance(rename, Mapping) else rename
    try:
        return [(re.compile(pattern), replacement) for pattern, replacement in pairs]
    except (TypeError, ValueError, re.error) as exc:
        raise InvalidArgumentError(
            f"rename must map regular expressions to replacements ({exc}); "
            "e.g. rename={r'^backbone\\.': 'encoder.'}"
        ) from None


def match_keys(
    ckpt_keys: Iterable[str], model_keys: Iterable[str], rename: Any = None
) -> dict[str, str]:
    """Map each checkpoint key to the model key it will feed (``{ckpt_key: model_key}``).

    User renames apply first. Then a wrapper prefix (``module.``, ``_orig_mod.``, ``model.``) is
    stripped from, or added to, a checkpoint key only when the key does not match as it is and the
    changed key does (and no other checkpoint key already feeds it).
    """
    rules = compile_renames(rename)
    model = set(model_keys)
    renamed: dict[str, str] = {}
    for key in ckpt_keys:
        new = key
        for pattern, replacement in rules:
            new = pattern.sub(replacement, new)
        renamed[key] = new
    taken = {new for new in renamed.values() if new in model}
    lengths: set[int] = set()  # of the model's keys: made at the first key that does not match
    out: dict[str, str] = {}
    for key, new in renamed.items():
        if new not in model:
            lengths = lengths or {len(k) for k in model}
            candidate = _unwrap(new, model, lengths, taken)
            if candidate is not None:
                taken.add(candidate)
                new = candidate
        out[key] = new
    return out


def _unwrap(key: str, model: set[str], lengths: set[int], taken: set[str]) -> str | None:
    """The model key ``key`` feeds once its leading wrapper prefixes are stripped (the fewest
    that match), or once one is added; None if none is free.

    Linear in the key's length, whatever the file: the prefixes are skipped by position, and a
    candidate is made (a copy of the key's tail) only when its length is that of a model key,
    which happens at most once per model key length.
    """
    pos = 0
    while True:
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix, pos):
                pos += len(prefix)
                if len(key) - pos in lengths and _free(key[pos:], model, taken):
                    return key[pos:]
                break
        else:
            break
    for prefix in WRAPPER_PREFIXES:
        for start in dict.fromkeys((0, pos)):  # the key as it is, and stripped of every prefix
            if len(prefix) + len(key) - start in lengths:
                candidate = prefix + key[start:]
                if _free(candidate, model, taken):
                    return candidate
    return None


def _free(candidate: str, model: set[str], taken: set[str]) -> bool:
    return candidate in model and candidate not in taken
