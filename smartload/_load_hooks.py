"""Load-state-dict pre-hooks, taken into the plan.

Before copying, ``Module.load_state_dict`` runs each module's pre-hooks
(``register_load_state_dict_pre_hook``, ``_register_load_state_dict_pre_hook``) on the module's
slice of the state dict, and a hook may rename keys (the old ``weight_norm``'s ``weight_g`` and
``weight_v`` become ``parametrizations.weight.original0/1``) or compute new tensors (spectral
norm's old-version conversion). smartload runs the same hooks in torch's order, first over
stand-ins of the checkpoint's tensors (meta tensors with their shapes and dtypes: no byte is read):

- a stand-in that comes out unchanged under another name is a *rename*, planned as a copy;
- anything else (a new tensor, or a stand-in changed in place) is *computed*: the plan takes its
  shape and dtype, and :func:`compute` runs the hooks again over the real tensors when the plan is
  applied, before anything in the model is written.

A hook that cannot run on meta tensors (it reads values) is planned over the real tensors instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._normalize import leaf_dtype, leaf_shape
from ._tensors import torch_dtype
from .errors import IncompatibleCheckpointError

__all__ = ["Computed", "HookedKeys", "ModuleRoles", "compute", "module_roles", "translate"]

Reader = Callable[[str], torch.Tensor]  # checkpoint key → its real tensor


@dataclass(frozen=True)
class Computed:
    """A value a pre-hook made: its shape and dtype (``value``, meta) and where it came from."""

    value: torch.Tensor
    inputs: tuple[str, ...]  # checkpoint keys whose tensors the hook took away
    hooks: str  # "Conv1d pre-hook _weight_norm_compat_hook at 'conv'"
    root: str  # the hooked subtree to run again when applying (its prefix)


@dataclass(frozen=True)
class HookedKeys:
    """What the pre-hooks do to the checkpoint's keys."""

    renamed: dict[str, str]  # checkpoint key → the model key it feeds after the hooks
    computed: dict[str, Computed]  # model key → a value a hook computed
    hooks: dict[str, str]  # checkpoint key → the hooks that renamed or consumed it
    roots: dict[str, dict[str, str]]  # subtree prefix → {key before the hooks: checkpoint key}


@dataclass(frozen=True)
class ModuleRoles:
    """The modules whose loading is more than a copy by name, found in one walk of the model."""

    hooked: dict[str, torch.nn.Module]  # top-most modules with load pre-hooks, by prefix "a.b."
    loaders: dict[str, torch.nn.Module]  # own _load_from_state_dict or extra state, by name


def module_roles(model: torch.nn.Module) -> ModuleRoles:
    """Pre-hooked subtrees (the plan runs their hooks) and modules whose values must go through
    their own ``_load_from_state_dict`` or ``set_extra_state`` (a copy into what
    ``get_extra_state`` returned would be lost).

    BatchNorm's override only fills in ``num_batches_tracked`` for very old checkpoints, which a
    copy by name already handles (the key is then "missing" and keeps the model's value).
    """
    base = torch.nn.Module
    plain = (base._load_from_state_dict, torch.nn.modules.batchnorm._NormBase._load_from_state_dict)
    hooked: dict[str, torch.nn.Module] = {}
    loaders: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if module._load_state_dict_pre_hooks and not any(prefix.startswith(r) for r in hooked):
            hooked[prefix] = module
        cls = type(module)
        if (
            cls._load_from_state_dict not in plain
            or cls.set_extra_state is not base.set_extra_state
        ):
            loaders[name] = module
    return ModuleRoles(hooked, loaders)


def translate(
    roots: Mapping[str, torch.nn.Module],
    matched: Mapping[str, str],
    leaves: Mapping[str, Any],
    read: Reader,
    *,
    in_file: Mapping[str, str] | None = None,
) -> HookedKeys | None:
    """Run the load pre-hooks of the subtrees at ``roots`` over the checkpoint's keys.

    ``matched`` maps checkpoint keys to the model-namespace keys torch would see (after renames
    and prefix handling), ``leaves`` gives each checkpoint key's record, ``in_file`` the name
    in the file of keys an adapter renamed (``roots`` holds those: applying reads by them).
    None when no module has pre-hooks.
    """
    if not roots:
        return None
    out = HookedKeys({}, {}, {}, {})
    by_name: dict[str, str] = {}
    for old, new in matched.items():
        by_name.setdefault(new, old)
    for prefix, root in roots.items():
        names = {k: v for k, v in by_name.items() if k.startswith(prefix)}
        if not names:
            continue
        out.roots[prefix] = {k: (in_file or {}).get(ck, ck) for k, ck in names.items()}
        try:
            run = _Run.over({k: _meta(leaves[ck]) for k, ck in names.items()}, root, prefix)
        except _HookFailed:  # the hook reads values: plan over the real tensors
            run = _Run.over({k: read(ck) for k, ck in names.items()}, root, prefix)
        except _HookRefused as refused:  # the hook said no: no need to read anything
            raise IncompatibleCheckpointError([], str(refused)) from None
        run.classify(names, prefix, out)
    return out


