"""Band-limited FFT convolutions (Dziedzic et al., "Band-limited Training and Inference for Convolutional
Neural Networks", ICML 2019): layers, the :func:`band_limit` converter and the :class:`BandLimiting` callback.

Only a low-frequency block of each convolution's input, filter and output-gradient spectra is used, and only
the compressed input spectrum is kept for backward (the filter spectrum is recomputed from the weight).
"""

from lightning_memcomp.bandlimit.convert import (
    BAND_LIMITED_TYPES,
    BandLimitEstimate,
    band_limit,
    band_limited_layers,
    estimate_band_limit,
)
from lightning_memcomp.bandlimit.functional import (
    FFT_SIZES,
    BandLimitMemoryError,
    LayerEstimate,
    band_limited_conv,
    complex_mac,
)
from lightning_memcomp.bandlimit.layers import (
    BandLimitedConv1d,
    BandLimitedConv2d,
    BandLimitedConv3d,
    EnergyLevels,
    UnsupportedConvError,
    share_energy_levels,
)

__all__ = [
    "BAND_LIMITED_TYPES",
    "FFT_SIZES",
    "BandLimitedConv1d",
    "BandLimitedConv2d",
    "BandLimitedConv3d",
    "BandLimitEstimate",
    "BandLimitMemoryError",
    "BandLimiting",
    "EnergyLevels",
    "LayerEstimate",
    "UnsupportedConvError",
    "band_limit",
    "band_limited_conv",
    "band_limited_layers",
    "complex_mac",
    "estimate_band_limit",
    "share_energy_levels",
]


def __getattr__(name: str):  # the callback imports Lightning: load it on first use
    if name == "BandLimiting":
        from lightning_memcomp.bandlimit.callback import BandLimiting

        globals()["BandLimiting"] = BandLimiting
        return BandLimiting
    raise AttributeError(f"module 'lightning_memcomp.bandlimit' has no attribute {name!r}")
