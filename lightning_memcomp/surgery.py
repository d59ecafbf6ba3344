"""Module selection and in-place replacement, shared by every converter.

Selection (the ``modules=`` option everywhere in this package) accepts:

* ``None``: the technique's default selection;
* a string: matches a module whose class name (or a base class name) equals it, or whose qualified
  name matches it as a glob (``"layer1.*"``, ``"encoder.*"``, ``"fc"``);
* a module class: ``isinstance`` match;
* a list/tuple of the above: any of them;
* a callable ``(module, qualified_name) -> bool``.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from torch import nn

__all__ = [
    "ConversionReport",
    "ConvertedLayer",
    "ModuleSelection",
    "SkippedLayer",
    "Unsupported",
    "count_parameters",
    "module_filter",
    "replace_modules",
    "select_modules",
]

Filter = Callable[[nn.Module, str], bool]
ModuleSelection = Union[None, str, type, Filter, Sequence[Union[str, type]]]


class Unsupported(Exception):
    """Raised by a factory to skip a layer; the message is the reason shown in the report."""


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def module_filter(modules: ModuleSelection, default: Filter | None = None, *, option: str = "modules") -> Filter:
    """Turn a ``modules=`` option into a predicate ``(module, qualified_name) -> bool``."""
    if modules is None:
        if default is None:
            return lambda module, name: True
        return default
    if callable(modules) and not isinstance(modules, type):
        return modules
    items: Iterable[Any] = [modules] if isinstance(modules, (str, type)) else modules
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{option}={modules!r} is not a valid selection; allowed: None, a class name or qualified-name "
            "glob, a module class, a list of those, or a callable (module, name) -> bool"
        ) from None
    strings: list[str] = []
    types: list[type] = []
    for item in items:
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError(
                f"{option} entry {item!r} is not a class name, a glob on qualified names or an nn.Module "
                "subclass"
            )
    types_t = tuple(types)

    def predicate(module: nn.Module, name: str) -> bool:
        if types_t and isinstance(module, types_t):
            return True
        if strings:
            names = _class_names(module)
            return any(s in names or fnmatch.fnmatchcase(name, s) for s in strings)
        return False

    return predicate


def select_modules(
    model: nn.Module, modules: ModuleSelection, default: Filter | None = None, *, option: str = "modules"
) -> list[tuple[str, nn.Module]]:
    """The ``(qualified_name, module)`` pairs of ``model`` that the selection picks, in order."""
    predicate = module_filter(modules, default, option=option)
    return [(name, m) for name, m in model.named_modules() if predicate(m, name)]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of distinct parameters (shared ones once), only those requiring grad by default."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass
class ConvertedLayer:
    name: str
    original: str
    replacement: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkippedLayer:
    name: str
    type: str
    reason: str


@dataclass
class ConversionReport:
    """What a converter did: converted layers, skipped layers and why, parameter figures."""

    technique: str
    converted: list[ConvertedLayer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    already_converted: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def param_ratio(self) -> float:
        """Trainable parameters before over after (2.0 means half as many)."""
        return self.params_before / self.params_after if self.params_after else float("inf")

    def __str__(self) -> str:
        lines = [
            f"{self.technique}: converted {len(self.converted)} layer(s), skipped {len(self.skipped)}, "
            f"already converted {len(self.already_converted)}; trainable parameters "
            f"{self.params_before:,} -> {self.params_after:,} ({self.param_ratio:.2f}x)"
        ]
        for c in self.converted:
            detail = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.details.items())
            lines.append(f"  + {c.name}: {c.original} -> {c.replacement}" + (f" ({detail})" if detail else ""))
        for s in self.skipped:
            lines.append(f"  - {s.name}: {s.type} skipped: {s.reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "technique": self.technique,
            "converted": [vars(c) for c in self.converted],
            "skipped": [vars(s) for s in self.skipped],
            "already_converted": list(self.already_converted),
            "params_before": self.params_before,
            "params_after": self.params_after,
            **self.extra,
        }


def _swap(parent: nn.Module, child_name: str, old: nn.Module, new: nn.Module) -> None:
    # keep the user's hooks and the train/eval mode, as torch.ao's swap_module does
    for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks"):
        hooks = getattr(old, attr, None)
        if hooks:
            getattr(new, attr).update(hooks)
    new.train(old.training)
    setattr(parent, child_name, new)


def replace_modules(
    model: nn.Module,
    technique: str,
    select: Filter,
    factory: Callable[[nn.Module, str], nn.Module],
    *,
    converted_types: type | tuple[type, ...] = (),
    details: Callable[[nn.Module], dict[str, Any]] | None = None,
    warn: bool = True,
) -> ConversionReport:
    """Replace, in place, every selected module by ``factory(module, name)``.

    ``factory`` raises :class:`Unsupported` to skip a layer (listed in the report, with a warning).
    Modules that are already instances of ``converted_types`` are left alone (conversion is
    idempotent), and nothing below a replaced module is visited. A module shared under several names
    is converted once and the replacement is shared the same way. Converting nothing warns.
    """
    report = ConversionReport(technique=technique, params_before=count_parameters(model))
    done: dict[int, nn.Module] = {}
    replaced_prefixes: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if any(name.startswith(p + ".") for p in replaced_prefixes):
            continue
        if converted_types and isinstance(module, converted_types):
            report.already_converted.append(name)
            replaced_prefixes.append(name)
            continue
        if not select(module, name):
            continue
        if name == "":
            report.skipped.append(SkippedLayer(name, type(module).__name__, "the root module cannot be replaced in place"))
            continue
        new = done.get(id(module))
        if new is None:
            try:
                new = factory(module, name)
            except Unsupported as err:
                report.skipped.append(SkippedLayer(name, type(module).__name__, str(err)))
                if warn:
                    warnings.warn(f"{technique}: skipping {name} ({type(module).__name__}): {err}", stacklevel=3)
                continue
            done[id(module)] = new
        parent_name, _, child_name = name.rpartition(".")
        _swap(model.get_submodule(parent_name), child_name, module, new)
        replaced_prefixes.append(name)
        report.converted.append(
            ConvertedLayer(name, type(module).__name__, type(new).__name__, details(new) if details else {})
        )
    report.params_after = count_parameters(model)
    if warn and not report.converted and not report.already_converted:
        warnings.warn(
            f"{technique}: no module was converted (selection matched nothing convertible; "
            f"{len(report.skipped)} skipped)",
            stacklevel=3,
        )
    return report
