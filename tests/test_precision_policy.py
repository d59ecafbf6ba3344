"""Default coverage (everything the forward saves) and the precision policy (smooth activations keep their
derivative), against plain PyTorch without hooks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_memcomp import compress_activations
from lightning_memcomp.compression.smooth import PrecisionPolicy, _activation, derivative_table

ACTIVATIONS = [
    ("silu", (), lambda x: F.silu(x)),
    ("gelu", ("none",), lambda x: F.gelu(x)),
    ("gelu", ("tanh",), lambda x: F.gelu(x, approximate="tanh")),
    ("hardswish", (), lambda x: F.hardswish(x)),
    ("hardsigmoid", (), lambda x: F.hardsigmoid(x)),
    ("mish", (), lambda x: F.mish(x)),
    ("softplus", (1.0, 20.0), lambda x: F.softplus(x)),
    ("elu", (1.0,), lambda x: F.elu(x)),
    ("leaky_relu", (0.01,), lambda x: F.leaky_relu(x)),
    ("sigmoid", (), lambda x: torch.sigmoid(x)),
    ("tanh", (), lambda x: x.tanh()),
]


class _Wrap(nn.Module):
    """A linear layer, then the activation called as a function in this module's own forward."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x))


def _grads(model, x, context=None):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    if context is None:
        out = model(x)
    else:
        with context:
            out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return x.grad, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name,params,fn", ACTIVATIONS, ids=lambda v: v if isinstance(v, str) else "")
def test_each_activation_keeps_its_derivative_within_the_table_error(name, params, fn):
    torch.manual_seed(0)
    model = _Wrap(fn)
    x = torch.randn(32, 64) * 2
    ref_x, ref_p = _grads(model, x)
    engine = compress_activations(model, "quant", bits=8, min_bytes=0)
    got_x, got_p = _grads(model, x, engine)
    derivative = engine.ledger.by_codec().get("derivative")
    assert derivative is not None and derivative.raw_bytes == 32 * 64 * 4  # the activation's one save
    from lightning_memcomp.compression.smooth import _codec

    bits = _codec(name, params, 8).bits  # 8, or 1 for two-valued derivatives
    assert derivative.stored_bytes == 32 * 64 * bits // 8
    # grad_h = grad_y * level, |level - f'(h)| <= half the widest gap: the error of the input gradient is bounded
    # by that times |grad_y| propagated through the linear layer's weight
    table = derivative_table(name, params, 8)
    bound = table.max_error * torch.linspace(-1, 1, 64).abs().max() * model.lin.weight.abs().sum(0).max()
    assert (got_x - ref_x).abs().max() <= bound + 1e-6
    cosine = F.cosine_similarity(torch.cat([g.flatten() for g in got_p]), torch.cat([g.flatten() for g in ref_p]),
                                 dim=0)
    assert cosine > 0.999  # measured >= 0.9999 for every activation (the linear input is 8-bit)


def test_module_calls_and_in_place_calls_are_covered():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.SiLU(inplace=True), nn.Linear(64, 64), nn.Hardswish(inplace=True),
                          nn.Linear(64, 8), nn.GELU())
    x = torch.randn(64, 64)
    ref_x, ref_p = _grads(model, x)
    engine = compress_activations(model, "quant", bits=8, min_bytes=0)
    got_x, got_p = _grads(model, x, engine)
    assert engine.ledger.by_codec()["derivative"].count == 3
    for g, r in zip([got_x, *got_p], [ref_x, *ref_p]):
        error = float((g - r).norm() / r.norm())
        # measured at most 1.2e-2, mostly from the 8-bit linear inputs (nearest rounding over groups of 256)
        assert error < 2.5e-2, error


def test_policy_off_and_identity_codec_save_inputs():
    model = _Wrap(F.silu)
    x = torch.randn(32, 64)
    for engine in (compress_activations(model, "quant", policy="off", min_bytes=0),
                   compress_activations(model, "identity", min_bytes=0)):
        _grads(model, x, engine)
        assert "derivative" not in engine.ledger.by_codec()
    off, _ = _grads(model, x, compress_activations(model, "identity", min_bytes=0))
    torch.testing.assert_close(off, _grads(model, x)[0], rtol=0, atol=0)


def test_a_sigmoid_output_used_again_gets_its_own_pack():
    """x * sigmoid(x): sigmoid's save is derivative codes, the multiply's save of the same storage is not."""
    torch.manual_seed(0)
    model = _Wrap(lambda h: h * torch.sigmoid(h))
    x = torch.randn(32, 64)
    ref_x, _ = _grads(model, x)
    engine = compress_activations(model, "quant", bits=8, min_bytes=0)
    got_x, _ = _grads(model, x, engine)
    codecs = engine.ledger.by_codec()
    assert codecs["derivative"].count == 1 and codecs["quant"].count >= 2
    torch.testing.assert_close(got_x, ref_x, rtol=0, atol=5e-3)  # measured 9e-4


