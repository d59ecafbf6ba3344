"""Techniques by name: ``quant:4``, ``dct:10``, ``csg+quant:4``, ... as Lightning callbacks, and back.

The same method specs as ``memcomp bench`` (:mod:`lightning_memcomp.bench.methods`), joined with ``+``.
:func:`parse_technique` turns a spec into the callbacks (as LightningCLI config entries) and the precision
that run it; :func:`technique_of` reads a run's saved config and names its technique;
:func:`apply_technique` replaces the technique callbacks of a config. ``memcomp fit --technique`` and
``memcomp compare`` are built on these.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_memcomp.bench.methods import CODEC_OF, Method, method_help, parse_method

__all__ = [
    "TECHNIQUE_CALLBACKS",
    "Technique",
    "apply_technique",
    "parse_technique",
    "run_name",
    "technique_help",
    "technique_of",
]

#: the callbacks a technique consists of (short class names); ``--technique`` replaces exactly these
TECHNIQUE_CALLBACKS = ("ActivationCompression", "BandLimiting", "ConvSliceGeneration", "ActivationCheckpointing")
_CLASS_PATH = {name: f"lightning_memcomp.{name}" for name in TECHNIQUE_CALLBACKS}
_TRAINABLE = ("baseline", "bf16", "checkpoint", "quant", "blpa", "wavelet", "dct", "threshold", "bandlimit", "csg",
              "bcsg")
#: the technique part of the shipped configs' names (``digits_quant4``): the run name keeps the dataset part
_CONFIG_TECHNIQUES = ("baseline", "bandlimit", "csg", "blpa4", "quant2", "quant4", "wavelet", "dct", "threshold",
                      "combined")


def technique_help() -> str:
    """What ``--technique`` accepts, in words."""
    return (
        "baseline, bf16, checkpoint, quant:B, blpa:B (B in 1, 2, 4, 8), wavelet:L, dct:L, threshold:L (L = "
        "compression ratio >= 1), bandlimit:R (R = percent of the spectrum discarded, 0 <= R < 100), csg, bcsg, "
        "or a combination joined with '+' (e.g. csg+quant:4, checkpoint+bf16); at most one activation codec"
    )


@dataclass(frozen=True)
class Technique:
    """A parsed technique: its methods, the callbacks (LightningCLI config entries) and precision that run it."""

    spec: str
    methods: tuple[Method, ...]
    callbacks: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    precision: str | None = None

    @property
    def slug(self) -> str:
        """The spec as a file/run name: ``csg+quant:4`` -> ``csg_quant4``."""
        return self.spec.replace(":", "").replace("+", "_").replace(".", "p")


def _callback(method: Method) -> dict[str, Any]:
    value = None if method.value is None else (int(method.value) if float(method.value).is_integer() else method.value)
    if method.kind in CODEC_OF:
        entry: dict[str, Any] = {"class_path": _CLASS_PATH["ActivationCompression"],
                                 "init_args": {"codec": CODEC_OF[method.kind]}}
        if method.kind in ("quant", "blpa"):
            entry["init_args"]["bits"] = value
        else:
            entry["dict_kwargs"] = {"compression_ratio": value}
        return entry
    if method.kind == "bandlimit":
        return {"class_path": _CLASS_PATH["BandLimiting"], "init_args": {"compress_rate": value}}
    if method.kind in ("csg", "bcsg"):
        return {"class_path": _CLASS_PATH["ConvSliceGeneration"], "init_args": {"binary": method.kind == "bcsg"}}
    if method.kind == "checkpoint":
        return {"class_path": _CLASS_PATH["ActivationCheckpointing"], "init_args": {}}
    raise AssertionError(method.kind)  # pragma: no cover - parse_technique filters the kinds


def parse_technique(spec: str) -> Technique:
    """Parse ``"quant:4"``, ``"csg+quant:4"``, ``"baseline"``, ... into a :class:`Technique`.

    Raises:
        ValueError: an unknown or malformed method, ``floor`` (a benchmark stand-in without real gradients),
            a method given twice, ``baseline`` combined with something, or two activation codecs (the
            message names ``--technique``, the value and what is allowed).
    """
    text = str(spec).strip()
    parts = [p.strip() for p in text.split("+")]
    if not text or not all(parts):
        raise ValueError(f"--technique={spec!r} is not allowed; use {technique_help()}")
    methods: list[Method] = []
    for part in parts:
        try:
            method = parse_method(part)
        except ValueError as err:
            reason = str(err).replace(f"method {part!r}: ", "").replace(f"method {part!r} ", f"{part!r} ")
            raise ValueError(f"--technique={spec!r}: {reason}".replace(method_help(), technique_help())) from None
        if method.kind not in _TRAINABLE:
            raise ValueError(f"--technique={spec!r}: {method.kind} is a benchmark stand-in without real gradients, "
                             f"not a training technique; allowed: {technique_help()}")
        if any(m.kind == method.kind for m in methods):
            raise ValueError(f"--technique={spec!r} names {method.kind} twice; give it once")
        methods.append(method)
    if len(methods) > 1 and any(m.kind == "baseline" for m in methods):
        raise ValueError(f"--technique={spec!r}: baseline means no technique and combines with nothing")
    codecs = [m.name for m in methods if m.kind in CODEC_OF]
    if len(codecs) > 1:
        raise ValueError(f"--technique={spec!r} names {len(codecs)} activation codecs ({', '.join(codecs)}); "
                         "saved-tensor engines do not nest, so use one per run")
    if methods[0].kind == "baseline":
        return Technique("baseline", tuple(methods))
    callbacks = tuple(_callback(m) for m in methods if m.kind != "bf16")
    precision = "bf16-mixed" if any(m.kind == "bf16" for m in methods) else None
    return Technique("+".join(m.name for m in methods), tuple(methods), callbacks, precision)


def _short(class_path: Any) -> str:
    return str(class_path or "").rsplit(".", 1)[-1]


def _class_of(entry: Any) -> str:
    return _short(entry if isinstance(entry, str) else _get(entry, "class_path"))


def _get(entry: Any, key: str) -> Any:
    if isinstance(entry, Mapping):
        return entry.get(key)
    return getattr(entry, key, None)


def _args(entry: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(entry, str):
        return out
    for key in ("init_args", "dict_kwargs"):
        value = _get(entry, key)
        if value is None:
            continue
        items = value.items() if isinstance(value, Mapping) else vars(value).items()
        out.update({k: v for k, v in items if v is not None})
    return out


def _default(class_name: str, option: str) -> Any:
    try:
        import lightning_memcomp

        cls = getattr(lightning_memcomp, class_name)
        return inspect.signature(cls).parameters[option].default
    except (AttributeError, KeyError, ImportError, TypeError, ValueError):
        return None


def _codec_default(codec: str, option: str) -> Any:
    """The default of ``option`` in codec ``codec``'s signature (``None`` for an unknown codec or option)."""
    from lightning_memcomp.compression.registry import CODECS

    if codec not in CODECS:
        return None
    module, _, name = CODECS[codec].partition(":")
    try:
        import importlib

        default = inspect.signature(getattr(importlib.import_module(module), name)).parameters[option].default
    except (KeyError, ImportError, AttributeError, ValueError):
        return None
    return None if default is inspect.Parameter.empty else default


