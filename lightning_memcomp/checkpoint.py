"""Self-describing checkpoints: a converted model records how it was converted, so it can be rebuilt.

Every converter (``band_limit``, ``slice_generate``, ...) ends with :func:`record_conversion`, which appends a
JSON-able spec ``{"technique": ..., "options": {...}}`` to the converted model and gives it two state-dict hooks:
``state_dict()`` then holds the specs under :data:`RECORD_KEY` (``memcomp_conversions._extra_state``), so every
checkpoint of a converted model carries them, whoever saves it, and ``load_state_dict`` checks them against
the model's. The module tree is not changed (an ``nn.Sequential`` stays the same sequence). Callbacks and
:class:`ConversionCheckpointMixin` also write the list into Lightning checkpoints under :data:`CHECKPOINT_KEY`.

* :func:`load_converted` builds an unconverted model (or takes one), re-applies the recorded conversions and
  loads the weights: the way to load a converted checkpoint anywhere.
* Loading a converted state dict into a model converted differently fails with a
  :class:`ConversionMismatchError` naming both conversions (a band-limited model with other options only warns:
  the weights are the same tensors); loading one into an unconverted model fails on the unexpected key
  ``memcomp_conversions._extra_state`` (PyTorch's strict loading) instead of silently giving plain layers.
* :class:`ConversionCheckpointMixin` rebuilds the conversions in ``load_from_checkpoint``; when a ``Trainer``
  resumes training (``fit(ckpt_path=...)``) from a checkpoint whose conversions this run does not apply, it
  fails with a message naming both instead of rebuilding them silently.
"""

from __future__ import annotations

import copy
import importlib
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_KEY",
    "CONVERTERS",
    "RECORD_KEY",
    "ConversionCheckpointMixin",
    "ConversionMismatchError",
    "check_conversions",
    "conversions_in",
    "conversions_of",
    "forget_conversion",
    "load_converted",
    "record_conversion",
    "restore_conversions",
]

CHECKPOINT_KEY = "memcomp_conversions"
#: the state-dict entry (under the converted module's prefix) that records its conversions
RECORD_KEY = "memcomp_conversions._extra_state"
_ATTR = "_memcomp_conversions"
_HOOKED = "_memcomp_conversion_hooks"
_WARNED = "_memcomp_conversion_warned"

# technique name -> "module:function(model, **options)"
CONVERTERS: dict[str, str] = {
    "band_limit": "lightning_memcomp.bandlimit:band_limit",
    "slice_generate": "lightning_memcomp.csg:slice_generate",
}
#: how a run applies each technique (for messages)
_HOW = {
    "band_limit": "the BandLimiting callback (--technique bandlimit:R)",
    "slice_generate": "the ConvSliceGeneration callback (--technique csg)",
}
#: options of a technique that change the state dict's keys or shapes: a difference cannot load
_STRUCTURAL = {"slice_generate": ("slice_shape", "code_size", "binary", "modules")}


class ConversionMismatchError(RuntimeError):
    """A checkpoint's conversions and the model's (or the run's configuration) disagree."""


def describe(specs: Sequence[Mapping[str, Any]]) -> str:
    """``band_limit(compress_rate=50.0, fft_size='minimal'; 17 layers)``, or ``no conversion (plain layers)``."""
    if not specs:
        return "no conversion (plain layers)"
    parts = []
    for spec in specs:
        options = dict(spec.get("options", {}))
        layers = options.pop("modules", None)
        text = ", ".join(f"{k}={v!r}" for k, v in options.items() if v is not None and k != "init")
        if isinstance(layers, list):
            text += f"; {len(layers)} layer{'s' if len(layers) != 1 else ''}"
        parts.append(f"{spec.get('technique')}({text})")
    return " + ".join(parts)


def _save_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    specs = module.__dict__.get(_ATTR)
    if specs:
        state_dict[prefix + RECORD_KEY] = {"conversions": copy.deepcopy(specs)}