@pytest.mark.parametrize("name,params,fn", ACTIVATIONS, ids=lambda v: v if isinstance(v, str) else "")
def test_representatives_have_the_levels_as_pytorchs_derivative(name, params, fn):
    table = derivative_table(name, params, 4)
    reps = table.representatives.float().requires_grad_(True)
    saved_is_result = name in ("sigmoid", "tanh")
    if saved_is_result:
        # PyTorch's formula reads the result: grad_of is written in it
        got = _activation(name, params).grad_of(table.representatives)
    else:
        fn(reps).sum().backward()
        got = reps.grad.double()
    torch.testing.assert_close(got, table.levels, rtol=0, atol=1e-5)
    assert torch.all(table.levels[1:] > table.levels[:-1])


@settings(max_examples=40, deadline=None)
@given(
    which=st.integers(0, len(ACTIVATIONS) - 1),
    bits=st.sampled_from([1, 2, 4, 8]),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    scale=st.sampled_from([1e-3, 0.3, 1.0, 4.0, 30.0]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_codes_decode_to_the_nearest_level(which, bits, shape, scale, dtype):
    name, params, fn = ACTIVATIONS[which]
    from lightning_memcomp.compression.smooth import _codec

    codec = _codec(name, params, bits)
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    saved = _activation(name, params).saved_of(x.double()).to(dtype)
    payload = codec.encode(saved, None)
    decoded = codec.decode(payload)
    assert decoded.shape == saved.shape and decoded.dtype == dtype
    true = codec.table.grad_of(saved.float()).double()
    got = codec.table.grad_of(decoded.double())
    nearest = codec.table.levels[torch.argmin((true.reshape(-1, 1) - codec.table.levels).abs(), dim=1)]
    # the decoded value's derivative is the level nearest to the true derivative (to the dtype's rounding of the
    # representative), so never further from it than the nearest level is
    tol = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 2e-2}[dtype]
    tol += 2 * codec.table.lut_error  # smooth derivatives are coded through a lookup over a fine grid of saved values
    assert torch.all((got - true).abs().reshape(-1) <= (nearest - true.reshape(-1)).abs() + tol)


def test_non_finite_saved_values_are_kept_as_they_are():
    model = _Wrap(F.silu)
    x = torch.randn(16, 64)
    x[3, 5] = float("nan")
    engine = compress_activations(model, "quant", min_bytes=0)
    _grads(model, x, engine)
    assert "derivative" not in engine.ledger.by_codec()
    assert engine.ledger.left_as_is().get("declined by codec", 0) >= 16 * 64 * 4


class _Block(nn.Module):
    """ConvNeXt-style: depthwise conv, permute + LayerNorm, functional GELU and a layer-scale multiply in forward."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.fc2(F.gelu(self.fc1(h))) * self.gamma
        return x + h.permute(0, 3, 1, 2)


def test_default_covers_container_code_and_reports_what_a_selection_leaves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _Block(), _Block())
    x = torch.randn(4, 3, 32, 32)
    ref_x, ref_p = _grads(model, x)
    engine = compress_activations(model)  # defaults: quant 4 bits, every module, the policy
    got_x, got_p = _grads(model, x, engine)
    ledger = engine.ledger
    assert ledger.left_as_is().get("not selected", 0) == 0
    assert ledger.passthrough_bytes <= 0.1 * ledger.raw_bytes
    assert sum(ledger.left_as_is().values()) == ledger.passthrough_bytes
    assert ledger.raw_bytes / ledger.stored_bytes > 5  # measured 6.7x
    cosine = F.cosine_similarity(torch.cat([g.flatten() for g in got_p]), torch.cat([g.flatten() for g in ref_p]),
                                 dim=0)
    assert cosine > 0.99  # measured 0.9985

    selected = compress_activations(model, modules=[nn.Conv2d])
    _grads(model, x, selected)
    left = selected.ledger.left_as_is()
    # the multiply by gamma and the GELU in the block's forward, LayerNorm's and the linears' inputs
    assert left.get("not selected", 0) > 0.5 * selected.ledger.raw_bytes
    assert "not selected" in selected.ledger.table()


@pytest.mark.parametrize("bad", ["fast", 3, {"smooth": "yes"}, {"derivative_bits": 3}])
def test_bad_policy_is_refused_with_the_option_named(bad):
    with pytest.raises((ValueError, TypeError), match="policy|smooth|derivative_bits"):
        compress_activations(nn.Linear(4, 4), policy=bad)


def test_policy_repr_names_its_fields():
    assert repr(PrecisionPolicy()) == (
        "PrecisionPolicy(smooth=True, derivative_bits=8, transform_max_error=0.1, fallback_bits=4)")
    assert math.isclose(derivative_table("hardsigmoid", (), 1).max_error, 1 / 12)


# -- transform codecs: where they are accurate, quantization elsewhere ------------------------------------
def _smooth_and_noise():
    torch.manual_seed(0)
    smooth = F.interpolate(torch.randn(2, 8, 4, 4), size=(32, 32), mode="bicubic", align_corners=False)
    return smooth, torch.randn(2, 8, 32, 32)


@pytest.mark.parametrize("codec", ["dct", "wavelet", "threshold"])
def test_relative_error_from_energies_matches_the_decoded_error(codec):
    from lightning_memcomp.compression import make_codec
    from lightning_memcomp.compression.fallback import relative_error
    from lightning_memcomp.memory.engine import SaveContext

    transform = make_codec(codec, compression_ratio=4)
    smooth, noise = _smooth_and_noise()
    # 28x28: a 3-level wavelet pads it to 32x32, where energies no longer give the error (decoded instead)
    padded = F.avg_pool2d(torch.randn(4, 16, 32, 32), 5, 1) + 0.5
    for x in (smooth, noise, padded):
        ctx = SaveContext("conv", nn.Conv2d(x.shape[1], 8, 3))
        payload = transform.encode(x, ctx)
        actual = float((transform.decode(payload) - x).norm() / x.norm())
        # orthonormal transforms: the energy estimate is the decoded error (measured within 2e-6)
        assert relative_error(transform, payload, x) == pytest.approx(actual, abs=1e-4)


@pytest.mark.parametrize("codec", ["dct", "wavelet", "threshold"])
def test_transform_kept_where_accurate_and_quant_elsewhere(codec):
    smooth, noise = _smooth_and_noise()
    if codec == "threshold":  # no transform: accurate where the tensor itself is sparse
        smooth = F.relu(noise - 1.5)
    model = nn.Conv2d(8, 8, 3, padding=1)
    for x, expected in ((smooth, codec), (noise, "quant")):
        with compress_activations(model, codec, compression_ratio=4, min_bytes=0) as ledger:
            model(x.requires_grad_(True))
        assert set(ledger.by_codec()) == {expected}, (codec, expected, ledger.by_codec())
    engine = compress_activations(model, codec, compression_ratio=4, policy={"transform_max_error": None})
    assert "TransformOrQuant" not in repr(engine.codecs())
    assert "max_error=0.1" in repr(compress_activations(model, codec).codecs())


def test_bad_transform_max_error_is_refused():
    with pytest.raises(ValueError, match="transform_max_error=2"):
        compress_activations(nn.Linear(4, 4), "dct", policy={"transform_max_error": 2})


def test_double_backward_through_derivative_codes_is_refused_not_wrong():
    model = _Wrap(torch.tanh)
    x = torch.randn(8, 64, requires_grad=True)
    with compress_activations(model, "quant", bits=8, min_bytes=0):
        out = model(x)
    with pytest.raises(RuntimeError, match="first-order gradients only.*policy='off'"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with compress_activations(model, "quant", bits=8, min_bytes=0, policy="off"):
        out = model(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    gx.sum().backward()  # second order works with the policy off
    assert model.lin.weight.grad is not None


def test_channels_last_activations_keep_derivative_codes_and_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Hardswish())
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    ref_x, ref_p = _grads(model, x)
    engine = compress_activations(model, "quant", bits=8, min_bytes=0)
    got_x, got_p = _grads(model, x, engine)
    assert engine.ledger.by_codec()["derivative"].count == 2
    for g, r in zip([got_x, *got_p], [ref_x, *ref_p]):
        assert float((g - r).norm() / r.norm()) < 2.5e-2  # measured at most 6e-3
    from lightning_memcomp.compression.smooth import _codec

    codec = _codec("silu", (), 8)
    h = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    decoded = codec.decode(codec.encode(h, None))
    assert decoded.is_contiguous(memory_format=torch.channels_last) and decoded.shape == h.shape


def test_two_valued_derivatives_take_one_bit_and_in_place_elu_uses_its_output():
    from lightning_memcomp.compression.smooth import _codec, smooth_call

    assert _codec("leaky_relu", (0.01,), 8).bits == 1 and _codec("hardsigmoid", (), 8).bits == 1
    assert _codec("silu", (), 8).bits == 8
    assert smooth_call(F.elu, (torch.ones(1),), {"inplace": True})[0] == "elu_result"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ELU(inplace=True), nn.Linear(64, 8))
    x = torch.randn(32, 64)
    ref_x, _ = _grads(model, x)
    got_x, _ = _grads(model, x, compress_activations(model, "quant", bits=8, min_bytes=0))
    assert float((got_x - ref_x).norm() / ref_x.norm()) < 1e-2  # measured 2.5e-3


def test_a_compiled_function_inside_the_engine_is_left_to_dynamo():
    """Dynamo does not trace into the policy's mode (tracing into it broke the graph on the level tables' unique and
    nonzero: 15 graphs for this function): one graph without the engine, one more with its mode active."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(lambda h: F.silu(h) * 2, backend="eager")
    model = _Wrap(fn)
    x = torch.randn(16, 64)
    ref_x, _ = _grads(model, x)
    engine = compress_activations(model, "quant", bits=8, min_bytes=0)
    got_x, _ = _grads(model, x, engine)
    assert counters["stats"]["unique_graphs"] == 2  # Dynamo guards on the torch-function mode stack
    assert float((got_x - ref_x).norm() / ref_x.norm()) < 2e-2
