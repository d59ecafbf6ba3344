"""The methods of the benchmark: a technique and its setting (``quant:4``, ``bandlimit:50``), parsed and listed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["ALLOWED_BITS", "CODEC_OF", "METHOD_KINDS", "Method", "default_methods", "method_help", "parse_floats",
           "parse_method", "parse_methods"]

#: kind -> (what its value means or None, description template, family)
METHOD_KINDS: dict[str, tuple[str | None, str, str]] = {
    "baseline": (None, "fp32, nothing changed", "baseline"),
    "bf16": (None, "bf16 autocast (torch.autocast)", "alternative"),
    "checkpoint": (None, "activation checkpointing over each block (torch.utils.checkpoint)", "alternative"),
    "quant": ("bits", "{v}-bit activation quantization", "activation compression"),
    "blpa": ("bits", "BLPA {v}-bit (Chakrabarti & Moseley 2019)", "activation compression"),
    "wavelet": ("lambda", "Haar wavelet top-k, lambda={v} (Vu et al. 2024)", "activation compression"),
    "dct": ("lambda", "block DCT top-k, lambda={v} (Vu et al. 2024)", "activation compression"),
    "threshold": ("lambda", "top-k thresholding, lambda={v} (Vu et al. 2024)", "activation compression"),
    "bandlimit": ("rate", "band-limited FFT conv, compress_rate={v}% (Dziedzic et al. 2019)", "band-limit"),
    "csg": (None, "conv slice generator (Omidvar et al. 2021)", "slice generator"),
    "bcsg": (None, "binary conv slice generator (Omidvar et al. 2021)", "slice generator"),
    "floor": ("bits", "memory floor of a {v}-bit codec (stand-in: holds the codes, decodes to zeros; "
                      "no real gradients)", "reference"),
}
ALLOWED_BITS = (1, 2, 4, 8)
CODEC_OF = {"quant": "quant", "blpa": "blpa", "wavelet": "wavelet", "dct": "dct", "threshold": "threshold"}


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: a technique kind and its setting (``quant:4``, ``bandlimit:50``)."""

    kind: str
    value: float | None = None

    @property
    def name(self) -> str:
        if self.value is None:
            return self.kind
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.kind}:{v}"

    @property
    def family(self) -> str:
        return METHOD_KINDS[self.kind][2]

    @property
    def description(self) -> str:
        v = None if self.value is None else (int(self.value) if float(self.value).is_integer() else self.value)
        return METHOD_KINDS[self.kind][1].format(v=v)


def method_help() -> str:
    """What --methods accepts, in words."""
    return (
        "baseline, bf16, checkpoint, quant:B, blpa:B (B in 1, 2, 4, 8), wavelet:L, dct:L, threshold:L "
        "(L = compression ratio lambda >= 1), bandlimit:R (R = percent of the spectrum discarded, 0 <= R < 100), "
        "csg, bcsg, floor:B (the memory floor of any B-bit codec: a stand-in without real gradients)"
    )


def parse_method(spec: str) -> Method:
    """Parse ``"quant:4"``, ``"bandlimit:50"``, ``"checkpoint"``, ... into a :class:`Method`.

    Raises:
        ValueError: unknown kind, missing or unexpected value, or a value outside what the kind allows.
    """
    text = spec.strip()
    kind, sep, raw = text.partition(":")
    kind = kind.strip().lower()
    if kind not in METHOD_KINDS:
        raise ValueError(f"method {spec!r} is not known; allowed: {method_help()}")
    meaning = METHOD_KINDS[kind][0]
    if meaning is None:
        if sep:
            raise ValueError(f"method {spec!r}: {kind} takes no value; write {kind!r}")
        return Method(kind)
    if not sep or not raw.strip():
        raise ValueError(f"method {spec!r}: {kind} needs its {meaning}, e.g. '{kind}:{_EXAMPLE[kind]}'")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"method {spec!r}: {meaning}={raw!r} is not a number") from None
    if meaning == "bits" and value not in ALLOWED_BITS:
        raise ValueError(f"method {spec!r}: bits={raw} is not allowed; use one of 1, 2, 4, 8")
    if meaning == "lambda" and not (math.isfinite(value) and value >= 1):
        raise ValueError(f"method {spec!r}: lambda={raw} is not allowed; use a compression ratio >= 1")
    if meaning == "rate" and not 0 <= value < 100:
        raise ValueError(f"method {spec!r}: compress_rate={raw} is not allowed; use a percentage in [0, 100)")
    return Method(kind, value)


_EXAMPLE = {"floor": "2", "quant": "4", "blpa": "4", "wavelet": "10", "dct": "10", "threshold": "10", "bandlimit": "50"}


def default_methods(lambdas: Sequence[float] = (4, 10), rates: Sequence[float] = (50, 85)) -> list[Method]:
    """The full matrix: baseline, the two alternatives, every technique at the chosen settings."""
    specs = ["baseline", "bf16", "checkpoint", "quant:8", "quant:4", "quant:2", "blpa:4"]
    for codec in ("wavelet", "dct", "threshold"):
        specs += [f"{codec}:{lam:g}" for lam in lambdas]
    specs += [f"bandlimit:{rate:g}" for rate in rates]
    specs += ["csg"]
    return [parse_method(s) for s in specs]


def parse_methods(text: str, lambdas: Sequence[float] = (4, 10), rates: Sequence[float] = (50, 85)) -> list[Method]:
    """A comma-separated method list (``"all"`` for :func:`default_methods`); duplicates are dropped."""
    if text.strip().lower() == "all":
        return default_methods(lambdas, rates)
    methods: list[Method] = []
    for part in text.split(","):
        if part.strip():
            m = parse_method(part)
            if m not in methods:
                methods.append(m)
    if not methods:
        raise ValueError(f"--methods={text!r} names no method; allowed: all, or a comma-separated list of {method_help()}")
    return methods


def parse_floats(option: str, text: str, check: Callable[[float], bool], allowed: str) -> list[float]:
    """A comma-separated list of numbers for ``option``, each passing ``check`` (``allowed`` says which do)."""
    values = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"{option}={text!r}: {part.strip()!r} is not a number") from None
        if not check(v):
            raise ValueError(f"{option}={text!r}: {part.strip()} is not allowed; use {allowed}")
        values.append(v)
    if not values:
        raise ValueError(f"{option}={text!r} names no value; use a comma-separated list of {allowed}")
    return values

