"""Self-describing checkpoints: a converted model records how it was converted, so it can be rebuilt.

Every converter (``band_limit``, ``slice_generate``, ...) ends with :func:`record_conversion`, which
appends a JSON-able spec ``{"technique": ..., "options": {...}}`` to the converted module. Callbacks
write the list into the checkpoint under :data:`CHECKPOINT_KEY`; :func:`restore_conversions` replays it
on a freshly built model before its weights are loaded. LightningModules get this for
``load_from_checkpoint`` by inheriting :class:`ConversionCheckpointMixin` (the recipes do).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = [
    "CHECKPOINT_KEY",
    "CONVERTERS",
    "ConversionCheckpointMixin",
    "conversions_of",
    "forget_conversion",
    "record_conversion",
    "restore_conversions",
]

CHECKPOINT_KEY = "memcomp_conversions"
_ATTR = "_memcomp_conversions"

# technique name -> "module:function(model, **options)"
CONVERTERS: dict[str, str] = {
    "band_limit": "lightning_memcomp.bandlimit:band_limit",
    "slice_generate": "lightning_memcomp.csg:slice_generate",
}


def conversions_of(model: nn.Module) -> list[dict[str, Any]]:
    """The conversion specs recorded on ``model``, in the order they were applied."""
    return copy.deepcopy(model.__dict__.get(_ATTR, []))


def record_conversion(model: nn.Module, technique: str, options: Mapping[str, Any]) -> None:
    """Remember that ``technique`` was applied to ``model`` with ``options`` (JSON-able values only).

    Converters pass ``modules`` as the explicit list of qualified names they converted, so a replay
    converts exactly the same layers whatever selection (even a callable) was used originally.
    """
    if technique not in CONVERTERS:
        raise ValueError(f"technique={technique!r} is not a registered converter; allowed: {', '.join(CONVERTERS)}")
    specs = model.__dict__.setdefault(_ATTR, [])
    spec = {"technique": technique, "options": dict(options)}
    if spec not in specs:
        specs.append(spec)


def forget_conversion(model: nn.Module, technique: str) -> None:
    """Drop the recorded specs of ``technique`` (an export that undid the conversion calls this)."""
    specs = model.__dict__.get(_ATTR)
    if specs:
        specs[:] = [s for s in specs if s.get("technique") != technique]


def restore_conversions(model: nn.Module, source: Mapping[str, Any] | list[dict[str, Any]]) -> list[Any]:
    """Re-apply the conversions of a checkpoint dict (or a list of specs) to ``model``; returns the reports.

    Idempotent: a conversion already recorded on ``model`` is not applied again.
    """
    specs = source.get(CHECKPOINT_KEY, []) if isinstance(source, Mapping) else source
    done = model.__dict__.get(_ATTR, [])
    reports = []
    for spec in specs:
        if spec in done:
            continue
        technique = spec["technique"]
        if technique not in CONVERTERS:
            raise ValueError(
                f"checkpoint names conversion {technique!r}, which this version does not know; "
                f"known: {', '.join(CONVERTERS)}"
            )
        module_name, _, fn_name = CONVERTERS[technique].partition(":")
        convert = getattr(importlib.import_module(module_name), fn_name)
        reports.append(convert(model, **spec["options"]))
    return reports


class ConversionCheckpointMixin:
    """LightningModule mixin: save conversion specs with the weights and rebuild them when loading.

    With it, ``MyModule.load_from_checkpoint(path)`` rebuilds band-limited or slice-generated layers
    before loading their weights, even without the callback that converted them.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # type: ignore[override]
        specs = conversions_of(self)  # type: ignore[arg-type]
        if specs:
            checkpoint[CHECKPOINT_KEY] = specs
        super_hook = getattr(super(), "on_save_checkpoint", None)
        if super_hook is not None:
            super_hook(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # type: ignore[override]
        restore_conversions(self, checkpoint)  # type: ignore[arg-type]
        super_hook = getattr(super(), "on_load_checkpoint", None)
        if super_hook is not None:
            super_hook(checkpoint)
