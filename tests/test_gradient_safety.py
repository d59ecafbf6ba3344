"""Never a silently wrong gradient: one test (or more) per finding of issue 13.

Every numerical reference here is plain PyTorch with no saved-tensor hooks installed (hooks switch off
PyTorch's own in-place check, so hooks against hooks would prove little).
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

from lightning_memcomp import Codec, SavedTensorEngine, track_saved_tensors
from lightning_memcomp.compression import compress_activations
from lightning_memcomp.compression.registry import make_codec
from lightning_memcomp.memory.engine import SaveContext

INPLACE_MESSAGE = "modified by an inplace operation"
LOSSY = [("quant", {"bits": 4}), ("blpa", {"bits": 4}), ("dct", {"compression_ratio": 4}),
         ("wavelet", {"compression_ratio": 4}), ("threshold", {"compression_ratio": 4})]
ALL_CODECS = [("identity", {}), *LOSSY, ("quant", {"bits": 8}), ("blpa", {"bits": 8})]


def _engine(model: nn.Module, name: str, options: dict, **kwargs) -> SavedTensorEngine:
    if name == "identity":
        return track_saved_tensors(model, **kwargs)
    return compress_activations(model, name, **options, **kwargs)


def _param_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


# -- 1. in-place changes after a save ---------------------------------------------------------------
class _SigmoidThenScaleInPlace(nn.Module):
    """``z = sigmoid(conv(x)); z.mul_(2)`` inside forward: ``z`` is gone by the time backward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.act(self.conv(x))
        z.mul_(2)
        return z.sum()


@pytest.mark.parametrize(("name", "options"), ALL_CODECS, ids=lambda v: str(v))
def test_inplace_change_of_a_saved_tensor_raises_pytorchs_error(name, options):
    torch.manual_seed(0)
    model = _SigmoidThenScaleInPlace()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(RuntimeError, match=INPLACE_MESSAGE):  # plain PyTorch, no hooks
        model(x).backward()
    model.zero_grad()
    with _engine(model, name, options, min_bytes=0):
        loss = model(x)
    with pytest.raises(RuntimeError, match=rf"{INPLACE_MESSAGE}.*SigmoidBackward0.*module 'act'"):
        loss.backward()


@pytest.mark.parametrize(("name", "options"), ALL_CODECS, ids=lambda v: str(v))
def test_inplace_change_of_a_multiply_input_raises(name, options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    w = torch.randn(1, 8, 16, 16, requires_grad=True)
    x = torch.randn(2, 3, 16, 16)
    h = model(x)
    out = h * w
    h.relu_()
    with pytest.raises(RuntimeError, match=INPLACE_MESSAGE):
        out.sum().backward()
    with _engine(model, name, options, min_bytes=0):
        h = model(x)
        out = h * w
        h.relu_()
    with pytest.raises(RuntimeError, match=INPLACE_MESSAGE):
        out.sum().backward()


@pytest.mark.parametrize("network", ["resnet18", "densenet121", "mobilenet_v3_small", "efficientnet_b0"])
def test_no_false_alarm_on_networks_with_legitimate_inplace_ops(network):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, network)(num_classes=10).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    torch.manual_seed(1)  # the same dropout masks in both passes
    nn.functional.cross_entropy(model(x), y).backward()
    ref = _param_grads(model)
    model.zero_grad()
    torch.manual_seed(1)
    with track_saved_tensors(model, min_bytes=0):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()  # raises on a false alarm
    assert torch.equal(_param_grads(model), ref)
    model.zero_grad()
    with compress_activations(model, "quant", bits=8):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(_param_grads(model)).all()


# -- 2. BLPA on zero-variance channels ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["blpa", "quant"])
def test_one_hot_input_with_a_missing_category_gives_zero_gradient(name):
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 4, 5, 6, 7, 0] * 8)  # category 3 never occurs
    x = nn.functional.one_hot(labels, 8).float().view(64, 8, 1, 1).expand(64, 8, 4, 4).contiguous()
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(256, 3))
    y = torch.randint(0, 3, (64,))
    nn.functional.cross_entropy(model(x), y).backward()
    ref = model[0].weight.grad.clone()
    model.zero_grad()
    with compress_activations(model, name, bits=8, min_bytes=0):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    got = model[0].weight.grad
    assert torch.equal(got[:, 3], torch.zeros_like(got[:, 3]))  # plain PyTorch: exactly zero
    assert _rel_err(got, ref) < 0.01


