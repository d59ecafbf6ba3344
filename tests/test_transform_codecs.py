"""Transform-domain activation compression (Vu et al.): wavelet, DCT and simple thresholding codecs."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import pywt
import scipy.fft
import torch
import torch.nn.functional as F
from torch import nn

from lightning_memcomp.compression import compress_activations, make_codec
from lightning_memcomp.compression.dct import DCTCodec
from lightning_memcomp.compression.threshold import ThresholdCodec, TopKPayload
from lightning_memcomp.compression.transforms import block_dct, block_idct, dct_matrix, dwt, dwt_matrix, idwt
from lightning_memcomp.compression.wavelet import WaveletCodec
from lightning_memcomp.memory.engine import SaveContext

CODECS = {
    "threshold": {},
    "dct": {"block": 16},
    "wavelet-haar": {"wavelet": "haar"},
    "wavelet-db3": {"wavelet": "db3"},
}
LAMBDAS = [1000, 100, 10, 2.5, 1.4, 1.1, 1]
CTX = SaveContext("layer", None)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# parameter-gradient cosine to plain PyTorch at lambda 10 on SmallCNN, batch 4, measured over seeds 0-4:
# threshold 0.765-0.835, dct 0.985-0.992, wavelet (haar, db3) 0.983-0.991; thresholds leave about 0.05 and 0.01
GRADIENT_COSINE_AT_10 = {"threshold": 0.7, "dct": 0.975, "wavelet-haar": 0.975, "wavelet-db3": 0.975}


def _codec(key: str, ratio: float, **extra):
    return make_codec(key.split("-")[0], compression_ratio=ratio, **CODECS[key], **extra)


def _round_trip(codec, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    return codec.decode(codec.encode(x, SaveContext("layer", module)))


@pytest.fixture(scope="module")
def smooth_images() -> torch.Tensor:
    """Digits upsampled to 64x64 (smooth), float64 so that round-off does not blur the comparison."""
    from recipes.classification.digits import load_digits_32

    x = load_digits_32(size=64)["test"][0][:6]
    return x.double()


# -- transforms ------------------------------------------------------------------------------------------
def test_dwt_2d_equals_pywavelets_wavedec2_periodization() -> None:
    x = torch.randn(2, 3, 24, 32, dtype=torch.float64)
    ref = pywt.wavedec2(x.numpy(), "db3", mode="periodization", level=2, axes=(-2, -1))
    expected, _ = pywt.coeffs_to_array(ref, axes=(-2, -1))
    assert np.allclose(dwt(x, "db3", 2).numpy(), expected, atol=1e-12)


def test_dwt_3d_equals_pywavelets_wavedecn_on_volumes() -> None:
    x = torch.randn(1, 2, 8, 16, 8, dtype=torch.float64)
    ref = pywt.wavedecn(x.numpy(), "haar", mode="periodization", level=3, axes=(-3, -2, -1))
    expected, _ = pywt.coeffs_to_array(ref, axes=(-3, -2, -1))
    assert np.allclose(dwt(x, "haar", 3).numpy(), expected, atol=1e-12)


def test_block_dct_equals_scipy_orthonormal_dctn_on_each_block() -> None:
    x = torch.randn(2, 3, 32, 16, dtype=torch.float64)
    coeffs = block_dct(x, (16, 8))
    block = x[:, :, 16:32, 8:16].numpy()
    expected = scipy.fft.dctn(block, axes=(-2, -1), norm="ortho")
    assert np.allclose(coeffs[:, :, 16:32, 8:16].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 21), (2, 3, 13, 7), (1, 2, 5, 9, 6)])
def test_transforms_invert_exactly_on_sizes_that_are_not_multiples(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    spatial = shape[2:]
    blocks = (4,) * len(spatial)
    assert torch.allclose(block_idct(block_dct(x, blocks), blocks, spatial), x, atol=1e-12)
    assert torch.allclose(idwt(dwt(x, "db2", 2), "db2", 2, spatial), x, atol=1e-12)


def test_transform_matrices_are_built_once_per_size_dtype_and_device() -> None:
    device = torch.device("cpu")
    assert dwt_matrix("db3", 32, torch.float32, device) is dwt_matrix("db3", 32, torch.float32, device)
    assert dct_matrix(16, torch.float32, device) is dct_matrix(16, torch.float32, device)
    before = dct_matrix.cache_info().misses
    codec = DCTCodec(10)
    for _ in range(3):
        codec.decode(codec.encode(torch.randn(2, 3, 32, 32), CTX))
    assert dct_matrix.cache_info().misses - before <= 1


# -- shared semantics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(CODECS))
def test_compression_ratio_one_gives_bit_identical_gradients(key: str, small_cnn) -> None:
    model = small_cnn()
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))

    def grads(ctx) -> list[torch.Tensor]:
        model.zero_grad()
        with ctx:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = grads(contextlib.nullcontext())
    name, options = key.split("-")[0], CODECS[key]
    got = grads(compress_activations(model, codec=name, compression_ratio=1, min_bytes=0, **options))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("key", list(CODECS))
def test_compression_ratio_one_stores_the_tensor_itself(key: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    codec = _codec(key, 1)
    assert codec.encode(x, CTX) is x


@pytest.mark.parametrize("key", list(CODECS))
def test_reconstruction_error_shrinks_as_lambda_shrinks_and_is_zero_at_one(key: str, smooth_images) -> None:
    errors = []
    for ratio in LAMBDAS:
        rec = _round_trip(_codec(key, ratio), smooth_images)
        errors.append(((rec - smooth_images).norm() / smooth_images.norm()).item())
    assert errors[-1] == 0.0
    # non-increasing down to the float64 round-off of a transform round trip (~1e-15)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > errors[3] > 0  # and it does change: lambda 1000 is much worse than 2.5


@pytest.mark.parametrize("key", ["dct", "wavelet-haar", "wavelet-db3"])
def test_transforms_beat_plain_thresholding_on_a_smooth_image_at_lambda_10(key: str, smooth_images) -> None:
    def error(codec_key: str) -> float:
        rec = _round_trip(_codec(codec_key, 10), smooth_images)
        return ((rec - smooth_images).norm() / smooth_images.norm()).item()

    assert error(key) < 0.5 * error("threshold")


@pytest.mark.parametrize("key", list(CODECS))
def test_kept_coefficients_are_floor_n_over_lambda(key: str) -> None:
    x = torch.randn(3, 4, 16, 16)
    payload = _codec(key, 7.3).encode(x, CTX)
    assert payload.coeffs.k == int(x.numel() // 7.3)


def test_per_sample_thresholding_keeps_floor_n_over_lambda_in_every_sample() -> None:
    x = torch.randn(4, 2, 8, 8)
    x[0] *= 100  # per tensor, the first sample would take everything
    codec = ThresholdCodec(10, per_sample=True)
    rec = _round_trip(codec, x)
    per_sample = (rec != 0).flatten(1).sum(1)
    assert per_sample.tolist() == [128 // 10] * 4
    whole = _round_trip(ThresholdCodec(10), x)
    assert (whole[1:] != 0).sum() == 0


def test_half_precision_values_store_fewer_bytes() -> None:
    x = torch.randn(2, 8, 32, 32)
    full = DCTCodec(10)
    half = DCTCodec(10, value_dtype="float16")
    assert half.stored_nbytes(half.encode(x, CTX)) < 0.75 * full.stored_nbytes(full.encode(x, CTX))
    assert half.decode(half.encode(x, CTX)).dtype == torch.float32


# -- masks: exact gradient routing ----------------------------------------------------------------------
@pytest.mark.parametrize("key", list(CODECS))
def test_relu_output_keeps_an_exact_mask_so_gradients_route_exactly(key: str) -> None:
    relu = nn.ReLU()
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    weight = torch.randn(2, 4, 16, 16)
    holder = nn.Sequential(relu)
    with compress_activations(holder, codec=key.split("-")[0], compression_ratio=1000, min_bytes=0,
                              **CODECS[key]):
        out = holder(x)
    (out * weight).sum().backward()
    assert torch.equal(x.grad, weight * (x.detach() > 0))


@pytest.mark.parametrize("module", [nn.LeakyReLU(0.1), nn.PReLU()])
def test_leaky_activations_route_gradients_exactly(module: nn.Module) -> None:
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    holder = nn.Sequential(module)
    expected_x = x.detach().clone().requires_grad_()
    weight = torch.randn(2, 4, 16, 16)
    (holder(expected_x) * weight).sum().backward()
    with compress_activations(holder, codec="dct", compression_ratio=1000, min_bytes=0):
        out = holder(x)
    (out * weight).sum().backward()
    assert torch.equal(x.grad, expected_x.grad)


def test_elu_input_keeps_its_sign_exactly() -> None:
    x = torch.randn(2, 4, 16, 16)
    codec = WaveletCodec(1000)
    rec = codec.decode(codec.encode(x, SaveContext("act", nn.ELU())))
    assert torch.equal(rec > 0, x > 0)


def test_relu6_keeps_both_bounds_exact() -> None:
    x = (torch.randn(2, 4, 16, 16) * 6).requires_grad_()
    holder = nn.Sequential(nn.ReLU6())
    weight = torch.randn(2, 4, 16, 16)
    with compress_activations(holder, codec="wavelet", compression_ratio=1000, min_bytes=0):
        out = holder(x)
    (out * weight).sum().backward()
    inside = (x.detach() > 0) & (x.detach() < 6)
    assert torch.equal(x.grad, weight * inside)


def test_functional_relu_inside_a_larger_module_gets_a_mask() -> None:
    x = torch.randn(2, 4, 16, 16)
    y = torch.relu(x.clone().requires_grad_())
    codec = DCTCodec(1000)
    payload = codec.encode(y, SaveContext("block", nn.Identity()))
    assert payload.mode == "positive"
    rec = codec.decode(payload)
    assert torch.equal(rec > 0, y.detach() > 0)


def test_hardswish_tensors_are_kept_exact() -> None:
    x = torch.randn(2, 4, 16, 16)
    codec = WaveletCodec(100)
    assert codec.encode(x, SaveContext("act", nn.Hardswish())) is x


# -- shapes, dtypes, layouts ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("key", list(CODECS))
def test_decode_restores_shape_and_dtype(key: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 10, 12).to(dtype)
    rec = _round_trip(_codec(key, 10), x)
    assert rec.shape == x.shape
    assert rec.dtype == dtype
    # the values too: the reconstruction error in this dtype is the float32 one up to the dtype's rounding
    ref = _round_trip(_codec(key, 10), x.float())
    err = float((rec.double() - x.double()).norm() / x.double().norm())
    ref_err = float((ref.double() - x.double()).norm() / x.double().norm())
    assert 0 < err < 1 and abs(err - ref_err) < 0.02, (err, ref_err)


def test_decode_keeps_channels_last() -> None:
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    rec = _round_trip(DCTCodec(10), x)
    assert rec.is_contiguous(memory_format=torch.channels_last)


def test_wavelet_codec_transforms_volumes_in_3d() -> None:
    x = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64)
    coeffs, levels = WaveletCodec(10, wavelet="haar", levels=2).forward_transform(x)
    ref = pywt.wavedecn(x.numpy(), "haar", mode="periodization", level=2, axes=(-3, -2, -1))
    expected, _ = pywt.coeffs_to_array(ref, axes=(-3, -2, -1))
    assert levels == 2
    assert np.allclose(coeffs.numpy(), expected, atol=1e-12)


def test_dct_codec_uses_3d_blocks_on_volumes() -> None:
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    coeffs, blocks = DCTCodec(10, block=16).forward_transform(x)
    expected = scipy.fft.dctn(x.numpy(), axes=(-3, -2, -1), norm="ortho")
    assert blocks == (16, 16, 16)
    assert np.allclose(coeffs.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("codec", [WaveletCodec(10), DCTCodec(10)])
def test_transform_codecs_pass_2d_tensors_through(codec) -> None:
    flat = torch.randn(8, 256, requires_grad=True)
    assert not codec.accepts(flat, CTX)
    assert codec.accepts(torch.randn(8, 4, 16, requires_grad=True), CTX)  # [N, C, L]: 1-D transform


def test_threshold_codec_accepts_2d_tensors() -> None:
    flat = torch.randn(8, 256, requires_grad=True)
    assert ThresholdCodec(10).accepts(flat, CTX)
    assert _round_trip(ThresholdCodec(4), flat.detach()).count_nonzero() == 8 * 256 // 4


def test_too_many_levels_are_clipped_with_a_warning() -> None:
    codec = WaveletCodec(1.0001, wavelet="db3", levels=3)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="levels=3 is too deep"):
        payload = codec.encode(x, CTX)
    assert payload.meta == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codec.encode(x, CTX)  # once per shape
    assert torch.allclose(codec.decode(payload), x, atol=1e-2)


def test_stored_bytes_count_coefficients_masks_and_header() -> None:
    x = torch.relu(torch.randn(2, 4, 16, 16))
    codec = DCTCodec(10)
    payload = codec.encode(x, SaveContext("relu", nn.ReLU()))
    assert isinstance(payload, TopKPayload)
    tensors = payload.coeffs.values.nbytes + payload.coeffs.index.nbytes + payload.masks[0].nbytes
    assert codec.stored_nbytes(payload) > tensors
    assert codec.stored_nbytes(payload) <= tensors + 64


@pytest.mark.parametrize("key", list(CODECS))
def test_a_small_cnn_at_lambda_10_stores_under_a_fifth(key: str, small_cnn) -> None:
    model = small_cnn()
    name = key.split("-")[0]
    x = torch.randn(4, 1, 32, 32)
    model(x).sum().backward()  # plain PyTorch, no hooks
    ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    # the transform everywhere (no fallback to quant where it is inaccurate): this test is about the transform
    with compress_activations(model, codec=name, compression_ratio=10, policy={"transform_max_error": None},
                              **CODECS[key]) as ledger:
        loss = model(x).sum()
    loss.backward()
    compressed = ledger.by_codec()[name]
    assert compressed.stored_bytes <= 0.2 * compressed.raw_bytes
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > GRADIENT_COSINE_AT_10[key]


# -- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.5, 0, -3, float("nan"), float("inf"), True, "10"])
@pytest.mark.parametrize("name", ["threshold", "dct", "wavelet"])
def test_compression_ratio_below_one_or_not_a_number_is_refused(name: str, ratio) -> None:
    with pytest.raises(ValueError, match="compression_ratio="):
        make_codec(name, compression_ratio=ratio)


def test_unknown_wavelet_is_refused_with_the_valid_families() -> None:
    with pytest.raises(ValueError, match=r"wavelet='db99'.*haar.*db1\.\.db38.*sym.*coif"):
        WaveletCodec(wavelet="db99")


def test_biorthogonal_wavelets_are_refused() -> None:
    with pytest.raises(ValueError, match="bior1.3"):
        WaveletCodec(wavelet="bior1.3")


@pytest.mark.parametrize("levels", [0, -1, 2.0, True])
def test_levels_must_be_a_positive_integer(levels) -> None:
    with pytest.raises(ValueError, match="levels="):
        WaveletCodec(levels=levels)


@pytest.mark.parametrize("block", [0, (16, 0), "16", (1, 2, 3, 4)])
def test_block_must_be_positive_integers(block) -> None:
    with pytest.raises(ValueError, match="block="):
        DCTCodec(block=block)


def test_block_tuple_of_the_wrong_rank_is_refused_at_encode() -> None:
    with pytest.raises(ValueError, match=r"block=\(8, 8\)"):
        DCTCodec(10, block=(8, 8)).encode(torch.randn(1, 2, 8, 8, 8), CTX)


def test_value_dtype_must_be_a_float_type() -> None:
    with pytest.raises(ValueError, match="value_dtype="):
        ThresholdCodec(value_dtype="int8")


# -- GPU ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("key", list(CODECS))
def test_encode_on_cuda_matches_cpu_and_never_syncs_the_host(key: str) -> None:
    x = torch.relu(torch.randn(4, 8, 32, 32, dtype=torch.float64))
    ctx = SaveContext("relu", nn.ReLU())
    codec = _codec(key, 10)
    expected = codec.decode(codec.encode(x, ctx))
    xc = x.cuda()
    codec.decode(codec.encode(xc, ctx))  # warm-up: transform matrices are built and cached here
    torch.cuda.set_sync_debug_mode("error")
    try:
        payload = codec.encode(xc, ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = codec.decode(payload)
    assert got.device.type == "cuda"
    assert torch.allclose(got.cpu(), expected, atol=1e-10)
