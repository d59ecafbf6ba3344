"""Transform codecs (threshold, dct, wavelet) encode and decode span by span with bounded memory, and give
what the full-tensor implementation they replace gave."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lightning_memcomp.compression import make_codec, sparse
from lightning_memcomp.compression.threshold import TopKPayload, _step_towards, mask_mode
from lightning_memcomp.memory.engine import SaveContext

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

CODECS = {
    "threshold": ("threshold", {}),
    "dct": ("dct", {}),
    "dct-8": ("dct", {"block": 8}),
    "wavelet-haar": ("wavelet", {"wavelet": "haar"}),
    "wavelet-db3": ("wavelet", {"wavelet": "db3", "levels": 2}),
}
MODULES = {"none": None, "relu": nn.ReLU(), "elu": nn.ELU(), "relu6": nn.ReLU6()}


@pytest.fixture(params=["one span", "short spans", "short spans, device path"])
def spans(request, monkeypatch):
    """Default spans (small tensors: one span, torch.topk), or spans of 256 entries with radix select from
    rows of 65 entries on (several spans per row and per sample, maps split across spans), also with the
    accelerator's sync-free path (device-side offsets) run on the CPU."""
    if request.param != "one span":
        monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 256)
        monkeypatch.setattr(sparse, "SMALL_ROW", 64)
    if request.param.endswith("device path"):
        monkeypatch.setattr(sparse, "DEVICE_PATH_ON_CPU", True)
    return request.param


