"""Property-based tests (Hypothesis) of every codec's round trip ``codec.decode(codec.encode(x, ctx))``.

Each codec configuration runs 200 derandomized examples (``max_examples=200, derandomize=True``, no example
database), so CI sees the same inputs on every run. An example is a small tensor (at most a few thousand
elements) built from a seed drawn by Hypothesis plus a few discrete choices:

* shapes ``[N, C, H, W]`` (N 1..4, C 1..8, H, W 1..24), some ``[N, C, L]`` and ``[N, C, D, H, W]``, and a
  few ``[N, F]`` (which the DCT and wavelet codecs do not take);
* dtypes float16, bfloat16, float32, float64; layouts contiguous and ``channels_last`` (``_3d``);
* values: ``normal(0, s)`` with ``s`` from 1e-6 to 1e4, constant tensors (any value), all zeros, some
  channels constant while others vary, tiny values (1e-30 / 1e-40 subnormal in fp32 and bf16, 1e-30 in
  fp64, 1e-6 subnormal in fp16), huge values (1e30 fp32/bf16, 1e200 fp64, +-60000..65504 fp16), mixed
  magnitudes (a normal tensor with some elements scaled by a tiny factor), each optionally with NaN/+Inf/-Inf
  sprinkled at random positions;
* context ``SaveContext("m", nn.Conv2d(1, 1, 1))`` (a generic layer) or ``SaveContext("m", nn.ReLU())``
  (then the input is passed through ``relu``: a ReLU output).

Tensors require grad, as activations do. When ``codec.accepts(x, ctx)`` is False the engine keeps the
tensor as it is, so nothing can be lost; such examples are counted, and each test checks that most of its
examples are accepted and actually encoded.

Properties, for every codec:

1. the decoded tensor has the input's shape and dtype;
2. NaN stays NaN and +-Inf stays exactly +-Inf at its own position, and every finite input element decodes
   to a finite value (no Inf from fp16 values near 65504, no NaN from fp64 values near 1e200). All codecs
   keep a tensor holding NaN/Inf as it is (``encode`` returns the tensor itself);
3. error bounds (all computed in float64 from the input):

   * ``quant`` with ``b`` bits (``quant.py``: per-group ``lo``/``step`` in memory order, group_size 256,
     ``lo`` rounded down and ``step`` rounded up in fp16 relative to ``2**exponent``, code
     ``q = round((x - lo) / step)``, stochastic below 8 bits): per group of 256 consecutive elements in
     memory order, ``|x_hat - x| <= c * range / (2**b - 1) * 1.01 + 2**-10 * max|x| + eps/2 * max|x| +
     tiny``, with ``range = max - min`` of the group, ``c = 1`` for stochastic rounding (``|floor(v + u) - v|
     < 1``) and ``c = 1/2`` for the deterministic 8 bits; ``2**-10 * max|x|`` is the fp16 rounding of
     ``lo`` and ``step`` relative to the group's power-of-two scale (fp16 has 10 fraction bits), ``tiny`` the
     smallest normal of the dtype (subnormal steps). The term ``eps/2 * max|x|`` (``eps`` of the tensor's
     dtype: 2**-8 bf16, 2**-11 fp16) is the final rounding of the decoded value to the tensor's dtype, which
     ``range/(2**b - 1)`` does not cover in bfloat16 (see ``_quant_bound``). Groups whose minimum is 0 (a
     ReLU output) spend code 0 on the exact zero (``quantize_groups``' "zero-based" groups): their positives
     share ``2**b - 2`` steps over ``[min positive, max]``, so there ``range`` is ``max - min positive``
     over ``2**b - 2`` steps (at 1 bit positives decode to the mean positive: ``range`` over 1 step).
     Constant groups decode EXACTLY; in a group whose minimum is 0, zeros decode to exactly 0 and positives
     stay > 0 (exact ReLU mask);
   * ``blpa`` (``blpa.py``: per channel, ``2**b`` bins of width ``delta = 6 * std / 2**b``, values decoded
     at their bin centre, values outside the window clamped into the end bins): a channel (dim 1) whose
     values are all equal decodes exactly; with the ReLU context the mask ``x > 0`` is exact; otherwise
     decoded values lie within ``[min - delta, max + delta]`` of their channel (bin centres lie within
     ``delta / 2`` of the values they stand for), plus the final rounding to the dtype (``eps * max|x|`` of
     the channel); with the ReLU context within ``[0, max + delta]`` (the window is anchored at the
     threshold 0, see ``_blpa_bound``);
   * ``dct``, ``wavelet``, ``threshold`` (``threshold.py``/``transforms.py``: an orthogonal transform,
     the top ``k`` coefficients kept, the rest zeroed): the reconstruction error's L2 norm is at most the
     L2 norm of the input as the transform sees it, padded by edge replication to a multiple of the DCT
     block or of ``2**levels`` (zeroing coefficients of an orthogonal transform removes energy; with no
     padding, as for ``threshold``, this is the input's norm; see ``_transform_bound`` for why padding
     matters); fp16 coefficient and output clamps at 65504 only move values towards the input. Slack:
     relative 1e-3 for fp32 and 1e-2 for fp16/bf16 rounding (coefficients are stored in the tensor's
     dtype), and the ReLU mask's clamp of positives to the smallest normal value; at
     ``compression_ratio=1`` the decode is the input itself (bit for bit); with the ReLU context the mask
     ``x > 0`` is exact;
4. the payload is never larger than the raw tensor where that is guaranteed: ``quant`` and ``blpa``
   accept a tensor only when their payload is smaller (``accepts``), so ``stored_nbytes(payload) <=
   x.numel() * x.element_size()`` holds at codec level. The top-k codecs' sparse payloads (coefficients
   on the padded transform size, plus a 64-byte header) can exceed a small tensor; the engine
   (``SavedTensorEngine._pack``) then keeps the tensor as it is (``stored > raw`` -> passthrough), which
   is checked for every such example through ``compress_activations(model, ..., min_bytes=0)``, and for a
   sample of examples of every codec by ``test_engine_never_stores_more_than_raw``.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_memcomp.compression import compress_activations
from lightning_memcomp.compression.registry import make_codec
from lightning_memcomp.memory.engine import SaveContext

EXAMPLES = 200
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# codec key -> (registry name, fixed options); transform codecs draw compression_ratio per example
CODECS: dict[str, tuple[str, dict]] = {
    "quant-1": ("quant", {"bits": 1}),
    "quant-2": ("quant", {"bits": 2}),
    "quant-4": ("quant", {"bits": 4}),
    "quant-8": ("quant", {"bits": 8}),
    "blpa-2": ("blpa", {"bits": 2}),
    "blpa-4": ("blpa", {"bits": 4}),
    "blpa-8": ("blpa", {"bits": 8}),
    "dct": ("dct", {}),
    "wavelet": ("wavelet", {}),
    "threshold": ("threshold", {}),
}
TRANSFORMS = ("dct", "wavelet", "threshold")
GROUP_SIZE = 256  # QuantCodec's default group_size

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# weights by repetition (sampled_from shrinks towards the first entry)
KINDS = ("normal",) * 4 + ("constant", "zeros", "const_channels", "const_channels", "tiny", "tiny", "huge",
                           "huge", "mixed", "mixed")
NONFINITE = (None,) * 20 + ("nan", "inf", "-inf", "all")
TINY = {  # value scales of the "tiny" kind per dtype (fp16 1e-6 and fp32/bf16 1e-40 are subnormal)
    torch.float16: (1e-6,),
    torch.bfloat16: (1e-30, 1e-40),
    torch.float32: (1e-30, 1e-40),
    torch.float64: (1e-30,),
}
HUGE = {torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e200}  # fp16: +-60000..65504


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# -- examples ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One example: everything :func:`build` needs to make the tensor (printed on failure)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    log_scale: float  # normal(0, 10**log_scale)
    value: float  # the "constant" kind's value
    tiny_index: int
    nonfinite: str | None
    relu: bool
    channels_last: bool
    seed: int

    def reproducer(self) -> str:
        return f"x = build({self!r})"


def _size(low: int, high: int):
    """A size from ``low`` to ``high``, half the time from the upper two thirds: Hypothesis favours small
    sizes, and the quant/blpa codecs do not take tensors smaller than their metadata."""
    return st.one_of(st.integers(low, high), st.integers(max(low, high // 3), high))


@st.composite
def cases(draw) -> Case:
    layout = draw(st.integers(0, 9))
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 8))
    if layout <= 5:
        shape: tuple[int, ...] = (n, c, draw(_size(1, 24)), draw(_size(1, 24)))
    elif layout <= 7:
        shape = (n, c, draw(_size(1, 64)))
    elif layout == 8:
        shape = (n, c, draw(_size(1, 8)), draw(_size(1, 10)), draw(_size(1, 10)))
    else:
        shape = (n, draw(_size(1, 96)))
    dtype = draw(st.sampled_from(DTYPES))
    return Case(
        shape=shape,
        dtype=dtype,
        kind=draw(st.sampled_from(KINDS)),
        log_scale=draw(st.floats(-6.0, 4.0)),
        value=draw(st.floats(allow_nan=False, allow_infinity=False)),
        tiny_index=draw(st.integers(0, len(TINY[dtype]) - 1)),
        nonfinite=draw(st.sampled_from(NONFINITE)),
        relu=draw(st.booleans()),
        channels_last=draw(st.booleans()) and len(shape) in (4, 5),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def build(case: Case) -> Tensor:
    """The example's tensor: an activation (requires grad) of ``case.dtype`` in ``case``'s memory layout."""
    gen = torch.Generator().manual_seed(case.seed)
    shape, dtype = case.shape, case.dtype
    finfo = torch.finfo(dtype)

    def normal() -> Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    scale = 10.0**case.log_scale
    tiny = TINY[dtype][case.tiny_index]
    if case.kind == "normal":
        v = normal() * scale
    elif case.kind == "constant":
        v = torch.full(shape, case.value, dtype=torch.float64)
    elif case.kind == "zeros":
        v = torch.zeros(shape, dtype=torch.float64)
    elif case.kind == "const_channels":
        v = normal() * scale
        constant = torch.rand(shape[1], generator=gen) < 0.5
        constant[int(torch.randint(shape[1], (1,), generator=gen))] = True
        values = torch.randn(shape[1], generator=gen, dtype=torch.float64) * scale
        values[torch.rand(shape[1], generator=gen) < 0.3] = 0.0
        for ch in torch.nonzero(constant).flatten().tolist():
            v[:, ch] = values[ch]
    elif case.kind == "tiny":
        v = normal() * tiny
    elif case.kind == "huge":
        if dtype == torch.float16:
            magnitude = 60000.0 + torch.rand(shape, generator=gen, dtype=torch.float64) * 5504.0
            v = torch.where(torch.rand(shape, generator=gen) < 0.5, -magnitude, magnitude)
        else:
            v = normal() * HUGE[dtype]
    elif case.kind == "mixed":
        v = normal() * scale
        small = torch.rand(shape, generator=gen) < 0.5
        v = torch.where(small, v * (tiny / scale), v)
    else:  # pragma: no cover
        raise AssertionError(case.kind)
    x = v.clamp(-finfo.max, finfo.max).to(dtype)
    if case.nonfinite is not None:
        flat = x.view(-1)
        count = 1 + int(torch.randint(min(3, flat.numel()), (1,), generator=gen))
        positions = torch.randperm(flat.numel(), generator=gen)[:count]
        specials = {"nan": [math.nan], "inf": [math.inf], "-inf": [-math.inf], "all": [math.nan, math.inf, -math.inf]}
        pool = specials[case.nonfinite]
        for i, p in enumerate(positions.tolist()):
            flat[p] = pool[i % len(pool)]
    if case.relu:
        x = torch.relu(x)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.detach().requires_grad_()


def context(case: Case) -> SaveContext:
    return SaveContext("m", nn.ReLU() if case.relu else nn.Conv2d(1, 1, 1))


def codec_for(key: str, ratio: float | None):
    name, options = CODECS[key]
    if ratio is not None:
        options = {**options, "compression_ratio": ratio}
    return make_codec(name, **options)


def options_for(key: str, ratio: float | None) -> dict:
    name, options = CODECS[key]
    return {**options, "compression_ratio": ratio} if ratio is not None else dict(options)


# -- helpers -------------------------------------------------------------------------------------------
def memory_flat(t: Tensor, like: Tensor) -> Tensor:
    """``t`` flattened in the memory order of ``like`` (``like``'s dimensions sorted by stride)."""
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))
    return t.permute(order).reshape(-1)