def _fmt(value: Any) -> str:
    return f"{float(value):g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{value}"


def _codec_spec(args: Mapping[str, Any], owner: str) -> str:
    options = {**dict(args.get("codec_options") or {}), **args}
    codec = str(options.get("codec") or _default(owner, "codec") or "quant")
    option = "bits" if codec in ("quant", "blpa") else "compression_ratio"
    value = options.get(option)
    value = _codec_default(codec, option) if value is None else value
    return f"{codec}:{_fmt(value)}" if value is not None else codec


def _band_spec(args: Mapping[str, Any]) -> str:
    rate, energy = args.get("compress_rate"), args.get("preserve_energy")
    if rate is None and energy is not None:
        return f"bandlimit(energy {_fmt(energy)}%)"
    return f"bandlimit:{_fmt(50 if rate is None else rate)}"  # 50: BandLimiting's default


def technique_of(config: Mapping[str, Any]) -> str:
    """Name the technique of a LightningCLI config (a parsed ``config.yaml`` or a subcommand's config).

    The config's own ``technique`` entry when set (``memcomp fit --technique``); otherwise derived from its
    callbacks, strategy and precision: ``quant:4``, ``csg+quant:4``, ``bandlimit:50``, ``quant:4 (strategy)``,
    ``bf16``, ``checkpoint``; ``baseline`` when it has none of them. Settings a config leaves out are the
    defaults of the codec or callback (``ActivationCompression(codec="dct")`` is ``dct:10``).
    """
    given = config.get("technique")
    if given:
        return str(given)
    trainer = config.get("trainer")
    trainer = trainer if isinstance(trainer, Mapping) else {}
    parts: list[str] = []
    callbacks = trainer.get("callbacks") or []
    if isinstance(callbacks, (str, Mapping)) or not isinstance(callbacks, Sequence):
        callbacks = [callbacks]
    order = {"ActivationCheckpointing": 0, "ConvSliceGeneration": 1, "BandLimiting": 2, "ActivationCompression": 3}
    for entry in sorted(callbacks, key=lambda e: order.get(_class_of(e), 9)):
        name, args = _class_of(entry), _args(entry)
        if name == "ActivationCompression":
            parts.append(_codec_spec(args, name))
        elif name == "BandLimiting":
            parts.append(_band_spec(args))
        elif name == "ConvSliceGeneration":
            parts.append("bcsg" if args.get("binary") else "csg")
        elif name == "ActivationCheckpointing":
            parts.append("checkpoint")
    strategy = trainer.get("strategy")
    strategy_name = _short(_get(strategy, "class_path")) if not isinstance(strategy, str) else strategy
    if strategy_name in ("memcomp", "ddp_memcomp", "MemCompSingleDeviceStrategy", "DDPMemCompStrategy"):
        owner = "DDPMemCompStrategy" if "ddp" in strategy_name.lower() else "MemCompSingleDeviceStrategy"
        args = _args(strategy) if not isinstance(strategy, str) else {}
        parts.append(f"{_codec_spec(args, owner)} (strategy)")
    precision = str(trainer.get("precision") or "")
    if precision.startswith("bf16"):
        parts.append("bf16")
    elif precision in ("16", "16-mixed", "16-true"):
        parts.append("fp16")
    return "+".join(parts) if parts else "baseline"