# BLPA clips each channel to a 6-sigma window (the paper's design); measured 3.0% on this network at 8 bits
@pytest.mark.parametrize(("name", "tolerance"), [("blpa", 0.05), ("quant", 0.01)])
def test_dead_filter_before_batchnorm_gives_zero_bn_gradient(name, tolerance):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 4))
    with torch.no_grad():
        model[0].weight[5].zero_()  # a dead filter: its output channel is the constant bias
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    ref = model[1].weight.grad.clone()
    model.zero_grad()
    with compress_activations(model, name, bits=8, min_bytes=0):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    got = model[1].weight.grad
    assert abs(float(ref[5])) < 1e-3
    assert abs(float(got[5])) < 1e-3, got[5]
    assert _rel_err(got, ref) < tolerance


@pytest.mark.parametrize("name", ["blpa", "quant"])
def test_batch_of_one_mlp_at_eight_bits_within_one_percent_and_never_larger(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
    x = torch.randn(1, 1024, requires_grad=True)
    y = torch.tensor([3])
    nn.functional.cross_entropy(model(x), y).backward()
    ref = _param_grads(model)
    model.zero_grad()
    with compress_activations(model, name, bits=8, min_bytes=0) as ledger:
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert _rel_err(_param_grads(model), ref) <= 0.01
    assert ledger.stored_bytes <= ledger.raw_bytes


# -- 3. NaN and Inf --------------------------------------------------------------------------------
def _decode(name: str, options: dict, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    codec = make_codec(name, **options)
    ctx = SaveContext("m", module if module is not None else nn.Conv2d(1, 1, 1))
    x = x.detach().requires_grad_()
    engine_input = codec.accepts(x, ctx)
    assert engine_input
    return codec.decode(codec.encode(x, ctx))


@pytest.mark.parametrize(("name", "options"), LOSSY + [("quant", {"bits": 8}), ("blpa", {"bits": 8})],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("module", [nn.Conv2d(1, 1, 1), nn.ReLU()], ids=["conv", "relu"])
def test_nan_and_inf_stay_in_their_own_elements(name, options, module):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16)
    if isinstance(module, nn.ReLU):
        x = x.relu()
    x[1, 2, 3, 4] = float("nan")
    x[2, 5, 0, 0] = float("inf")
    x[3, 7, 15, 15] = float("-inf") if not isinstance(module, nn.ReLU) else float("inf")
    out = _decode(name, options, x, module)
    bad = ~torch.isfinite(x)
    assert torch.isnan(out[1, 2, 3, 4])
    assert torch.equal(out[bad & ~torch.isnan(x)], x[bad & ~torch.isnan(x)])
    assert torch.isfinite(out[~bad]).all()


@pytest.mark.parametrize(("name", "options"), LOSSY + [("quant", {"bits": 8}), ("blpa", {"bits": 8})],
                         ids=lambda v: str(v))
def test_fp16_values_near_the_maximum_stay_finite(name, options):
    torch.manual_seed(0)
    x = (torch.rand(4, 8, 16, 16) * 1000 + 64500).half()
    x[0, 0] = -65504
    out = _decode(name, options, x)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["dct", "wavelet"])
def test_fp16_transform_coefficients_beyond_the_fp16_range_are_not_clipped(name):
    # a 16x16 DCT block (or 3 wavelet levels) gathers up to 16x the largest value into one coefficient
    x = torch.full((1, 2, 16, 16), 60000.0, dtype=torch.float16)
    out = _decode(name, {"compression_ratio": 2}, x)
    torch.testing.assert_close(out.float(), x.float(), rtol=1e-3, atol=0)


def test_blpa_keeps_the_relu_mask_of_a_channel_whose_variance_underflows():
    x = torch.tensor([[[[1e-30, 0.0, 0.0, 0.0]]]])
    out = _decode("blpa", {"bits": 4}, x, nn.ReLU())
    assert torch.equal(out > 0, x > 0)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_keeps_fp64_range(scale, bits):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16, dtype=torch.float64) * scale
    out = _decode("quant", {"bits": bits}, x)
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()
    levels = (1 << bits) - 1
    assert float((out - x).abs().max()) <= float(x.abs().max()) * 2 / levels * 1.01


# -- 4. no leak while one engine stays open ----------------------------------------------------------
def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize(("name", "options"), [("identity", {}), ("quant", {"bits": 4})], ids=["track", "quant4"])
def test_an_engine_left_open_holds_flat_memory(name, options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    counts = []
    with _engine(model, name, options, min_bytes=0):
        for step in range(40):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if step in (10, 39):
                counts.append(_live_tensors())
    assert counts[1] <= counts[0], counts


# -- 5. computed weights are never encoded -------------------------------------------------------------
class _ZeroCodec(Codec):
    """Destroys what it encodes (decodes to zeros): any gradient that reads an encoded tensor goes wrong."""

    name = "zero"

    def accepts(self, tensor, ctx):
        return tensor.is_floating_point()

    def encode(self, tensor, ctx):
        return (tuple(tensor.shape), tensor.dtype)

    def decode(self, payload):
        return torch.zeros(payload[0], dtype=payload[1])

    def stored_nbytes(self, payload):
        return 0


def _weight_norm_conv() -> nn.Module:
    return nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3, padding=1))


