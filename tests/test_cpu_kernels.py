"""The C++ CPU kernels of ``cuda/codecs_cpu.cpp`` (quant and blpa codecs) against the torch references.

Contract (quant, same as ``cuda/quant_pack.cu``): ``pack(groups, bits, stochastic, seed)`` /
``pack_flat(flat, group_size, ...)`` give, for deterministic rounding, the very bits of :func:`quantize_groups`
(at 1 bit a zero-based group's ``lo``, a float32 mean, may sit one fp16 ulp away: the sum's order differs);
``finite`` is 0 when a group holds NaN or Inf; ``unpack`` gives the very bits of :func:`dequantize_groups`;
stochastic codes come from a counter-based hash of (seed, element index), whatever the thread count.
(blpa): ``blpa_pack`` gives the reference's codes for the same (threshold, delta, shift) and ``blpa_unpack``
its decoded bits; ``blpa_stats`` gives exact extremes and mean / std within float32 rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from test_quant_codec import _grad_vector
from test_quant_kernels_gpu import _assert_same_payload, _bits_of, _cases, _same_bits, _zero_based

from lightning_memcomp import kernels
from lightning_memcomp.compression import compress_activations
from lightning_memcomp.compression.bitpack import from_memory_order, memory_order, pack_bits, unpack_bits
from lightning_memcomp.compression.blpa import (
    BLPACodec,
    BLPAPayload,
    _channel_std_mean,
    _layout,
    blpa_dequantize,
    blpa_quantize,
)
from lightning_memcomp.compression.quant import QuantCodec, QuantPayload, _grouped, dequantize_groups, quantize_groups
from lightning_memcomp.memory.engine import SaveContext
from lightning_memcomp.memory.readings import peak_rss, reset_peak_rss

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = [1, 2, 4, 8]
CONV = SaveContext("conv", nn.Conv2d(1, 1, 1))
MiB = 1 << 20


@pytest.fixture(scope="module")
def ext():
    """The extension, built once per session (about a minute on 2 cores, then cached in the build dir)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    return kernels.load_extension("codecs_cpu")


@contextlib.contextmanager
def _backend(name: str):
    kernels.set_backend(name)
    try:
        yield
    finally:
        kernels.set_backend(None)