def reference_round_trip(codec, x: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    """The full-tensor implementation this replaced: transform the whole tensor, ``torch.topk`` over it,
    a dense inverse, then the exact routing masks (``threshold.py`` before the span-by-span rewrite)."""
    mode = mask_mode(x, module)
    if codec.compression_ratio == 1 or mode == "exact":
        return x
    coeffs, meta = codec.forward_transform(x)
    rows = x.shape[0] if codec.per_sample and x.dim() >= 2 else 1
    k = codec.keep_count(x.numel() // rows)
    y = coeffs.reshape(rows, -1)
    value_dtype = codec.value_dtype or x.dtype
    scale = None
    if value_dtype == torch.float16:
        amax = coeffs.abs().amax().float()
        scale = torch.exp2(-torch.ceil(torch.log2(amax / 32768.0)).clamp(min=0))
        y = y * scale.to(y.dtype)
    idx = y.abs().topk(k, dim=1).indices
    kept = torch.zeros_like(y).scatter_(1, idx, y.gather(1, idx))
    if value_dtype == torch.float16 and kept.dtype != torch.float16:
        kept = kept.clamp(-65504, 65504)
    kept = kept.to(value_dtype).to(y.dtype)
    if scale is not None:
        kept = kept.to(torch.promote_types(kept.dtype, torch.float32)) / scale
    rec = codec.inverse_transform(kept.reshape(coeffs.shape), meta, tuple(x.shape))
    limit = torch.finfo(x.dtype).max
    rec = rec.clamp(-limit, limit).to(x.dtype)
    tiny = torch.nextafter(rec.new_zeros(()), rec.new_ones(()))
    if mode == "positive":
        rec = torch.where(x > 0, rec.clamp_min(tiny), rec.new_zeros(()))
    elif mode == "sign":
        rec = torch.where(x > 0, rec.clamp_min(tiny), rec.clamp_max(0))
    elif mode == "band":
        lo, hi = float(module.min_val), float(module.max_val)
        inner = rec.clamp(_step_towards(lo, hi, rec.dtype), _step_towards(hi, lo, rec.dtype))
        rec = torch.where(x <= lo, rec.new_full((), lo), torch.where(x >= hi, rec.new_full((), hi), inner))
    return rec


def _input(shape, module_key: str, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if module_key == "relu":
        x = torch.relu(x)
    elif module_key == "relu6":
        x = x * 4
    return x.to(dtype)


def _round_trip(codec, x, module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # wavelet: levels clipped for small maps
        return codec.decode(codec.encode(x, SaveContext("layer", module)))


@pytest.mark.parametrize("module_key", list(MODULES))
@pytest.mark.parametrize("key", list(CODECS))
@pytest.mark.parametrize("shape", [(3, 5, 16, 16), (2, 3, 7, 9), (2, 4, 40), (1, 2, 6, 8, 8)])
def test_span_by_span_equals_the_full_tensor_implementation(spans, key, module_key, shape) -> None:
    """Random data (no ties): the same coefficients are kept, so the reconstructions agree to round-off."""
    name, options = CODECS[key]
    module = MODULES[module_key]
    x = _input(shape, module_key)
    for ratio in (1.05, 2.5, 10, 100):
        codec = make_codec(name, compression_ratio=ratio, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            expected = reference_round_trip(codec, x, module)
        got = _round_trip(codec, x, module)
        assert got.shape == x.shape and got.dtype == x.dtype
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        if module_key == "relu":
            assert torch.equal(got > 0, x > 0)


@pytest.mark.parametrize("options", [{"per_sample": True}, {"value_dtype": "float16"}, {"value_dtype": "bfloat16"},
                                     {"per_sample": True, "value_dtype": "float16"}])
@pytest.mark.parametrize("key", ["threshold", "dct", "wavelet-haar"])
def test_options_equal_the_full_tensor_implementation(spans, key, options) -> None:
    name, base = CODECS[key]
    x = _input((4, 6, 12, 12), "none") * 1000
    for ratio in (1.5, 10):
        codec = make_codec(name, compression_ratio=ratio, **base, **options)
        expected = reference_round_trip(codec, x, None)
        torch.testing.assert_close(_round_trip(codec, x, None), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("key", ["threshold", "dct", "wavelet-db3"])
def test_other_dtypes_equal_the_full_tensor_implementation(spans, key, dtype) -> None:
    name, options = CODECS[key]
    x = _input((2, 4, 16, 16), "relu", dtype)
    codec = make_codec(name, compression_ratio=4, **options)
    got = _round_trip(codec, x, nn.ReLU())
    expected = reference_round_trip(codec, x, nn.ReLU())
    assert got.dtype == dtype
    # float16/bfloat16 simple thresholding ties often at this ratio: compare the errors, not the values
    err = float((got.double() - x.double()).norm())
    ref = float((expected.double() - x.double()).norm())
    assert abs(err - ref) <= 1e-3 * float(x.double().norm())
    if dtype == torch.float64 or key != "threshold":
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_per_sample_keeps_k_in_every_sample_across_spans(spans) -> None:
    x = _input((4, 3, 10, 10), "none")
    x[0] *= 100
    rec = _round_trip(make_codec("threshold", compression_ratio=10, per_sample=True), x, None)
    assert (rec != 0).flatten(1).sum(1).tolist() == [300 // 10] * 4


@pytest.mark.parametrize("key", ["threshold", "dct", "wavelet-haar"])
def test_nan_in_a_late_span_keeps_the_tensor_as_it_is(spans, key) -> None:
    name, options = CODECS[key]
    x = _input((3, 4, 16, 16), "none")
    x[2, 3, 15, 15] = float("nan")
    codec = make_codec(name, compression_ratio=10, **options)
    assert codec.encode(x, SaveContext("layer", None)) is x


@pytest.mark.parametrize("key", ["threshold", "dct", "wavelet-haar"])
def test_decode_keeps_the_memory_order(spans, key) -> None:
    name, options = CODECS[key]
    codec = make_codec(name, compression_ratio=5, **options)
    x = _input((2, 8, 16, 16), "relu").contiguous(memory_format=torch.channels_last)
    rec = _round_trip(codec, x, nn.ReLU())
    assert rec.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(rec > 0, x > 0)
    torch.testing.assert_close(rec, reference_round_trip(codec, x, nn.ReLU()), rtol=1e-5, atol=1e-5)
    if key == "threshold":
        t = _input((24, 40), "relu").t()  # a transpose: dense, not row-major
        rec = _round_trip(codec, t, nn.ReLU())
        assert rec.stride() == t.stride()
        torch.testing.assert_close(rec, reference_round_trip(codec, t, nn.ReLU()))
        per_sample = make_codec(name, compression_ratio=5, per_sample=True)
        torch.testing.assert_close(_round_trip(per_sample, t, None), reference_round_trip(per_sample, t, None))


def test_payload_bytes_do_not_depend_on_the_spans(monkeypatch) -> None:
    x = _input((4, 8, 16, 16), "relu")
    sizes = []
    for budget in (sparse.CHUNK_ELEMENTS, 300):
        monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", budget)
        for name, options in CODECS.values():
            payload = make_codec(name, compression_ratio=10, **options).encode(x, SaveContext("relu", nn.ReLU()))
            assert isinstance(payload, TopKPayload)
            sizes.append(payload.nbytes)
    assert sizes[: len(CODECS)] == sizes[len(CODECS):]


# -- memory ----------------------------------------------------------------------------------------------
MEMORY_SCRIPT = r"""
import json, torch
from torch import nn
from lightning_memcomp.compression import make_codec
from lightning_memcomp.memory.engine import SaveContext
from lightning_memcomp.compression.transforms import release_scratch
from lightning_memcomp.memory.readings import peak_rss, process_rss, reset_peak_rss

torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.relu(torch.randn(32, 64, 128, 128))  # 128 MiB of float32
result = {}
for name, module in [("threshold", None), ("dct", nn.ReLU()), ("wavelet", nn.ELU())]:
    codec = make_codec(name, compression_ratio=10)
    ctx = SaveContext("layer", module)
    codec.decode(codec.encode(x[:2], ctx))  # warm-up: transform matrices, kernels
    release_scratch()  # the reused span buffers count too: built afresh below
    assert reset_peak_rss()
    base = process_rss()
    payload = codec.encode(x, ctx)
    encode = peak_rss() - base
    release_scratch()
    reset_peak_rss()
    base = process_rss()
    out = codec.decode(payload)
    decode = peak_rss() - base
    result[name] = {"encode": encode, "decode": decode, "payload": codec.stored_nbytes(payload),
                    "output": out.numel() * out.element_size()}
    del payload, out
print(json.dumps(result))
"""
MiB = 1 << 20
#: what encode may add beyond the payload, and decode beyond the output: a few spans of temporaries, the
#: reused span buffers (``shared_scratch``, released before each measure so that they count) included.
#: Measured (CHUNK_ELEMENTS = 512 Ki entries, 2 MiB of float32 per span; MALLOC_MMAP_THRESHOLD_=64 KiB):
#: threshold +6 to +11 / +3.0 MiB, dct (ReLU mask) +10 to +13 / +9.5 MiB, wavelet (sign mask) +12 to +15 /
#: +15.1 MiB (encode / decode, over five runs), payloads 16.8-20.8 MiB. The full-tensor implementation
#: before it, same script:
#: encode +678 / +806 / +806 MiB, decode +224 / +544 / +672 MiB (the 128 MiB output included).
SLACK = 24 * MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_encode_and_decode_of_a_128_mib_tensor_stay_within_payload_and_output_plus_a_few_spans() -> None:
    # a fresh process, with every large block mapped on its own, so that RSS follows what is live
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=900, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, m in result.items():
        assert m["encode"] <= m["payload"] + SLACK, (name, {k: round(v / MiB, 1) for k, v in m.items()})
        assert m["decode"] <= m["output"] + SLACK, (name, {k: round(v / MiB, 1) for k, v in m.items()})
        assert m["payload"] <= math.ceil(0.2 * 128 * MiB)