def _spectral_norm_conv() -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 8, 3, padding=1))


def _old_weight_norm_conv() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(nn.Conv2d(3, 8, 3, padding=1))


def _csg_conv() -> nn.Module:
    from lightning_memcomp.csg import slice_generate

    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(16, 16, 3, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slice_generate(model, slice_shape=(4, 4, 3, 3), code_size=16, modules=["1"])
    return model[1]


@pytest.mark.parametrize("make", [_weight_norm_conv, _spectral_norm_conv, _old_weight_norm_conv, _csg_conv],
                         ids=["weight_norm", "spectral_norm", "old_weight_norm", "csg"])
def test_weights_computed_from_parameters_are_never_encoded(make):
    torch.manual_seed(0)
    conv = make().eval()  # eval: spectral norm runs no power iteration, so both passes see one weight
    x = torch.randn(2, conv.in_channels, 8, 8, requires_grad=True)
    conv(x).sum().backward()
    ref = x.grad.clone()
    x.grad = None
    engine = SavedTensorEngine(conv, lambda name, m: _ZeroCodec(), min_bytes=0)
    with engine as ledger:
        loss = conv(x).sum()
    loss.backward()
    # grad_input = conv_transpose(grad_output, weight) reads the saved weight only (grad_output is exact)
    assert ledger.parameter_saves >= 1
    torch.testing.assert_close(x.grad, ref)


# -- 6. views ----------------------------------------------------------------------------------------
def test_an_expanded_view_is_stored_at_the_size_of_its_storage():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 16, 3, padding=1)
    x = torch.randn(1, 4, 16, 16)
    w = torch.randn(64, 16, 16, 16, requires_grad=True)

    def run():
        h = conv(x)  # [1, 16, 16, 16]: 16 KiB
        return (h.expand(64, -1, -1, -1) * w).sum()  # the multiply saves both operands

    run().backward()
    ref_w, ref_conv = w.grad.clone(), conv.weight.grad.clone()
    w.grad, conv.weight.grad, conv.bias.grad = None, None, None
    for name, options in [("identity", {}), ("quant", {"bits": 8}), ("dct", {"compression_ratio": 4})]:
        with _engine(conv, name, options, min_bytes=0) as ledger:
            loss = run()
        loss.backward()
        x_bytes, h_bytes, w_bytes = 4 * 16 * 16 * 4, 16 * 16 * 16 * 4, 64 * 16 * 16 * 16 * 4
        assert ledger.raw_bytes == x_bytes + h_bytes + w_bytes, name  # h at 16 KiB, not 64 x 16 KiB
        assert ledger.stored_bytes <= ledger.raw_bytes
        if name == "identity":
            torch.testing.assert_close(w.grad, ref_w)
            torch.testing.assert_close(conv.weight.grad, ref_conv)
        w.grad, conv.weight.grad, conv.bias.grad = None, None, None


def test_a_tensor_and_its_transpose_are_packed_and_counted_once():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 16, 16)
    a = torch.randn(2, 8, 16, 16, requires_grad=True)
    b = torch.randn(2, 8, 16, 16, requires_grad=True)

    def run():
        h = torch.tanh(conv(x))  # tanh saves h
        return (h * a + h.transpose(2, 3) * b).sum()  # both multiplies save a view of h

    run().backward()
    ref = [t.grad.clone() for t in (a, b, conv.weight)]
    for t in (a, b, conv.weight, conv.bias):
        t.grad = None
    with track_saved_tensors(conv, min_bytes=0) as ledger:
        loss = run()
    loss.backward()
    h_bytes = 2 * 8 * 16 * 16 * 4
    x_bytes = 2 * 4 * 16 * 16 * 4
    assert ledger.raw_bytes == x_bytes + 3 * h_bytes  # x, h once, a, b
    assert ledger.shared_saves >= 2
    for t, r in zip((a, b, conv.weight), ref):
        torch.testing.assert_close(t.grad, r)
    for t in (a, b, conv.weight, conv.bias):
        t.grad = None
    # policy off: with the default policy tanh's own save of h is its derivative codes, kept apart (one more h)
    with compress_activations(conv, "quant", bits=8, modules=lambda m, n: True, min_bytes=0,
                              policy="off") as ledger:
        loss = run()
    loss.backward()
    assert ledger.raw_bytes == x_bytes + 3 * h_bytes
    assert _rel_err(a.grad, ref[0]) < 0.01 and _rel_err(b.grad, ref[1]) < 0.01