# =====================================================================================================
# quant
# =====================================================================================================
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_deterministic_pack_matches_torch_reference(ext, bits, dtype):
    groups = _cases(dtype, device="cpu")  # ordinary, zero-based, constant, subnormal, near-max groups
    got = ext.pack(groups, bits, False, 0)
    codes, lo, step, exponent, finite = got
    assert codes.shape == (groups.shape[0], groups.shape[1] * bits // 8) and codes.dtype == torch.uint8
    assert lo.dtype == step.dtype == torch.float16 and exponent.dtype == torch.int8
    assert finite.numel() == 1 and int(finite) == 1
    ref = quantize_groups(groups, bits, stochastic=False)
    assert ref is not None
    _assert_same_payload(got, ref, bits, mean_lo_ulps=1)
    constant = exponent == torch.iinfo(torch.int8).min
    assert constant.any() and _zero_based(step, exponent).any() and (~torch.signbit(step) & ~constant).any()
    if dtype != torch.float16:  # float16 reaches neither end of the int8 exponent range
        assert (exponent == 127).any() and (exponent == -127).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_one_bit_mean_is_exact_when_the_sum_is(ext, dtype):
    # positives on a coarse grid: every float32 partial sum is exact, whatever the summation order
    gen = torch.Generator().manual_seed(1)
    groups = (torch.randint(0, 64, (64, 512), generator=gen) / 8).to(dtype)
    groups[:, 0] = 0
    _assert_same_payload(ext.pack(groups, 1, False, 0), quantize_groups(groups, 1, stochastic=False), 1)


@pytest.mark.parametrize("group_size", [8, 40, 32, 96, 512, 4096, 65536])
@pytest.mark.parametrize("bits", BITS)
def test_quant_group_sizes(ext, group_size, bits):
    rows = max(2, 16384 // group_size)
    gen = torch.Generator().manual_seed(group_size)
    groups = torch.randn(rows, group_size, generator=gen)
    groups[::2] = groups[::2].relu()
    got = ext.pack(groups, bits, False, 0)
    _assert_same_payload(got, quantize_groups(groups, bits, stochastic=False), bits, mean_lo_ulps=1)
    assert _same_bits(ext.unpack(*got[:4], bits, torch.float32), dequantize_groups(*got[:4], bits, torch.float32))


@pytest.mark.parametrize("numel", [1, 7, 255, 257, 1000, 70001])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_partial_last_group_is_padded_inside_the_kernel(ext, numel, dtype):
    flat = (torch.randn(numel) * 3).to(dtype)
    flat[: numel // 3] = flat[: numel // 3].relu()
    padded = _grouped(flat, 256)  # the reference's padding: the last value repeated
    for bits in (2, 8):
        got = ext.pack_flat(flat, 256, bits, False, 0)
        _assert_same_payload(got, quantize_groups(padded, bits, stochastic=False), bits, mean_lo_ulps=1)
        # stochastic: the same counter (index in the padded groups) as pack on the padded copy
        assert _same_bits(ext.pack_flat(flat, 256, bits, True, 5)[0], ext.pack(padded, bits, True, 5)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_non_finite_clears_the_finite_flag(ext, bad, dtype):
    groups = torch.randn(50, 256).to(dtype)
    assert int(ext.pack(groups, 4, False, 0)[4]) == 1
    groups[37, 101] = bad
    assert quantize_groups(groups, 4, stochastic=False) is None
    for bits in BITS:
        for stochastic in (False, True):
            assert int(ext.pack(groups, bits, stochastic, 3)[4]) == 0
    flat = torch.randn(1000).to(dtype)
    flat[-1] = bad  # in the partial last group
    assert int(ext.pack_flat(flat, 256, 4, False, 0)[4]) == 0


def test_quant_non_finite_tensor_is_kept_as_it_is_by_the_codec(ext):
    x = torch.randn(4, 64, 16, requires_grad=True)
    with torch.no_grad():
        x[1, 2, 3] = float("inf")
    with _backend("cpp"):
        assert QuantCodec(bits=4, group_size=64).encode(x, CONV) is x


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_unpack_matches_torch_reference(ext, bits, dtype):
    groups = _cases(dtype, device="cpu", seed=2)
    payload = quantize_groups(groups, bits, stochastic=False)
    got = ext.unpack(*payload, bits, dtype)
    assert got.dtype == dtype and _same_bits(got, dequantize_groups(*payload, bits, dtype))
    packed = ext.pack(groups, bits, False, 0)
    assert _same_bits(ext.unpack(*packed[:4], bits, dtype), dequantize_groups(*packed[:4], bits, dtype))
    assert torch.isfinite(got.float()).all()
    _, lo, step, exponent = payload
    constant = exponent == torch.iinfo(torch.int8).min
    zero_based = _zero_based(step, exponent)
    assert _same_bits(got[constant], groups[constant])
    assert torch.equal(got[zero_based] > 0, groups[zero_based] > 0)
    assert (got[~constant & ~zero_based & (lo > 0)] > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_signed_zero_group(ext, dtype):
    groups = torch.zeros(3, 64, dtype=dtype)
    groups[:, ::3] = -0.0
    codes, lo, step, exponent, finite = ext.pack(groups, 2, False, 0)
    assert int(finite) == 1 and (exponent == torch.iinfo(torch.int8).min).all() and (codes == 0).all()
    assert (ext.unpack(codes, lo, step, exponent, 2, dtype) == 0).all()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quant_stochastic_pack_is_unbiased(ext, bits):
    gen = torch.Generator().manual_seed(3)
    groups = torch.randn(16, 256, generator=gen)
    groups[8:] = groups[8:].relu()  # zero-based groups too
    det = ext.pack(groups, bits, False, 0)
    ref_codes = unpack_bits(det[0], bits).int()
    draws = 400
    decoded = []
    for seed in range(draws):
        codes, lo, step, exponent, finite = ext.pack(groups, bits, True, seed)
        assert int(finite) == 1
        # the metadata does not depend on the rounding; a code is the floor or the ceiling
        assert _same_bits(lo, det[1]) and _same_bits(step, det[2]) and _same_bits(exponent, det[3])
        assert (unpack_bits(codes, bits).int() - ref_codes).abs().max() <= 1
        decoded.append(ext.unpack(codes, lo, step, exponent, bits, torch.float32).double())
    assert not torch.equal(ext.pack(groups, bits, True, 1)[0], det[0])  # random, and the seed matters
    assert not torch.equal(ext.pack(groups, bits, True, 1)[0], ext.pack(groups, bits, True, 2)[0])
    assert _same_bits(ext.pack(groups, bits, True, 7)[0], ext.pack(groups, bits, True, 7)[0])  # and repeats
    stack = torch.stack(decoded)
    mean, x = stack.mean(0), groups.double()
    # zero-based at 1 bit: a positive always decodes to the group's mean positive value (no rounding)
    rounded = ~(_zero_based(det[2], det[3]) & (bits == 1)).unsqueeze(1).expand_as(mean)
    # tolerance: code = floor(t + u) is t's floor plus a Bernoulli(p = t - floor(t)) draw, so each element's
    # mean over the draws is off by at most 5 of its standard errors sqrt(p (1 - p) / 400) grid spacings,
    # plus 3 draws' worth for the binomial's skew at small p (t from the payload, in float32 as the kernel)
    lo, step, exponent = det[1].float(), det[2].float().abs(), det[3].int()
    inv = torch.ldexp(torch.ones_like(lo), -exponent)
    t = (groups * inv.unsqueeze(1) - lo.unsqueeze(1)) / torch.where(step > 0, step, 1).unsqueeze(1)
    p = (t - t.floor()).double()
    spacing = torch.ldexp(step.double(), exponent).unsqueeze(1).expand_as(mean)
    bound = spacing * (5 * (p * (1 - p) / draws).sqrt() + 3 / draws + 1e-5)
    assert ((mean - x).abs() <= bound)[rounded].all()
    # and no bias overall: the mean error in units of the spacing is 0 within 5 standard errors
    scaled = rounded & (spacing > 0)
    z = ((mean - x) / spacing)[scaled]
    z_se = ((stack / spacing).var(0)[scaled].sum() / draws).sqrt() / z.numel()
    assert z.mean().abs() <= 5 * z_se


def test_quant_stochastic_codes_do_not_depend_on_the_thread_count(ext):
    gen = torch.Generator().manual_seed(4)
    flat = torch.randn(1 << 20, generator=gen)
    flat[::3] = flat[::3].relu()
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append([ext.pack_flat(flat, 256, bits, True, 11)[0] for bits in (1, 2, 4, 8)])
            results[-1].append(ext.threshold_mask(flat, 0.0, 1.0))
    finally:
        torch.set_num_threads(threads)
    assert all(_same_bits(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_codec_cpp_and_torch_paths_agree(ext, bits, dtype):
    xs = [(torch.randn(4, 8, 24, 24) * 3).to(dtype),  # 18432: whole groups of 128
          torch.randn(3, 5, 7, 11).relu().to(dtype),  # a partial last group
          torch.randn(2, 64, 6, 6).to(dtype).to(memory_format=torch.channels_last)]
    for x in xs:
        x = x.requires_grad_()
        out = {}
        for name in ("cpp", "torch"):
            with _backend(name):
                codec = QuantCodec(bits=bits, group_size=128, stochastic=False)
                payload = codec.encode(x, CONV)
                out[name] = (payload, codec.decode(payload))
        (a, da), (b, db) = out["cpp"], out["torch"]
        assert isinstance(a, QuantPayload) and isinstance(b, QuantPayload) and a.order == b.order
        _assert_same_payload((a.codes, a.lo, a.step, a.exponent), (b.codes, b.lo, b.step, b.exponent), bits,
                             mean_lo_ulps=1)
        assert da.shape == x.shape and da.stride() == db.stride() and da.dtype == dtype
        if bits > 1:
            assert _same_bits(da, db)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("module", [nn.LeakyReLU(), nn.Hardtanh(-0.1, 0.1), nn.ReLU6()])
def test_quant_masks_match_the_torch_path(ext, dtype, module):
    x = (torch.randn(2, 8, 9, 9) * 0.2).to(dtype)
    x[0, 0, 0, :4] = torch.tensor([0.1, -0.1, 0.0, 6.0]).to(dtype)  # on the thresholds (0.1: not a dtype value)
    x.requires_grad_()
    masks = {}
    for name in ("cpp", "torch"):
        with _backend(name):
            masks[name] = QuantCodec(bits=2, stochastic=False).encode(x, SaveContext("act", module)).mask
    assert _same_bits(masks["cpp"].bits, masks["torch"].bits) and masks["cpp"].numel == masks["torch"].numel


def _small_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.LeakyReLU(0.1),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


# cosines to plain PyTorch measured over seeds 0-2 (both paths): quant:8 >= 0.9999994, quant:4 (deterministic)
# >= 0.99966, blpa:8 >= 0.99989, blpa:4 >= 0.99963; the thresholds leave that spread as margin
@pytest.mark.parametrize(("codec", "options", "min_cosine"), [
    ("quant", {"bits": 8}, 0.9999),
    ("quant", {"bits": 4, "stochastic": False}, 0.999),
    ("blpa", {"bits": 8}, 0.9995),
    ("blpa", {"bits": 4}, 0.999),
])
def test_codec_gradients_on_a_small_convnet(ext, codec, options, min_cosine):
    model = _small_convnet().train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    base = _grad_vector(model, x, y, contextlib.nullcontext())  # plain PyTorch, no hooks
    got = {}
    for name in ("cpp", "torch"):
        with _backend(name):
            got[name] = _grad_vector(model, x, y, compress_activations(model, codec=codec, **options))
    cos = {k: float(nn.functional.cosine_similarity(v, base, dim=0)) for k, v in got.items()}
    assert cos["cpp"] > min_cosine and cos["torch"] > min_cosine, cos
    if codec == "quant":  # deterministic rounding: the same decoded activations, the same gradients
        assert torch.equal(got["cpp"], got["torch"])
    else:  # blpa: the kernel's statistics (float64 sums) move t / delta by float32 roundings only
        assert abs(cos["cpp"] - cos["torch"]) < 1e-6, cos  # measured <= 1e-10


# =====================================================================================================
# blpa
# =====================================================================================================
def _blpa_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    finfo = torch.finfo(dtype)
    a = torch.randn(8, 6, 7, 7, generator=gen) * 2 + 1
    a[:, 2] = 0.7  # a constant channel
    a[:, 3] = a[:, 3] * finfo.tiny  # subnormal / tiny values
    a[:, 4] = a[:, 4].clamp(-1, 1) * finfo.max / 2  # huge values
    a[0, 5, 0, :3] = torch.tensor([0.0, finfo.tiny, -finfo.tiny])  # at and just around a threshold of 0
    b = torch.randn(4, 16, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    c = torch.randn(3, 5, 9, generator=gen).relu()
    d = torch.randn(2, 4, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last_3d)
    e = torch.randn(33, 7, generator=gen)  # [N, C]: an odd number of elements
    return [t.clamp(-finfo.max, finfo.max).to(dtype) for t in (a, b, c, d, e)]


def _reference_packed(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """BLPACodec.encode's packing of the reference's codes."""
    flat, order = memory_order(codes)
    per = 8 // bits
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)])
    return pack_bits(flat.view(-1, per), bits).reshape(-1), order


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_blpa_codes_and_decode_match_torch_reference(ext, bits, dtype):
    iv = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    for x in _blpa_inputs(dtype):
        flat, order = memory_order(x)
        layout = _layout(tuple(x.shape), order)
        for relu in (False, True):
            for threshold in (None, torch.linspace(-0.5, 0.5, x.shape[1])):
                codes, t, delta, shift = blpa_quantize(x, bits, threshold, relu=relu)
                packed, ref_order = _reference_packed(codes, bits)
                assert ref_order == order
                got = ext.blpa_pack(flat, t, delta, shift, *layout, bits)
                assert _same_bits(got, packed), (x.shape, relu, threshold is None)
                ref = blpa_dequantize(codes, t, delta, shift, relu, dtype)
                out = from_memory_order(ext.blpa_unpack(got, t, delta, shift, relu, dtype, *layout, bits),
                                        tuple(x.shape), order)
                assert out.stride() == ref.stride()
                assert torch.equal(out.contiguous().view(iv), ref.contiguous().view(iv)), (x.shape, relu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_blpa_statistics(ext, dtype):
    # tolerance: float64 sums rounded once to float32, so within 2 float32 ulps of the float64 statistics
    # (measured: 5.4e-8 relative for std, 4.6e-8 of the largest magnitude for the mean)
    inputs = _blpa_inputs(dtype) + [(torch.randn(64, 4, 8, 8) * 3 + 100).to(dtype)]
    for i, x in enumerate(inputs):
        flat, order = memory_order(x)
        lo, hi, mean, std, finite = ext.blpa_stats(flat, *_layout(tuple(x.shape), order))
        assert int(finite) == 1
        dims = [d for d in range(x.dim()) if d != 1]
        assert _same_bits(lo, x.amin(dims).float()) and _same_bits(hi, x.amax(dims).float())
        constant = lo == hi  # exactly: a constant channel has min == max
        assert bool(constant[2]) if i == 0 else not constant.any()
        assert (std[constant] == 0).all() and _same_bits(mean[constant], lo[constant])
        ref_var, ref_mean = torch.var_mean(x.double(), dim=dims, correction=0)
        amax = torch.maximum(lo.abs(), hi.abs()).double()
        torch.testing.assert_close(std.double(), ref_var.sqrt(), rtol=2.4e-7, atol=0)
        assert ((mean.double() - ref_mean).abs() <= 2.4e-7 * amax).all()
        # and the float32 reference (per-chunk var_mean, rescaled) agrees with both within its own rounding
        work_std, work_mean = _channel_std_mean(x, torch.float32, 3, amax.float())
        torch.testing.assert_close(work_std, std, rtol=1e-4, atol=0)
        assert ((work_mean - mean).abs() <= 1e-5 * amax.float()).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_blpa_non_finite_is_flagged_and_kept_by_the_codec(ext, dtype):
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(4, 3, 5, 5).to(dtype)
        x[2, 1, 3, 3] = bad
        flat, order = memory_order(x)
        assert int(ext.blpa_stats(flat, *_layout(tuple(x.shape), order))[4]) == 0
        x.requires_grad_()
        with _backend("cpp"):
            assert BLPACodec(bits=4).encode(x, CONV) is x


@pytest.mark.parametrize("module", [nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.ReLU6(), nn.LeakyReLU()])
@pytest.mark.parametrize("dtype", DTYPES)
def test_blpa_codec_cpp_path(ext, module, dtype):
    x = torch.randn(4, 8, 10, 10).to(dtype)
    if isinstance(module, nn.ReLU):
        x = x.relu()
    for layout in (x, x.to(memory_format=torch.channels_last)):
        layout = layout.detach().requires_grad_()
        out = {}
        for name in ("cpp", "torch"):
            with _backend(name):
                codec = BLPACodec(bits=4)
                payload = codec.encode(layout, SaveContext("m", module))
                out[name] = (payload, codec.decode(payload))
        (a, da), (b, db) = out["cpp"], out["torch"]
        assert isinstance(a, BLPAPayload) and a.order == b.order and a.codes.shape == b.codes.shape
        assert da.dtype == dtype and da.shape == x.shape and da.stride() == db.stride()
        # t / delta from float64 statistics: a code may move by one bin where a value sits on an edge
        assert (a.codes != b.codes).float().mean() < 0.01
        torch.testing.assert_close(a.delta, b.delta, rtol=1e-4, atol=0)
        if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
            assert torch.equal(da > 0, layout > 0)
        if isinstance(module, nn.ReLU6):
            assert _same_bits(a.mask.bits, b.mask.bits)
        # the torch decode of the kernel's payload is the kernel decode's bits
        with _backend("torch"):
            assert torch.equal(BLPACodec(bits=4).decode(a).contiguous().view(_bits_of(da).dtype),
                               da.contiguous().view(_bits_of(da).dtype))


# =====================================================================================================
# memory and fallback
# =====================================================================================================
_RSS = textwrap.dedent("""
    import gc, json, sys
    import torch
    from torch import nn
    from lightning_memcomp import kernels
    from lightning_memcomp.compression.blpa import BLPACodec
    from lightning_memcomp.compression.quant import QuantCodec
    from lightning_memcomp.memory.engine import SaveContext
    from lightning_memcomp.memory.readings import peak_rss, process_rss, reset_peak_rss

    def growth(fn):
        gc.collect()
        assert reset_peak_rss()
        before = process_rss()
        result = fn()
        return peak_rss() - before, result

    ctx = SaveContext("conv", nn.Conv2d(1, 1, 1))
    x = torch.randn(64, 64, 64, 128).requires_grad_()  # 128 MiB of float32
    small = torch.randn(4, 8, 16, 16, requires_grad=True)
    out = {}
    for name, codec in (("quant", QuantCodec(bits=4)), ("blpa", BLPACodec(bits=4))):
        for backend in ("cpp", "torch"):
            kernels.set_backend(backend)
            codec.decode(codec.encode(small, ctx))  # warm: libraries, thread pool
            encode, payload = growth(lambda: codec.encode(x, ctx))
            decode, _ = growth(lambda: codec.decode(payload))
            out[f"{name}/{backend}"] = {"encode": encode, "decode": decode, "stored": codec.stored_nbytes(payload)}
            del payload
    print(json.dumps(out))
""")


def test_encode_allocates_only_its_payload(ext):
    """Peak RSS growth while encoding a 128 MiB float32 activation (and decoding it), in a fresh process with
    every large buffer mmapped (``MALLOC_MMAP_THRESHOLD_``), so that any temporary shows."""
    if not reset_peak_rss() or peak_rss() is None:
        pytest.skip("no peak RSS reset (/proc/self/clear_refs) or reading (VmHWM) here")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _RSS], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("quant", "blpa"):
        cpp, ref = got[f"{name}/cpp"], got[f"{name}/torch"]
        # measured (2-core EPYC, torch 2.14.1): encode growth quant 16.69 MiB for a 16.62 MiB payload, blpa
        # 15.74 MiB for 16.00 MiB (the payload and nothing else); decode growth 128.00 MiB for the 128 MiB output
        assert cpp["encode"] <= cpp["stored"] + 16 * MiB, (name, cpp)
        assert cpp["decode"] <= 128 * MiB + 16 * MiB, (name, cpp)
        # the measurement sees temporaries: the torch path's (measured: quant encode 25.0 / decode 131.7 MiB,
        # blpa 79.9 / 163.9 MiB)
        assert ref["encode"] > cpp["encode"], (name, cpp, ref)


_FALLBACK = textwrap.dedent("""
    import json, warnings
    import torch
    from torch import nn
    from lightning_memcomp import kernels
    from lightning_memcomp.compression.blpa import BLPACodec
    from lightning_memcomp.compression.quant import QuantCodec
    from lightning_memcomp.memory.engine import SaveContext

    ctx = SaveContext("conv", nn.Conv2d(1, 1, 1))
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    result = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for codec in (QuantCodec(bits=4, stochastic=False), BLPACodec(bits=4), QuantCodec(bits=2, stochastic=False)):
            got = codec.decode(codec.encode(x, ctx))
            kernels.set_backend("torch")
            ref = codec.decode(codec.encode(x, ctx))
            kernels.set_backend(None)
            result.setdefault("same", []).append(torch.equal(got, ref))
    result["warnings"] = [str(w.message) for w in caught]
    kernels.set_backend("cpp")
    try:
        QuantCodec(bits=4).encode(x, ctx)
        result["cpp"] = "no error"
    except RuntimeError as err:
        result["cpp"] = str(err)
    print(json.dumps(result))
""")


def test_missing_compiler_falls_back_to_torch_with_one_warning(tmp_path):
    env = dict(os.environ, CXX="/nonexistent/g++", MEMCOMP_BUILD_DIR=str(tmp_path / "build"), MEMCOMP_KERNELS="auto")
    proc = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same"] == [True, True, True]  # the torch path's numbers
    assert len(result["warnings"]) == 1, result["warnings"]  # one, though three codecs asked twice each
    message = result["warnings"][0]
    assert "\n" not in message and "codecs_cpu" in message and "/nonexistent/g++" in message
    assert "torch path" in message
    assert proc.stderr.strip() == ""  # nothing else: no compiler output, no torch build notes
    assert "not found" in result["cpp"]  # MEMCOMP_KERNELS=cpp: an error, not a fallback