def compute(
    model: torch.nn.Module, root: str, names: Mapping[str, str], read: Reader
) -> dict[str, torch.Tensor]:
    """Run the hooks of the subtree at ``root`` over the real tensors (``names``: key before the
    hooks → checkpoint key): the value each module's own key gets, as ``load_state_dict`` would
    copy it."""
    module = model.get_submodule(root[:-1]) if root else model
    return _Run.over({k: read(ck) for k, ck in names.items()}, module, root).values


class _HookRefused(Exception):
    """A hook reported an error (``error_msgs``): the model refuses the checkpoint."""


class _HookFailed(IncompatibleCheckpointError):
    """A hook raised: on meta stand-ins it may only need values, so the plan tries the real
    tensors; raised from those, it is the model refusing the checkpoint."""

    def __init__(self, message: str) -> None:
        super().__init__([], message)


class _Run:
    """torch's ``load_state_dict`` recursion over one subtree, without the copies: each module's
    pre-hooks see its slice of the state dict (a new dict per child, as torch makes it)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.origin = {id(v): (k, v._version) for k, v in state.items()}
        self.values: dict[str, torch.Tensor] = {}  # each module's own keys after the hooks
        # key before the hooks → the hooks that took it away or renamed it
        self.consumed: dict[str, str] = {}
        self.made: dict[str, tuple[str, list[str]]] = {}  # computed key → (hooks, inputs)

    @classmethod
    def over(cls, state: dict[str, torch.Tensor], root: torch.nn.Module, prefix: str) -> _Run:
        """Run the hooks of the subtree at ``prefix`` over ``state``. A hook that fails is the
        model refusing the checkpoint, as ``load_state_dict`` would."""
        run = cls(state)
        try:
            run.visit(root, dict(state), prefix)
        except _HookRefused as refused:
            raise IncompatibleCheckpointError([], str(refused)) from None
        except Exception as exc:
            raise _HookFailed(
                f"a load pre-hook under {prefix[:-1] or 'the model'!r} failed on this checkpoint "
                f"({type(exc).__name__}: {exc}); load_state_dict would fail too. Nothing was loaded",
            ) from exc
        return run

    def original(self, value: torch.Tensor) -> str | None:
        """The key before the hooks of an untouched stand-in, else None."""
        found = self.origin.get(id(value))
        return found[0] if found is not None and found[1] == value._version else None

    def visit(self, module: torch.nn.Module, local: dict[str, torch.Tensor], prefix: str) -> None:
        if module._load_state_dict_pre_hooks:
            before = {id(v): k for k, v in local.items()}
            errors: list[str] = []
            for hook in module._load_state_dict_pre_hooks.values():
                hook(local, prefix, {}, True, [], [], errors)
            if errors:
                raise _HookRefused(
                    f"a load pre-hook of {prefix[:-1] or 'the model'!r} refused: {errors[0]}"
                )
            described = _describe(module, prefix)
            after = {id(v): k for k, v in local.items()}
            taken = [k for i, k in before.items() if i not in after]
            for i, key in before.items():
                if after.get(i) != key:  # taken away, or renamed
                    self.consumed.setdefault(key, described)
            for key, value in local.items():
                if self.original(value) is None and key not in self.made:
                    self.made[key] = (described, taken)
        skip = module._non_persistent_buffers_set
        own = [n for n, p in module._parameters.items() if p is not None]
        own += [n for n, b in module._buffers.items() if b is not None and n not in skip]
        for name in own:
            if prefix + name in local:
                self.values[prefix + name] = local[prefix + name]
        for name, child in module._modules.items():
            if child is not None:
                sub = f"{prefix}{name}."
                self.visit(child, {k: v for k, v in local.items() if k.startswith(sub)}, sub)

    def classify(self, names: Mapping[str, str], root: str, out: HookedKeys) -> None:
        for key, described in self.consumed.items():
            if key in names:
                out.hooks[names[key]] = described
        for key, value in self.values.items():
            old = self.original(value)
            if old is not None:
                if old != key:
                    out.renamed[names[old]] = key
                continue
            described, inputs = self.made.get(key, ("a load pre-hook", []))
            out.computed[key] = Computed(
                _as_meta(value), tuple(names[k] for k in inputs if k in names), described, root
            )


def _meta(leaf: Any) -> torch.Tensor:
    return torch.empty(leaf_shape(leaf), dtype=torch_dtype(leaf_dtype(leaf)), device="meta")


def _as_meta(value: torch.Tensor) -> torch.Tensor:
    return value if value.is_meta else torch.empty_like(value, device="meta")


def _describe(module: torch.nn.Module, prefix: str) -> str:
    names = ", ".join(_hook_name(h) for h in module._load_state_dict_pre_hooks.values())
    return f"{type(module).__name__} pre-hook {names} at {prefix[:-1] or '(root)'!r}"


def _hook_name(hook: Any) -> str:
    fn = getattr(hook, "hook", hook)  # torch wraps hooks registered with the module argument
    fn = getattr(fn, "func", fn)  # functools.partial
    name = str(getattr(fn, "__qualname__", None) or type(fn).__name__)
    return name.rpartition("<locals>.")[2]