def run_name(name: str, technique: Technique) -> str:
    """The logger's run name for ``technique``: the config's technique part replaced (``digits_baseline`` ->
    ``digits_quant4``), or the technique appended to a name of the user's own (``myrun`` -> ``myrun_quant4``)."""
    stem, sep, last = name.rpartition("_")
    if sep and last in _CONFIG_TECHNIQUES:
        return f"{stem}_{technique.slug}"
    return f"{name}_{technique.slug}" if name else technique.slug


#: options of a technique callback that belong to its old setting, dropped when the technique changes it
_SETTING_OPTIONS = {
    "ActivationCompression": ("codec", "bits"),
    "BandLimiting": ("compress_rate", "preserve_energy"),
    "ConvSliceGeneration": ("binary", "init", "train_generator", "generator"),
    "ActivationCheckpointing": (),
}
#: ActivationCompression's options that hold for any codec (the rest are the codec's own)
_ENGINE_OPTIONS = ("modules", "min_bytes", "log_every_n_steps", "seed", "conv_chunk_bytes")


def _inherit(new: dict[str, Any], old: Any) -> dict[str, Any]:
    """``new`` with the options the config's callback of the same class set besides its technique setting
    (``modules``, ``code_size``, ``min_bytes``, ...); a codec's own options carry over only to the same codec."""
    name = _short(new["class_path"])
    old_init = _args({"init_args": _get(old, "init_args")})
    old_extra = _args({"dict_kwargs": _get(old, "dict_kwargs")})
    if name == "ActivationCompression" and old_init.get("codec") != new["init_args"].get("codec"):
        kept = {k: v for k, v in old_init.items() if k in _ENGINE_OPTIONS}
        old_extra = {}
    else:
        changed = any(old_init.get(k) != new["init_args"].get(k) for k in _SETTING_OPTIONS[name] if k != "codec")
        kept = {k: v for k, v in old_init.items() if not (changed and k in _SETTING_OPTIONS[name])}
    merged = {**new, "init_args": {**kept, **new["init_args"]}}
    if old_extra or new.get("dict_kwargs"):
        merged["dict_kwargs"] = {**old_extra, **new.get("dict_kwargs", {})}
    return merged


def apply_technique(callbacks: Sequence[Any], technique: Technique) -> list[Any]:
    """``callbacks`` (config entries) with every technique callback replaced by ``technique``'s.

    The technique's callbacks go first (conversions before compression), then the config's other callbacks
    (``MemoryMonitor``, checkpointing, ...) in their order. A technique callback the config already had
    lends its other options to the new one (``code_size`` of a CSG config, ``modules=`` selections,
    ``group_size`` of the same codec); its technique setting (codec and bits, compression rate, binary) is
    the new one.
    """
    previous = {_short(_get(cb, "class_path")): cb for cb in callbacks}
    kept = [cb for cb in callbacks if _short(_get(cb, "class_path")) not in TECHNIQUE_CALLBACKS]
    order = {name: i for i, name in enumerate(("ActivationCheckpointing", "ConvSliceGeneration", "BandLimiting",
                                               "ActivationCompression"))}
    added = []
    for entry in sorted(technique.callbacks, key=lambda e: order[_short(e["class_path"])]):
        entry = copy.deepcopy(entry)
        old = previous.get(_short(entry["class_path"]))
        added.append(_inherit(entry, old) if old is not None else entry)
    return [*added, *kept]