def half_eps(dtype: torch.dtype) -> float:
    """Largest relative rounding error of a cast to ``dtype`` (half its machine epsilon)."""
    return torch.finfo(dtype).eps / 2


def check_nonfinite_and_shape(x: Tensor, out: Tensor) -> None:
    assert out.shape == x.shape, (out.shape, x.shape)
    assert out.dtype == x.dtype, (out.dtype, x.dtype)
    xd = x.detach()
    nan = torch.isnan(xd)
    assert torch.equal(torch.isnan(out), nan), "NaN positions moved"
    posinf, neginf = xd == math.inf, xd == -math.inf
    assert torch.equal(out == math.inf, posinf), "+Inf positions moved"
    assert torch.equal(out == -math.inf, neginf), "-Inf positions moved"
    finite = torch.isfinite(xd)
    assert bool(torch.isfinite(out[finite]).all()), "a finite element decoded to a non-finite value"


def same_bits(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` hold the same values, NaN included."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        ((a == b) | (torch.isnan(a) & torch.isnan(b))).all()
    )


# -- bounds --------------------------------------------------------------------------------------------
def _quant_bound(x: Tensor, out: Tensor, bits: int, stochastic: bool) -> None:
    """Per-group error bound of ``quant`` (see the module docstring), plus exact constants and zeros."""
    xf = memory_flat(x.detach(), x).double()
    of = memory_flat(out, x).double()
    n = xf.numel()
    pad = (-n) % GROUP_SIZE
    # padding by repeating the last element never changes a group's min, max or max|x|
    xg = torch.cat([xf, xf[-1:].expand(pad)]).view(-1, GROUP_SIZE)
    og = torch.cat([of, of[-1:].expand(pad)]).view(-1, GROUP_SIZE)
    mn, mx = xg.aminmax(dim=1)
    amax = xg.abs().amax(dim=1)
    constant = mn == mx
    zero_based = (mn == 0) & (mx > 0)
    minpos = torch.where(xg > 0, xg, torch.full_like(xg, math.inf)).amin(dim=1)
    levels = (1 << bits) - 1
    if bits == 1:
        zb_step = mx - minpos  # positives decode to the group's mean positive value
    else:
        # code 0 is the exact zero: 2**b - 2 steps for the positives. The brief's range / (2**b - 1) is too
        # tight there: measured at 2 bits, relu(randn(1, 1, 16, 16)) (seed 0; range 3.41, min positive
        # 8.9e-4) has an error of 1.549 > 1.01 * 3.41 / 3 + 2**-10 * 3.41 = 1.152 (<= 1.725 with 2 steps).
        zb_step = (mx - minpos) / (levels - 1)
    step = torch.where(zero_based, zb_step, (mx - mn) / levels)
    c = 1.0 if stochastic else 0.5
    dtype = x.dtype
    # ``half_eps(dtype) * amax``: the decoded value is computed in float32 and then rounded to the tensor's
    # dtype, half an ulp more. The brief's bound without it fails in bfloat16 (8 significand bits): measured
    # at 8 bits, a group of normal(0, 1.3e-5) values (range 7.4e-5, max|x| 3.7e-5) decodes x = 3.12328e-05
    # to the next bfloat16 3.14713e-05, an error of 2.38e-7 > 0.505 * range / 255 + 2**-10 * max|x| = 1.83e-7.
    bound = (c * step * 1.01 + 2.0**-10 * amax + half_eps(dtype) * amax + torch.finfo(dtype).tiny).unsqueeze(1)
    err = (og - xg).abs()
    bad = ~(err <= bound)
    assert not bool(bad.any()), (
        f"quant error bound broken in group(s) {torch.nonzero(bad.any(1)).flatten().tolist()[:5]}: "
        f"max excess {float((err - bound)[bad].max()):.3g}, err {float(err[bad].max()):.3g}"
    )
    cg = constant.unsqueeze(1).expand_as(xg)
    assert bool((og[cg] == xg[cg]).all()), "a constant group did not decode exactly"
    zb = zero_based.unsqueeze(1).expand_as(xg)
    assert bool((og[zb & (xg == 0)] == 0).all()), "a zero in a group with minimum 0 did not decode to 0"
    assert bool((og[zb & (xg > 0)] > 0).all()), "a positive in a group with minimum 0 decoded to <= 0"


def _blpa_bound(x: Tensor, out: Tensor, bits: int, relu: bool) -> None:
    """Per-channel checks of ``blpa``: exact constant channels, exact ReLU mask, the ``delta`` window."""
    xc = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    oc = out.double().transpose(0, 1).reshape(x.shape[1], -1)
    mn, mx = xc.aminmax(dim=1)
    constant = mn == mx
    assert bool((oc[constant] == xc[constant]).all()), "a constant channel did not decode exactly"
    if relu:
        assert torch.equal(oc > 0, xc > 0), (
            f"ReLU mask not exact at {(oc > 0).ne(xc > 0).sum().item()} element(s): "
            f"inputs {xc[(oc > 0) != (xc > 0)][:4].tolist()} decoded to {oc[(oc > 0) != (xc > 0)][:4].tolist()}"
        )
    std = xc.std(dim=1, correction=0)
    delta = 6 * std / (1 << bits)
    amax = xc.abs().amax(dim=1)
    slack = torch.finfo(x.dtype).eps * amax + torch.finfo(x.dtype).tiny
    # With the ReLU context the window is not centred on the mean: its bins are aligned on the threshold 0
    # with one bin below it (``shift = 1``), so it spans ``[-delta, (2**b - 1) * delta]``, about 6 std above
    # 0, and a channel whose values all lie above it decodes them all to the top bin's centre, below the
    # channel's minimum (a limit of BLPA's threshold-aligned window; measured at 2 bits: fp64 values
    # 1.51e-30..1.66e-30 (std 6.5e-32) all decode to 2.45e-31). What holds there: 0 <= x_hat <= max + delta.
    low = (torch.zeros_like(mn) if relu else mn - delta - slack).unsqueeze(1)
    high = (mx + delta + slack).unsqueeze(1)
    outside = (oc < low) | (oc > high)
    assert not bool(outside.any()), (
        f"blpa decoded {outside.sum().item()} value(s) outside [{'0' if relu else 'min - delta'}, max + delta] "
        "of their channel"
    )


def padded(x: Tensor, name: str) -> Tensor:
    """``x`` (float64) padded by edge replication as the codec's transform pads it (``transforms.py``): the
    DCT to a multiple of its block (16, at most the map's size), the wavelet to a multiple of ``2**levels``
    (3 levels, at most ``floor(log2(smallest spatial size))``); simple thresholding does not pad."""
    spatial = x.shape[2:]
    if name == "dct":
        multiples = [min(16, s) for s in spatial]
    elif name == "wavelet":
        multiples = [1 << min(3, max(0, min(spatial).bit_length() - 1))] * len(spatial)
    else:
        return x
    pads: list[int] = []
    for size, m in zip(reversed(spatial), reversed(multiples)):
        pads += [0, (-size) % m]
    return torch.nn.functional.pad(x, pads, mode="replicate") if any(pads) else x


def _transform_bound(x: Tensor, out: Tensor, relu: bool, name: str) -> None:
    """``||x_hat - x|| <= ||pad(x)||`` (orthogonal transform, coefficients zeroed) with rounding slack."""
    xd = x.detach().double()
    od = out.double()
    scale = float(xd.abs().max())
    if scale == 0:
        assert bool((od == 0).all()), "an all-zero tensor did not decode to zeros"
    else:
        err = float(torch.linalg.vector_norm((od - xd) / scale))
        # The transform is orthogonal on the PADDED map (edge replication up to a multiple of the DCT block
        # or of 2**levels), and the top k are chosen among the padded map's coefficients, so zeroing them
        # bounds the error by the padded map's norm, not by ||x||: a k-sparse reconstruction of the padded
        # map can be worse on the crop than x_hat = 0. Measured: x = [0]*16 + [-1, 1] ([1, 1, 18], float64),
        # dct at compression_ratio 18 (k = 1) decodes the last three to [0, 0.875, 0.875], error 1.879 >
        # ||x|| = 1.414 (<= ||pad(x)|| = 4); wavelet, x = [0]*8 + [-1, 1], ratio 10: error 1.768 > 1.414.
        # Without padding (sizes multiples of the block / 2**levels, and threshold) this is ||x||.
        ref = float(torch.linalg.vector_norm(padded(xd, name) / scale))
        rel = {torch.float64: 1e-9, torch.float32: 1e-3}.get(x.dtype, 1e-2)
        # The masks (ReLU: ``x > 0``) clamp a positive reconstruction to at least the dtype's smallest
        # NORMAL value (``TopKCodec._apply_masks``: never subnormal, which kernels may flush to zero). That
        # clamp moves ``x_hat`` towards ``x`` except where ``0 < x < tiny`` (subnormal positives), where it
        # may move it away by less than ``tiny``: measured, fp16 x = 1.55e-6 (subnormal) at
        # compression_ratio 2 decodes to 6.10e-5 (k = 0, all coefficients dropped, then the clamp).
        tiny = torch.finfo(x.dtype).tiny
        subnormal_positives = int(((xd > 0) & (xd < tiny)).sum()) if relu else 0
        allowed = ref * (1 + rel) + tiny * math.sqrt(subnormal_positives) / scale
        assert err <= allowed, f"reconstruction error {err * scale:.6g} > input norm {ref * scale:.6g}"
    if relu:
        assert torch.equal(out > 0, x.detach() > 0), "ReLU mask not exact"


# -- engine level --------------------------------------------------------------------------------------
class Square(nn.Module):
    """A generic layer: ``x * x`` saves its input (twice, one storage) for backward."""

    def forward(self, x: Tensor) -> Tensor:
        return x * x


def engine_round_trip(key: str, ratio: float | None, x: Tensor, relu: bool) -> tuple[int, int, bool]:
    """Save ``x`` through ``compress_activations`` (min_bytes=0); returns (raw, stored, passthrough) and
    checks the gradient when the engine kept the tensor as it is."""
    name, _ = CODECS[key]
    model: nn.Module = nn.ReLU() if relu else Square()
    leaf = x.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # wavelet: levels clipped for small maps
        # the codec itself, not the precision policy's quant fallback for inaccurate transform payloads
        with compress_activations(model, codec=name, modules=lambda m, n: True, min_bytes=0, policy="off",
                                  **options_for(key, ratio)) as ledger:
            y = model(leaf)
        y.backward(torch.ones_like(y))
    assert ledger.count == 1, ledger
    passthrough = ledger.passthrough_count == 1
    if passthrough:
        assert ledger.stored_bytes == ledger.raw_bytes
        finite = torch.isfinite(x.detach())
        expected = (x.detach() > 0).to(x.dtype) if relu else 2 * x.detach()
        assert torch.equal(leaf.grad[finite], expected[finite]), "a kept tensor gave a different gradient"
    return ledger.raw_bytes, ledger.stored_bytes, passthrough


# -- the round trip ------------------------------------------------------------------------------------
def round_trip_check(key: str, case: Case, ratio: float | None, stats: Counter) -> None:
    note(case.reproducer())
    name, options = CODECS[key]
    x = build(case)
    ctx = context(case)
    codec = codec_for(key, ratio)
    codec.reseed(case.seed)
    stats["examples"] += 1
    if not codec.accepts(x, ctx):
        stats["not accepted"] += 1  # the engine keeps x as it is: nothing is lost
        return
    stats["accepted"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # wavelet: levels clipped for small maps
        payload = codec.encode(x, ctx)
        out = codec.decode(payload)
    check_nonfinite_and_shape(x, out)
    if payload is x:
        # declined: the engine keeps x, and the decode is x itself
        stats["declined"] += 1
        assert same_bits(out, x.detach())
        reason = declined_because(name, codec, x, ratio)
        assert reason is not None, "a finite tensor was declined"
        stats[f"declined: {reason}"] += 1
        return
    stats["encoded"] += 1
    assert bool(torch.isfinite(x.detach()).all()), "a tensor holding NaN/Inf was encoded"
    raw = x.numel() * x.element_size()
    stored = codec.stored_nbytes(payload)
    if name == "quant":
        _quant_bound(x, out, options["bits"], codec.stochastic)
        assert stored <= raw, f"quant payload {stored} B > raw {raw} B"
    elif name == "blpa":
        _blpa_bound(x, out, options["bits"], case.relu)
        assert stored <= raw, f"blpa payload {stored} B > raw {raw} B"
    else:
        assert ratio != 1, "compression_ratio=1 must keep the tensor itself"
        # the bound's padding is the codec's: its coefficients cover the padded map
        assert tuple(payload.coeff_shape) == tuple(padded(x.detach().double(), name).shape), payload.coeff_shape
        _transform_bound(x, out, case.relu, name)
        if stored > raw:
            # the engine drops a payload larger than the tensor for the tensor itself
            stats["payload > raw (engine keeps x)"] += 1
            e_raw, e_stored, passthrough = engine_round_trip(key, ratio, x, case.relu)
            assert passthrough and e_stored == e_raw == raw


def declined_because(name: str, codec, x: Tensor, ratio: float | None) -> str | None:
    """Why a codec kept ``x`` as it is, if for a documented reason: NaN/Inf in ``x``, the top-k codecs' ratio
    1 or a transform overflow (``threshold.py``), BLPA's per-channel spread overflowing (``blpa.py``)."""
    xd = x.detach()
    if not bool(torch.isfinite(xd).all()):
        return "NaN/Inf"
    if name in TRANSFORMS:
        if ratio == 1:
            return "ratio 1"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            coeffs, _ = codec.forward_transform(xd)
        return None if bool(torch.isfinite(coeffs).all()) else "overflow"
    if name == "blpa":
        work = torch.float64 if xd.dtype == torch.float64 else torch.float32
        var, mu = torch.var_mean(xd.to(work), dim=[d for d in range(xd.dim()) if d != 1], correction=0)
        return None if bool((torch.isfinite(var) & torch.isfinite(mu)).all()) else "overflow"
    return None


@st.composite
def _ratio(draw) -> float:
    """``compression_ratio`` from 1 to 10: 1 (no compression) in about a tenth of the examples."""
    if draw(st.integers(0, 11)) == 5:  # not an end of the range: Hypothesis favours those
        return 1
    return draw(st.one_of(st.integers(2, 10), st.floats(1.0, 10.0, exclude_min=True)))


def ratios(key: str):
    return _ratio() if CODECS[key][0] in TRANSFORMS else st.none()


@pytest.mark.parametrize("key", list(CODECS))
def test_round_trip_properties(key: str) -> None:
    stats: Counter = Counter()

    @PROPERTY_SETTINGS
    @given(case=cases(), ratio=ratios(key))
    def check(case: Case, ratio: float | None) -> None:
        round_trip_check(key, case, ratio, stats)

    check()
    print(f"\n{key}: {dict(stats)}")
    assert stats["examples"] >= EXAMPLES
    # most examples are taken by the codec and actually encoded (the rest are vacuous)
    assert stats["accepted"] >= 0.6 * stats["examples"], dict(stats)
    assert stats["encoded"] >= 0.5 * stats["examples"], dict(stats)


@pytest.mark.parametrize("key", list(CODECS))
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(case=cases(), ratio=st.integers(1, 10))
def test_engine_never_stores_more_than_raw(key: str, case: Case, ratio: int) -> None:
    """Engine level: whatever the codec returns, the ledger never stores more than the raw tensor."""
    note(case.reproducer())
    x = build(case)
    ratio_or_none = ratio if CODECS[key][0] in TRANSFORMS else None
    raw, stored, passthrough = engine_round_trip(key, ratio_or_none, x, case.relu)
    assert raw == x.numel() * x.element_size()
    assert stored <= raw
