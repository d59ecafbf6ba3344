"""The Triton kernels of ``quant_triton`` against the torch reference, on CPU through Triton's interpreter.

``triton.jit`` decides between a compiled kernel and Triton's interpreter (numpy on CPU tensors) when it
decorates, from ``TRITON_INTERPRET`` (``triton.knobs.runtime.interpret`` reads the environment at each
access). The ``interp`` fixture therefore loads a private copy of ``quant_triton.py`` with the variable
set only while that copy is executed (``MonkeyPatch.context``): the interpreted kernels live in that copy
alone, and neither the environment nor the ``lightning_memcomp.compression.quant_triton`` module that
other tests (and the codec) import changes — ``test_plain_module_is_not_interpreted`` checks it. The
interpreter also adds its helper names to the globals of the kernels it runs, which here are the
copy's globals. This works whether or not triton was imported (compiled) before: the kernels call no
``@triton.jit`` function of ``triton.language.standard`` (see the reductions in ``quant_triton``).

Contract checked: ``pack(groups, bits, stochastic, seed)`` gives for deterministic rounding the bits of
:func:`quantize_groups` (ordinary, zero-based and constant groups, subnormal and huge values), ``finite``
is ``False`` when a group holds NaN or Inf, stochastic codes are the CUDA kernel's splitmix64 formula and
unbiased, and ``unpack`` gives the bits of :func:`dequantize_groups`, finite (float32 included).
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from lightning_memcomp.compression import quant_triton
from lightning_memcomp.compression.bitpack import pack_bits, unpack_bits
from lightning_memcomp.compression.quant import dequantize_groups, quantize_groups

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = [1, 2, 4, 8]
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.int8: torch.int8, torch.uint8: torch.uint8}
_ENV_AT_IMPORT = os.environ.get("TRITON_INTERPRET")


@pytest.fixture(scope="module")
def interp():
    """``quant_triton`` with its kernels built for Triton's interpreter (runs on CPU tensors)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.spec_from_file_location("_quant_triton_interpreted", quant_triton.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    assert module.interpreted()
    return module


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.dtype])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _sub(dtype: torch.dtype) -> float:
    return float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))