def _load_hook(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    # ``strict`` is always True here (load_state_dict filters missing/unexpected keys afterwards), so a
    # disagreement raises under strict=False too
    specs = module.__dict__.get(_ATTR) or []
    context = "load"
    key = prefix + RECORD_KEY
    if key in state_dict:
        value = state_dict.pop(key)  # load_state_dict works on a copy: the caller's dict is left alone
        saved = [dict(s) for s in value.get("conversions", [])] if isinstance(value, Mapping) else []
        if check_conversions(saved, specs, context=context, model=module):
            message = (
                f"the state dict was converted by {describe(saved)}, this model is not (it was exported or its "
                f"conversion forgotten); {_how_to_load(saved)}"
            )
            raise ConversionMismatchError(message)
    elif specs and not any(k.startswith(prefix + "memcomp_slice_generator.") for k in state_dict):
        # the state dict of an unconverted model (a slice-generated one saved before records existed has its
        # generator: let it load)
        check_conversions([], specs, context=context, model=module)


def _hook(model: nn.Module) -> None:
    if model.__dict__.get(_HOOKED):
        return
    model.register_state_dict_post_hook(_save_hook)
    model.register_load_state_dict_pre_hook(_load_hook)
    model.__dict__[_HOOKED] = True


def conversions_of(model: nn.Module) -> list[dict[str, Any]]:
    """The conversion specs recorded on ``model``, in the order they were applied."""
    return copy.deepcopy(model.__dict__.get(_ATTR, []))


def conversions_in(source: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversion specs of a Lightning checkpoint dict, a state dict (its ``memcomp_conversions`` record)
    or a list of specs."""
    if not isinstance(source, Mapping):
        return [dict(s) for s in source]
    if CHECKPOINT_KEY in source and not isinstance(source[CHECKPOINT_KEY], nn.Module):
        return [dict(s) for s in source[CHECKPOINT_KEY]]
    state = source.get("state_dict", source)
    if isinstance(state, Mapping):
        keys = sorted((k for k in state if isinstance(k, str) and (k == RECORD_KEY or k.endswith("." + RECORD_KEY))),
                      key=len)
        if keys and isinstance(state[keys[0]], Mapping):
            return [dict(s) for s in state[keys[0]].get("conversions", [])]
    return []


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
    _hook(model)


def forget_conversion(model: nn.Module, technique: str) -> None:
    """Drop the recorded specs of ``technique`` (an export that undid the conversion calls this); with none left
    the model's state dict is that of the unconverted architecture again."""
    specs = model.__dict__.get(_ATTR)
    if specs:
        specs[:] = [s for s in specs if s.get("technique") != technique]


def _how_to_load(saved: Sequence[Mapping[str, Any]]) -> str:
    if not saved:
        return "load it into the unconverted model, or convert after loading"
    hows = "; ".join(_HOW.get(str(s.get("technique")), str(s.get("technique"))) for s in saved)
    return (
        "load it with lightning_memcomp.load_converted(<model class or unconverted model>, <checkpoint path>), "
        f"or resume with the checkpoint's technique ({hows})"
    )


def check_conversions(
    saved: Sequence[Mapping[str, Any]],
    current: Sequence[Mapping[str, Any]],
    *,
    context: str = "load",
    model: nn.Module | None = None,
) -> bool:
    """Compare a checkpoint's conversions (``saved``) with a model's (``current``); raise, warn or pass.

    ``context``: ``"load"`` (``load_state_dict``, :func:`load_converted`), ``"resume"`` (a ``Trainer`` fitting
    from the checkpoint) or ``"evaluate"`` (a ``Trainer`` validating/testing/predicting from it). Returns whether
    ``saved`` should be rebuilt on the model (it is unconverted and the context allows it).

    Raises:
        ConversionMismatchError: other techniques (resuming a converted checkpoint without its technique or a
            plain one with a technique included), or slice shapes that cannot load; the message names both
            and how to load the checkpoint.
    """
    def fail(message: str, hard: bool = True) -> None:
        if hard:
            raise ConversionMismatchError(message)
        if model is not None:  # the same disagreement is told once per model (hooks and callbacks both check)
            told = model.__dict__.setdefault(_WARNED, set())
            if message in told:
                return
            told.add(message)
        warnings.warn(message, stacklevel=4)

    saved_t = [str(s.get("technique")) for s in saved]
    current_t = [str(s.get("technique")) for s in current]
    head = f"the checkpoint was converted by {describe(saved)}, this model by {describe(current)}"
    if not current:
        if not saved:
            return False
        if context == "resume":
            fail(
                f"{head}: resuming training from it with a configuration that applies none would rebuild "
                f"{', '.join(saved_t)} silently. Add {', '.join(_HOW.get(t, t) for t in saved_t)} to resume it, "
                "or start a new run from its weights with lightning_memcomp.load_converted"
            )
        if context == "evaluate":
            fail(f"{head}: the configuration applies none; rebuilding {', '.join(saved_t)} from the checkpoint",
                 hard=False)
        return True
    if not saved:
        if context == "resume":
            fail(f"{head}: resuming training from a plain checkpoint with {', '.join(current_t)} changes the "
                 "technique of the run; start a new run (load the weights, then convert) or resume without it")
        elif any(t in _STRUCTURAL for t in current_t):
            fail(f"{head}: its weights do not fit the converted layers. Load them before converting (slice_generate "
                 "with init='fit' starts from pretrained filters), or " + _how_to_load(saved))
        elif context == "evaluate":
            fail(f"{head}: evaluating plain weights with {', '.join(current_t)} applied", hard=False)
        return False
    if sorted(saved_t) != sorted(current_t):
        fail(f"{head}; {_how_to_load(saved)}")
        return False
    for technique in dict.fromkeys(saved_t):
        mine = [s["options"] for s in current if s.get("technique") == technique]
        theirs = [s["options"] for s in saved if s.get("technique") == technique]
        if mine == theirs:
            continue
        keys = _STRUCTURAL.get(technique, ())
        if any([o.get(k) for o in theirs] != [o.get(k) for o in mine] for k in keys):
            fail(f"{head}: the layers differ in {', '.join(keys)}; {_how_to_load(saved)}")
        elif technique == "band_limit":
            fail(
                f"the checkpoint was band-limited with {describe([s for s in saved if s['technique'] == technique])}, "
                f"this model with {describe([s for s in current if s['technique'] == technique])}; the weights load "
                "and the layers keep this model's options",
                hard=False,
            )
        else:
            fail(f"{head}; the layers keep this model's options", hard=False)
    return False


def restore_conversions(
    model: nn.Module, source: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, context: str = "load"
) -> list[Any]:
    """Re-apply the conversions of a checkpoint dict, a state dict or a list of specs to ``model``; returns the
    reports. A model already converted the same way is left alone; one converted otherwise is checked with
    :func:`check_conversions` (which raises or warns) and not converted again."""
    specs = conversions_in(source)
    current = conversions_of(model)
    if not check_conversions(specs, current, context=context, model=model):
        return []
    reports = []
    for spec in specs:
        technique = spec["technique"]
        if technique not in CONVERTERS:
            raise ValueError(
                f"checkpoint names conversion {technique!r}, which this version does not know; "
                f"known: {', '.join(CONVERTERS)}"
            )
        module_name, _, fn_name = CONVERTERS[technique].partition(":")
        convert = getattr(importlib.import_module(module_name), fn_name)
        options = dict(spec["options"])
        if technique == "band_limit":
            options.setdefault("on_larger", "ignore")  # the run that made the checkpoint was told already
        reports.append(convert(model, **options))
    return reports


def _trainer_context(module: Any) -> str | None:
    """``"resume"`` while a Trainer fits ``module``, ``"evaluate"`` while it validates/tests/predicts, else None."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return "resume" if fn == "fit" else "evaluate"


def check_resume(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """A callback's ``on_load_checkpoint``: the checkpoint's conversions against those this run applied."""
    context = _trainer_context(module) or "load"
    check_conversions(conversions_in(checkpoint), conversions_of(module), context=context, model=module)


def load_converted(
    model: nn.Module | type[nn.Module],
    checkpoint_path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    **init_kwargs: Any,
) -> nn.Module:
    """Load a checkpoint of a converted model: re-apply its recorded conversions, then load its weights.

    Args:
        model: an unconverted model instance, or its class (a ``LightningModule`` class is built from the
            checkpoint's ``hyper_parameters`` updated by ``init_kwargs``; another class from ``init_kwargs``).
        checkpoint_path: a Lightning checkpoint or a file of ``torch.save(model.state_dict())``. It is read with
            ``torch.load(..., weights_only=True)``: loading it runs no code from the file.
        map_location: passed to ``torch.load``.
        strict: passed to ``load_state_dict``.

    Returns:
        The model, converted as recorded (band-limited layers, slice-generated layers with the generator) and
        holding the checkpoint's weights. A ``LightningModule``'s ``on_load_checkpoint`` runs first, as in
        ``load_from_checkpoint``.

    Raises:
        ConversionMismatchError: the model is already converted otherwise.

    Example::

        model = load_converted(MyLitModule, "band_limited.ckpt")          # no callback needed
        model = load_converted(torchvision.models.resnet18(), "csg.ckpt")
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{os.fspath(checkpoint_path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    state = checkpoint.get("state_dict", checkpoint)
    if isinstance(model, type):
        kwargs = dict(init_kwargs)
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, Mapping) and hasattr(model, "load_from_checkpoint"):
            kwargs = {**{k: v for k, v in hparams.items() if not str(k).startswith("_")}, **kwargs}
        model = model(**kwargs)
    elif init_kwargs:
        raise TypeError(f"init arguments {sorted(init_kwargs)} need a model class, not an instance")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={model!r} is not an nn.Module or an nn.Module class")
    restore_conversions(model, checkpoint if CHECKPOINT_KEY in checkpoint else state)
    hook = getattr(model, "on_load_checkpoint", None)
    if callable(hook) and "state_dict" in checkpoint:
        hook(checkpoint)
    model.load_state_dict(state, strict=strict)
    return model


class ConversionCheckpointMixin:
    """LightningModule mixin: save conversion specs with the weights and rebuild them when loading.

    With it, ``MyModule.load_from_checkpoint(path)`` rebuilds band-limited or slice-generated layers before
    loading their weights, even without the callback that converted them. When a ``Trainer`` resumes training
    from a converted checkpoint with a configuration that does not apply its conversions, it raises
    :class:`ConversionMismatchError` naming both (validating or testing warns and rebuilds them).
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # type: ignore[override]
        specs = conversions_of(self)  # type: ignore[arg-type]
        if specs:
            checkpoint[CHECKPOINT_KEY] = specs
        super_hook = getattr(super(), "on_save_checkpoint", None)
        if super_hook is not None:
            super_hook(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # type: ignore[override]
        restore_conversions(self, checkpoint, context=_trainer_context(self) or "load")  # type: ignore[arg-type]
        super_hook = getattr(super(), "on_load_checkpoint", None)
        if super_hook is not None:
            super_hook(checkpoint)