# -- 7. reproducible stochastic rounding ---------------------------------------------------------------
def _quant2_grads(engine: SavedTensorEngine, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    with engine:
        loss = model(x).square().sum()
    loss.backward()
    return _param_grads(model)


def test_reusing_an_engine_after_manual_seed_repeats_the_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(4, 3, 16, 16)
    engine = compress_activations(model, "quant", bits=2)
    torch.manual_seed(1)
    first = [_quant2_grads(engine, model, x) for _ in range(2)]
    torch.manual_seed(1)
    again = [_quant2_grads(engine, model, x) for _ in range(2)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])  # each step draws new numbers
    fresh = compress_activations(model, "quant", bits=2)  # a new engine (the usual `with` per step)
    torch.manual_seed(1)
    assert torch.equal(_quant2_grads(fresh, model, x), first[0])


def test_without_random_ops_in_between_starts_still_differ_and_reset_rng_repeats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(4, 3, 16, 16)
    engine = compress_activations(model, "quant", bits=2)
    torch.manual_seed(1)
    engine.reset_rng()
    first = [_quant2_grads(engine, model, x) for _ in range(2)]
    assert not torch.equal(first[0], first[1])
    torch.manual_seed(1)
    engine.reset_rng()
    assert torch.equal(_quant2_grads(engine, model, x), first[0])
    assert engine.rng_state is not None
    engine.start(step=5)
    engine.stop()
    assert engine.rng_state == (torch.initial_seed(), 5)


# -- 8. unbiased on ReLU outputs ---------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_stochastic_rounding_is_unbiased_on_relu_outputs(bits):
    torch.manual_seed(0)
    x = torch.randn(64, 256).relu()  # each group: zeros and many small positives
    x[:, 0] = 3.0  # a wide range, so the small positives sit inside the first step
    codec = make_codec("quant", bits=bits)
    ctx = SaveContext("relu", nn.ReLU())
    xr = x.requires_grad_()
    total = torch.zeros_like(x)
    trials = 200
    for seed in range(trials):
        codec.reseed(seed)
        total += codec.decode(codec.encode(xr, ctx))
    mean = total / trials
    small = (x > 0) & (x < 0.2)
    step = 3.0 / ((1 << bits) - 1)
    bias = float((mean - x)[small].mean())
    assert abs(bias) < 0.02 * step, bias
    assert torch.equal(codec.decode(codec.encode(xr, ctx)) > 0, x > 0)  # the ReLU mask stays exact


# -- 7. reproducible through Lightning: two fits and a resume ----------------------------------------
class _TinyModule:
    """Built lazily so the module-level imports stay light."""

    @staticmethod
    def make():
        import lightning.pytorch as pl

        class Tiny(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                         nn.Linear(8 * 8 * 8, 4))

            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

            def train_dataloader(self):
                g = torch.Generator().manual_seed(0)
                data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8, generator=g),
                                                      torch.randint(0, 4, (32,), generator=g))
                return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)

        return Tiny()


def _fit(root, epochs: int, how: str, ckpt_path=None, seed: int = 3):
    import lightning.pytorch as pl

    from lightning_memcomp.compression import ActivationCompression
    from lightning_memcomp.strategies import MemCompSingleDeviceStrategy

    pl.seed_everything(seed, verbose=False)
    module = _TinyModule.make()
    extra = {}
    if how == "callback":
        extra["callbacks"] = [ActivationCompression("quant", bits=2, min_bytes=0)]
    else:
        extra["strategy"] = MemCompSingleDeviceStrategy("quant", bits=2, min_bytes=0)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, **extra)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("how", ["callback", "strategy"])
def test_stochastic_rounding_repeats_across_fits_and_resumes(tmp_path, how):
    _, once = _fit(tmp_path / "a", 2, how)
    _, twice = _fit(tmp_path / "b", 2, how)
    assert torch.equal(once, twice)
    trainer, _ = _fit(tmp_path / "c", 1, how)
    ckpt = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    if how == "callback":
        (state,) = [v for k, v in saved["callbacks"].items() if "ActivationCompression" in k]
        assert state["rng_seed"] == 3
    else:
        assert saved["memcomp_rng_seed"] == 3
    # resumed under another global seed: the checkpoint's seed and step make it round as before
    _, resumed = _fit(tmp_path / "d", 2, how, ckpt_path=ckpt, seed=99)
    assert torch.equal(resumed, once)