def _decoded_ref(payload, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference decode, float32 clamped to ±max as the kernels (and the CUDA kernel) do; a no-op
    where the reference clamps float32 itself."""
    out = dequantize_groups(*payload, bits, dtype)
    return out.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max) if dtype == torch.float32 else out


def _groups(dtype: torch.dtype, size: int, seed: int = 0) -> torch.Tensor:
    """Rows of every kind: ordinary at assorted scales, positive, negative, zero-based (ReLU, one positive,
    a narrow band, a subnormal smallest positive), constant, tiny (around and below the smallest normal),
    huge (up to ±max), a positive minimum far below the maximum and a maximum exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    fi, sub = torch.finfo(dtype), _sub(dtype)

    def normal(n: int) -> torch.Tensor:
        return torch.randn(n, size, generator=gen)

    def uniform(n: int) -> torch.Tensor:
        return torch.rand(n, size, generator=gen)

    def with_column(t: torch.Tensor, col: int, value: float) -> torch.Tensor:
        t[:, col] = value
        return t

    relu = with_column(normal(6).relu(), 0, 0.0) * torch.tensor([1, 1, 1, 1e-3, 1e-3, 1e-3]).unsqueeze(1)
    single = torch.zeros(2, size)
    single[0, 3], single[1, 5] = 2.5, 3e-3
    band = normal(2).relu() * 1e-4 + 1.0
    band[:, ::7] = 0.0
    tiny = torch.cat([normal(1) * scale for scale in (fi.tiny * 100, fi.tiny, sub * 30, sub * 4)])
    tiny = torch.where(tiny.to(dtype) == 0, torch.full_like(tiny, sub), tiny)  # no zeros of both signs
    huge = normal(4) * (fi.max / 8)
    huge[:2, 0], huge[2:, 0] = fi.max, -fi.max
    parts = [
        normal(12) * uniform(12)[:, :1] * 10, normal(2) + 5.0, -(uniform(2) + 0.5),
        relu, single, band, with_column(with_column(normal(2).relu(), 0, 0.0), 1, sub),
        torch.tensor([0.7, -3.25, 0.0, sub, fi.max, -fi.tiny]).unsqueeze(1).expand(6, size),
        tiny, with_column(with_column((normal(2) * fi.tiny * 50).relu(), 0, 0.0), 1, sub),
        huge, uniform(2) * fi.max, with_column(normal(2).abs() * 1e-3 + 1.0, 0, fi.tiny),
        with_column(-uniform(2), 0, 0.0),
    ]
    x = torch.cat(parts).clamp(-fi.max, fi.max).to(dtype)
    return x[torch.randperm(x.shape[0], generator=gen)]


def _kinds(step: torch.Tensor, exponent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    constant = exponent == -128
    return constant, torch.signbit(step) & ~constant


def _assert_payload(got, ref, bits: int, mean_lo_ulps: int = 1) -> None:
    """Bit-identical codes/step/exponent and lo; at 1 bit a zero-based group's lo is its mean positive
    value, which the kernel sums in float64 and torch in float32 (order-dependent): one fp16 ulp apart
    at most."""
    assert _same(got[0], ref[0]) and _same(got[2], ref[2]) and _same(got[3], ref[3])
    if bits == 1:
        _, mean_rows = _kinds(ref[2], ref[3])
        assert _same(got[1][~mean_rows], ref[1][~mean_rows])
        ulps = (_bits(got[1][mean_rows]).int() - _bits(ref[1][mean_rows]).int()).abs()
        assert ulps.numel() == 0 or int(ulps.max()) <= mean_lo_ulps
    else:
        assert _same(got[1], ref[1])


# every dtype and bit width in groups of 32; groups of 256 (8 to a program instead of 64) at 1 and 4 bits
@pytest.mark.parametrize(("bits", "size"), [(b, 32) for b in BITS] + [(1, 256), (4, 256)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_and_unpack_match_torch_reference(interp, dtype, bits, size):
    x = _groups(dtype, size)
    got = interp.pack(x, bits, False, 0)
    codes, lo, step, exponent, finite = got
    assert codes.shape == (x.shape[0], size * bits // 8) and codes.dtype == torch.uint8
    assert lo.dtype == step.dtype == torch.float16 and exponent.dtype == torch.int8
    assert finite.dtype == torch.bool and finite.dim() == 0 and bool(finite)
    ref = quantize_groups(x, bits, stochastic=False)
    _assert_payload(got, ref, bits)
    constant, zero_based = _kinds(step, exponent)
    assert constant.any() and zero_based.any() and (~constant & ~zero_based).any()
    if dtype != torch.float16:  # float16 reaches neither end of the int8 exponent range
        assert (exponent == 127).any() and (exponent == -127).any()
    # decode: the kernel's and the reference's payloads
    for payload in (got[:4], ref):
        out = interp.unpack(*payload, bits, dtype)
        assert out.dtype == dtype and _same(out, _decoded_ref(payload, bits, dtype))
    assert torch.isfinite(out.float()).all()
    assert _same(out[constant], x[constant])
    assert torch.equal(out[zero_based] > 0, x[zero_based] > 0) and torch.equal(out[zero_based] == 0, x[zero_based] == 0)


def test_float32_decode_near_the_top_is_clamped_not_inf(interp):
    # lo + L * step reaches 2.0 at exponent 127 in these groups: (lo + q * step) * 2**127 overflows
    fmax = torch.finfo(torch.float32).max
    x = torch.tensor([[fmax] * 31 + [-0.3 * fmax], [0.99999 * fmax] * 31 + [fmax], [fmax] * 16 + [-fmax] * 16])
    for bits in BITS:
        payload = interp.pack(x, bits, False, 0)[:4]
        out = interp.unpack(*payload, bits, torch.float32)
        assert torch.isfinite(out).all() and out.max() == fmax and out.min() == -fmax
        assert _same(out, _decoded_ref(payload, bits, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_bit_mean_is_exact_when_the_sum_is(interp, dtype):
    # positives on a coarse grid: every float32 partial sum is exact, whatever the summation order
    gen = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 64, (16, 64), generator=gen) / 8).to(dtype)
    x[:, 0] = 0
    got = interp.pack(x, 1, False, 0)
    _assert_payload(got, quantize_groups(x, 1, stochastic=False), 1, mean_lo_ulps=0)
    assert torch.signbit(got[2]).all()


@pytest.mark.parametrize(("size", "rows"), [(8, 5), (40, 3), (96, 7), (32, 70), (2048, 2)])
def test_group_sizes_and_partial_tiles(interp, size, rows):
    # sizes that are not a power of two, below one byte of 1-bit codes, a last tile of groups that is
    # partly empty (70 groups of 32: tiles of 64), and groups of two column blocks (2048)
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(rows, size, generator=gen)
    x[::2] = x[::2].relu()
    for bits in BITS:
        got = interp.pack(x, bits, False, 0)
        _assert_payload(got, quantize_groups(x, bits, stochastic=False), bits)
        assert _same(interp.unpack(*got[:4], bits, torch.float32), _decoded_ref(got[:4], bits, torch.float32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_clears_the_finite_flag(interp, dtype, bad):
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[4, 9] = bad
    assert quantize_groups(x, 4, stochastic=False) is None
    clean = quantize_groups(x[:4], 4, stochastic=False)
    for bits, stochastic in [(1, False), (4, False), (2, True), (8, True)]:
        codes, lo, step, exponent, finite = interp.pack(x, bits, stochastic, 3)
        assert finite.dim() == 0 and not bool(finite)
        # the group is left defined (zeros); the others are as usual
        assert (codes[4] == 0).all() and lo[4] == 0 and step[4] == 0 and exponent[4] == 0
        if bits == 4:
            _assert_payload((codes[:4], lo[:4], step[:4], exponent[:4]), clean, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zero_group_is_constant(interp, dtype):
    x = torch.zeros(3, 32, dtype=dtype)
    x[:, ::3] = -0.0
    codes, lo, step, exponent, finite = interp.pack(x, 2, False, 0)
    assert bool(finite) and (exponent == -128).all() and (codes == 0).all()
    assert (interp.unpack(codes, lo, step, exponent, 2, dtype) == 0).all()


def _splitmix_uniform(seed: int, index: np.ndarray) -> np.ndarray:
    """``uniform01(seed, index)`` of ``cuda/quant_pack.cu``, in numpy (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed & (2**64 - 1)) + np.uint64(0x9E3779B97F4A7C15) * (index.astype(np.uint64) + np.uint64(1))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def _cuda_formula_codes(x: torch.Tensor, lo, step, exponent, bits: int, seed: int) -> torch.Tensor:
    """The CUDA kernel's stochastic codes, written out in numpy float32 (IEEE on the CPU: subnormals are
    not flushed): ``floor((x * 2**-e - lo) / step + u)`` clamped, zero-based and constant groups mapped."""
    G, S = x.shape
    levels = (1 << bits) - 1
    constant = exponent.numpy() == -128
    inv = np.ldexp(np.float32(1), -np.where(constant, 0, exponent.int().numpy())).astype(np.float32)
    zero_based = np.signbit(step.numpy()) & ~constant
    st = np.abs(step.float().numpy())
    divisor = np.where(st > 0, st, np.float32(1)).astype(np.float32)[:, None]
    with np.errstate(all="ignore"):
        t = (x.float().numpy() * inv[:, None] - lo.float().numpy()[:, None]) / divisor
        u = _splitmix_uniform(seed, np.arange(G * S).reshape(G, S))
        q = np.floor((t + u).astype(np.float32))
    top = np.where(zero_based, max(levels - 1, 0), levels)[:, None]
    q = np.clip(q, 0, top)
    positive = x.float().numpy() > 0
    q = np.where(zero_based[:, None], np.where(positive, (1 if bits == 1 else q + 1), 0), q)
    q = np.where(constant[:, None], 0, q)
    return pack_bits(torch.from_numpy(q.astype(np.uint8)), bits)


def _stochastic_groups(rows: int = 8, size: int = 64) -> torch.Tensor:
    x = torch.randn(rows, size, generator=torch.Generator().manual_seed(3)) * 2
    x[rows // 2:] = x[rows // 2:].relu()  # zero-based groups too
    return x


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_codes_are_the_cuda_formula(interp, bits):
    x = _stochastic_groups()
    det = interp.pack(x, bits, False, 0)
    for seed in (0, 7, 2**62 - 1, -5):  # -5: the CUDA kernel's uint64 of an int64
        codes, lo, step, exponent, finite = interp.pack(x, bits, True, seed)
        assert bool(finite)
        # the metadata does not depend on the rounding
        assert _same(lo, det[1]) and _same(step, det[2]) and _same(exponent, det[3])
        assert torch.equal(codes, _cuda_formula_codes(x, lo, step, exponent, bits, seed))
        # every code is the floor or the ceiling of the deterministic one's value
        assert (unpack_bits(codes, bits).int() - unpack_bits(det[0], bits).int()).abs().max() <= 1
    assert torch.equal(interp.pack(x, bits, True, 11)[0], interp.pack(x, bits, True, 11)[0])  # repeatable
    if bits < 8:
        assert not torch.equal(interp.pack(x, bits, True, 11)[0], interp.pack(x, bits, True, 12)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_codes_are_the_cuda_formula_on_every_kind_of_group(interp, dtype):
    # subnormal, huge, constant and zero-based groups: the bit-level scaling matches IEEE float32 math
    x = _groups(dtype, 32, seed=4)
    for bits in BITS:
        codes, lo, step, exponent, _ = interp.pack(x, bits, True, 2024 + bits)
        assert torch.equal(codes, _cuda_formula_codes(x, lo, step, exponent, bits, 2024 + bits))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_stochastic_rounding_is_unbiased(interp, bits):
    # M = 4 * 32 distinct values (two ordinary and two zero-based groups), each repeated in COPIES groups
    # (other element indices: other draws) and packed with SEEDS seeds: N = COPIES * SEEDS samples each.
    # A decoded sample is one of two grid points Delta = |step| * 2**e apart, so by Hoeffding
    # P(|mean - E| >= eps) <= 2 exp(-2 N eps^2 / Delta^2); with a union bound over the M values, the
    # bound eps = Delta * sqrt(ln(2 M / 1e-6) / (2 N)) (0.194 Delta for N = 256) holds for all of them
    # with probability 1 - 1e-6 if E = x. E differs from x only by the 24-bit uniform (2**-24 Delta)
    # and float32 rounding (a few ulps of x): 1e-5 |x| covers both. The mean error over all M values
    # (each term's deviation at most Delta / 2) is held to 6 standard deviations, Delta / (2 sqrt(N M)).
    copies, seeds = 64, 4
    base = _stochastic_groups(rows=4, size=32)
    x = base.repeat(copies, 1)
    det = interp.pack(x, bits, False, 0)
    decoded = []
    for seed in range(seeds):
        codes, lo, step, exponent, _ = interp.pack(x, bits, True, seed)
        decoded.append(interp.unpack(codes, lo, step, exponent, bits, torch.float32).view(copies, *base.shape))
    samples = torch.stack(decoded).flatten(0, 1).double()  # [N, 4, 32]
    n, m = samples.shape[0], base.numel()
    mean = samples.mean(0)
    delta = torch.ldexp(det[2][:4].double().abs(), det[3][:4].double()).unsqueeze(1).expand_as(mean)
    # zero-based at 1 bit: a positive always decodes to the group's mean positive value (no rounding)
    _, zero_based = _kinds(det[2][:4], det[3][:4])
    rounded = torch.ones_like(mean, dtype=torch.bool) if bits > 1 else ~zero_based.unsqueeze(1).expand_as(mean)
    exact = interp.unpack(*[p[:4] for p in det[:4]], bits, torch.float32).double()
    assert torch.equal(mean[~rounded], exact[~rounded])
    eps = delta * math.sqrt(math.log(2 * m / 1e-6) / (2 * n)) + 1e-5 * base.double().abs()
    err = (mean - base.double()).abs()
    assert (err[rounded] <= eps[rounded]).all()
    normalized = ((mean - base.double()) / delta)[rounded]
    assert abs(float(normalized.mean())) <= 6 / (2 * math.sqrt(n * normalized.numel()))
    # and not merely round-to-nearest: the samples do take both neighbours
    assert (samples.std(0)[rounded] > 0).float().mean() > 0.5


def test_interface(interp):
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="float64"):
        interp.pack(x.double(), 4, False, 0)
    with pytest.raises(ValueError, match="bits"):
        interp.pack(x, 3, False, 0)
    with pytest.raises(ValueError, match="multiple of 8"):
        interp.pack(torch.randn(4, 12), 4, False, 0)
    with pytest.raises(ValueError, match="group_size"):
        interp.pack(x.flatten(), 4, False, 0)
    payload = interp.pack(x, 4, False, 0)[:4]
    with pytest.raises(ValueError, match="float64"):
        interp.unpack(*payload, 4, torch.float64)
    with pytest.raises(ValueError, match="one entry per group"):
        interp.unpack(payload[0], payload[1][:2], payload[2], payload[3], 4, torch.float32)
    codes, lo, step, exponent, finite = interp.pack(torch.empty(0, 32), 2, True, 1)
    assert codes.shape == (0, 8) and lo.shape == step.shape == exponent.shape == (0,) and bool(finite)
    assert interp.unpack(codes, lo, step, exponent, 2, torch.float16).shape == (0, 32)
    # a non-contiguous input is packed as its contiguous copy
    wide = torch.randn(4, 64)
    assert _same(interp.pack(wide[:, ::2], 2, False, 0)[0], interp.pack(wide[:, ::2].contiguous(), 2, False, 0)[0])
    assert interp.available()


def test_plain_module_is_not_interpreted(interp):
    # the fixture's TRITON_INTERPRET does not leak into the environment or the imported module
    assert os.environ.get("TRITON_INTERPRET") == _ENV_AT_IMPORT
    if _ENV_AT_IMPORT in (None, "", "0"):
        assert not quant_triton.interpreted()
        assert quant_triton.available() == torch.cuda.is_available()
        with pytest.raises(ValueError, match="CUDA"):
            quant_triton.pack(torch.randn(2, 32), 4, False, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_kernels_match_reference_on_gpu(interp, dtype):
    if quant_triton.interpreted():
        pytest.skip("TRITON_INTERPRET is set for the whole session")
    x = _groups(dtype, 256)
    xc = x.cuda()
    for bits in BITS:
        got = quant_triton.pack(xc, bits, False, 0)
        assert got[4].is_cuda and bool(got[4])
        ref = quantize_groups(xc, bits, stochastic=False)
        _assert_payload(got, ref, bits)
        # the compiled kernels give the interpreter's bits (subnormal and huge groups included: no flush
        # to zero, no FMA contraction on the device), deterministic and stochastic
        cpu = interp.pack(x, bits, False, 0)
        assert all(_same(a.cpu(), b) for a, b in zip(got[:4], cpu[:4]))
        for payload in (got[:4], ref):
            out = quant_triton.unpack(*payload, bits, dtype)
            assert out.is_cuda and _same(out, _decoded_ref(payload, bits, dtype))
        stoch = quant_triton.pack(xc, bits, True, 1234)
        assert all(_same(a.cpu(), b) for a, b in zip(stoch[:4], interp.pack(x, bits, True, 1234)[:4]))
    sx = _stochastic_groups()
    for bits in BITS:
        codes, lo, step, exponent, _ = quant_triton.pack(sx.cuda(), bits, True, 99)
        assert torch.equal(codes.cpu(), _cuda_formula_codes(sx, lo.cpu(), step.cpu(), exponent.cpu(), bits, 99))
    bad = xc.clone()
    bad[5, 7] = float("nan")
    assert not bool(quant_triton.pack(bad, 4, False, 0)[4])


@pytest.mark.gpu
def test_quant_codec_on_cuda_takes_triton_in_auto_and_gives_the_reference_codes(monkeypatch):
    """``MEMCOMP_KERNELS=auto`` on a CUDA tensor runs the Triton kernels (the first CUDA variant) and gives the
    torch reference's payload and decoded tensor for deterministic rounding."""
    if quant_triton.interpreted():
        pytest.skip("TRITON_INTERPRET is set for the whole session")
    from lightning_memcomp import kernels
    from lightning_memcomp.compression import quant
    from lightning_memcomp.memory.engine import SaveContext
    from lightning_memcomp.compression.quant import QuantCodec

    x = torch.randn(8, 16, 33, 17, device="cuda", requires_grad=True)
    ctx = SaveContext("conv", torch.nn.Conv2d(16, 16, 3))
    payloads, decoded = {}, {}
    for mode in ("auto", "torch"):
        monkeypatch.setenv("MEMCOMP_KERNELS", mode)
        codec = QuantCodec(bits=4, stochastic=False)
        payloads[mode] = codec.encode(x, ctx)
        decoded[mode] = codec.decode(payloads[mode])
    for name in ("codes", "lo", "step", "exponent"):
        assert torch.equal(getattr(payloads["auto"], name), getattr(payloads["torch"], name)), name
    assert torch.equal(decoded["auto"], decoded["torch"])
    assert "triton:quant_triton" not in kernels._failed
    monkeypatch.setenv("MEMCOMP_KERNELS", "auto")
    seen = []
    monkeypatch.setattr(quant, "triton_failed", lambda name, err: seen.append(err))
    QuantCodec(bits=2).decode(QuantCodec(bits=2).encode(x, ctx))
    assert seen == []


def test_quant_codec_routes_cuda_tensors_through_triton(interp, monkeypatch):
    """The codec's CUDA route, run here on the interpreter: with a tensor that takes the CUDA branch, encode
    and decode go through the Triton module and give the torch reference's payload and values."""
    from lightning_memcomp.compression import quant
    from lightning_memcomp.compression.quant import QuantCodec
    from lightning_memcomp.memory.engine import SaveContext

    x = torch.randn(4, 8, 15, 9, requires_grad=True)
    ctx = SaveContext("conv", torch.nn.Conv2d(8, 8, 3))
    monkeypatch.setenv("MEMCOMP_KERNELS", "torch")
    ref = QuantCodec(bits=4, stochastic=False).encode(x, ctx)
    ref_out = QuantCodec(bits=4, stochastic=False).decode(ref)
    calls = []

    class Spy:
        def __getattr__(self, op):
            calls.append(op)
            return getattr(interp, op)

    monkeypatch.setenv("MEMCOMP_KERNELS", "auto")
    monkeypatch.setattr(quant, "_kernels", lambda t, dtype=None: (None, True))
    monkeypatch.setattr(quant, "use_triton_kernel", lambda name, t: Spy())
    monkeypatch.setattr(quant, "use_cuda_kernel", lambda name, t: pytest.fail("the CUDA extension was asked"))
    codec = QuantCodec(bits=4, stochastic=False)
    got = codec.encode(x, ctx)
    for name in ("codes", "lo", "step", "exponent"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert torch.equal(codec.decode(got), ref_out)
    assert calls == ["pack", "unpack"]
