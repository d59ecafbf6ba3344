"""Activation compression inside torch.compile'd graphs (``lightning_memcomp.compression.graph``).

Compiled runs are compared with the same compiled model without hooks (the reference is plain PyTorch:
inlined hooks change nothing else). Tolerances come from measurements on this CPU (stated at each test).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memcomp import ActivationCompression, compress_activations
from lightning_memcomp.compression import graph as G


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )


def _grads(model: nn.Module, run: nn.Module, x: torch.Tensor, y: torch.Tensor, engine=None) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    if engine is None:
        out = run(x)
    else:
        with engine:
            out = run(x)
    nn.functional.cross_entropy(out, y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _net()
    run = torch.compile(model)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    reference = _grads(model, run, x, y)
    return model, run, x, y, reference


# -- the private PyTorch API the compiled path stands on ---------------------------------------------------------

def test_pytorch_graph_hook_api_is_there():
    from torch._functorch._aot_autograd import utils
    from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context

    assert _get_saved_tensor_hook_context() is None  # outside a trace
    engine = compress_activations(torch.compile(nn.Linear(4, 4)), "quant", bits=4)
    assert utils.saved_tensors_hooks_are_inlineable((engine.pack_hook, engine.unpack_hook))
    assert torch._functorch.config.saved_tensors_hooks_filtering_mode == "donated"


# -- the encoders, run eagerly -------------------------------------------------------------------------------------

_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), channels=st.integers(1, 5), side=st.integers(1, 9), bits=st.sampled_from([1, 2, 4, 8]),
       dtype=_DTYPES, relu=st.booleans(), seed=st.integers(0, 2**16))
def test_quant_round_trip_error_is_at_most_one_step(batch, channels, side, bits, dtype, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, channels, side, side, generator=gen) * 3).to(dtype)
    if relu:
        x = x.relu()
    codes, base, step, zero = G.quant_encode(x, bits, 256, stochastic=False)
    out = G.quant_decode(codes, base, step, zero, bits, x.new_empty((0, *x.shape)))
    assert out.shape == x.shape and out.dtype == x.dtype
    # nearest rounding: within half a step of the group (plus the dtype's rounding of the result)
    tol = step.max().item() * 0.5 + x.float().abs().max().item() * 2 ** -7 + 1e-6
    if not (relu and bits == 1):  # 1 bit on a ReLU's output: zero, or the mean of the group's positive values
        assert (out.float() - x.float()).abs().max().item() <= tol
    if relu:  # a ReLU's output keeps its zeros exact, so the mask its backward reads is exact
        assert torch.equal(out > 0, x > 0)


@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, -0.0, 1.0, -2.5, 1e-30, 3e4]), min_size=1, max_size=70),
       bits=st.sampled_from([2, 4, 8]))
def test_quant_edge_values(values, bits):
    x = torch.tensor(values).view(1, -1)
    codes, base, step, zero = G.quant_encode(x, bits, 32, stochastic=True)
    out = G.quant_decode(codes, base, step, zero, bits, x.new_empty((0, *x.shape)))
    assert torch.isfinite(out).all()
    # at most one step (float32 arithmetic: a relative 1e-6 of the largest value on top)
    assert (out - x).abs().max().item() <= step.max().item() + x.abs().max().item() * 1e-6 + 1e-6
    if x.min() >= 0:
        assert torch.equal(out == 0, x == 0)


def test_stochastic_dither_is_unbiased():
    x = torch.rand(1, 64, 32, 32) * 2 - 1
    codes, base, step, zero = G.quant_encode(x, 2, 256, stochastic=True)
    out = G.quant_decode(codes, base, step, zero, 2, x.new_empty((0, *x.shape)))
    # 65536 values at 2 bits (step ~0.67): the mean error of unbiased rounding is ~0.67/sqrt(12*65536) ~ 8e-4;
    # nearest rounding of uniform data has a comparable mean, so compare with a constant shift's 0.1
    assert abs((out - x).mean().item()) < 5e-3
    assert (out - x).abs().max().item() <= step.max().item() + 1e-6


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(2, 4), channels=st.integers(1, 6), side=st.integers(2, 7), bits=st.sampled_from([2, 4, 8]),
       relu=st.booleans(), seed=st.integers(0, 2**16))
def test_blpa_keeps_the_relu_mask_and_bins(batch, channels, side, bits, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, side, side, generator=gen)
    if relu:
        x = x.relu()
    payload = G.blpa_encode(x, bits, 6.0)
    out = G.blpa_decode(*payload, bits, x.new_empty((0, *x.shape)))
    assert out.shape == x.shape
    t, delta = payload[1], payload[2]
    inside = ((x - t.view(1, -1, 1, 1)).abs() <= delta.view(1, -1, 1, 1) * (2 ** bits) / 2 - delta.view(1, -1, 1, 1))
    # inside the window a value is decoded at its bin's centre: within half a bin
    err = (out - x).abs() <= delta.view(1, -1, 1, 1) * 0.5 + 1e-5
    assert bool(err[inside].all())
    if relu:
        assert torch.equal(out > 0, x > 0)


def test_pack_hook_passes_through_what_it_must_not_encode():
    engine = compress_activations(torch.compile(nn.Linear(4, 4)), "quant", bits=4, min_bytes=1024)
    pack, unpack = engine.pack_hook, engine.unpack_hook
    small = torch.randn(4, 4)
    assert unpack(pack(small)) is small
    ints = torch.arange(4096).view(64, 64)
    assert unpack(pack(ints)) is ints
    weight = nn.Parameter(torch.randn(64, 64))
    assert unpack(pack(weight)) is weight
    mask = torch.rand(3, 1000) > 0.5
    payload = pack(mask)
    assert payload[0].numel() * payload[0].element_size() <= mask.numel() // 8 + 1
    assert torch.equal(unpack(payload), mask)
    nonfinite = torch.randn(64, 64)
    nonfinite[3, 3] = float("nan")
    assert unpack(pack(nonfinite)) is nonfinite


def test_channels_last_is_encoded_in_memory_order_and_comes_back_so():
    engine = compress_activations(torch.compile(nn.Linear(4, 4)), "quant", bits=8)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    out = engine.unpack_hook(engine.pack_hook(x))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out - x).abs().max().item() < (x.max() - x.min()).item() / 255


def test_transform_codecs_are_refused_with_the_reason():
    model = torch.compile(nn.Linear(4, 4))
    for codec in ("dct", "wavelet", "threshold"):
        with pytest.raises(ValueError, match=rf"codec='{codec}' cannot compress a torch.compile'd model: .*traced"):
            compress_activations(model, codec)


def test_a_pytorch_without_graph_hooks_is_refused(monkeypatch):
    monkeypatch.setattr(G, "graph_hooks_supported", lambda: False)
    with pytest.raises(ValueError, match=r"needs PyTorch >= 2.8 .*pass the uncompiled model"):
        compress_activations(torch.compile(nn.Linear(4, 4)), "quant")


def test_callable_selection_is_refused_and_chunking_too():
    model = torch.compile(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="modules=<callable> cannot be honoured"):
        compress_activations(model, "quant", modules=lambda m, n: True)
    with pytest.raises(ValueError, match="conv_chunk_bytes=1024 cannot be honoured"):
        compress_activations(model, "quant", conv_chunk_bytes=1024)


def test_compiled_parts_are_found():
    net = _net()
    assert not G.has_compiled_parts(net)
    assert G.has_compiled_parts(torch.compile(net))
    outer = nn.Sequential(nn.Identity(), torch.compile(_net()))
    assert G.has_compiled_parts(outer)
    inplace = _net()
    inplace.compile()
    assert G.has_compiled_parts(inplace)


# -- compiled forward and backward ---------------------------------------------------------------------------------

def test_identity_codec_gives_bit_identical_gradients(compiled):
    model, run, x, y, reference = compiled
    engine = compress_activations(run, "identity")
    assert isinstance(engine, G.CompiledSaveEngine)
    assert torch.equal(_grads(model, run, x, y, engine), reference)
    assert engine.ledger.count > 0 and engine.ledger.raw_bytes > 0


def test_quant_4_bits_compresses_inside_the_graph(compiled):
    model, run, x, y, reference = compiled
    engine = compress_activations(run, "quant", bits=4)
    got = _grads(model, run, x, y, engine)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # measured 0.9989 (nearest rounding); margin 0.004
    assert _cos(got, reference) > 0.995
    ledger = engine.ledger
    assert ledger.ratio > 6  # measured 6.65x (the ledger is exact: the plan's payload sizes)
    names = set(ledger.by_module())
    assert {"0", "2", "3", "5"} & names, names  # attributed to the modules through nn_module_stack
    # the same hook objects every step, also for an engine made anew each step: no recompilation
    for _ in range(2):
        _grads(model, run, x, y, engine)
        again = compress_activations(run, "quant", bits=4)
        assert again.pack_hook is engine.pack_hook and again.unpack_hook is engine.unpack_hook
        _grads(model, run, x, y, again)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert compress_activations(run, "quant", bits=2).pack_hook is not engine.pack_hook
    # nothing is left running after the block: a plain step is the reference again
    assert torch.equal(_grads(model, run, x, y), reference)


def test_blpa_in_the_graph(compiled):
    model, run, x, y, reference = compiled
    engine = compress_activations(run, "blpa", bits=4)
    got = _grads(model, run, x, y, engine)
    assert _cos(got, reference) > 0.99  # measured 0.9993
    assert engine.ledger.ratio > 6  # measured 6.39x


def test_module_selection_is_honoured(compiled):
    model, run, x, y, reference = compiled
    engine = compress_activations(run, "quant", bits=4, modules=["0"])
    _grads(model, run, x, y, engine)
    by_module = engine.ledger.by_module()
    encoded = {name for name, m in by_module.items() if m.stored_bytes < m.raw_bytes}
    assert encoded == {"0"}, by_module
    assert engine.left_as_is().get("not selected", 0) > 0


class _Compiling(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def configure_model(self) -> None:
        self.net.compile()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader() -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 3, 16, 16, generator=gen), torch.randint(0, 10, (40,), generator=gen))
    return DataLoader(data, batch_size=16)  # 16, 16 and a last batch of 8


def _fit(tmp_path, model, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kwargs)
    trainer.fit(model, _loader())
    return trainer


def test_callback_compresses_a_model_compiled_in_configure_model(tmp_path):
    torch._dynamo.reset()
    callback = ActivationCompression(codec="quant", bits=4)
    model = _Compiling()
    before = [p.detach().clone() for p in model.parameters()]
    _fit(tmp_path, model, callbacks=[callback])
    assert isinstance(callback._engine, G.CompiledSaveEngine)
    assert callback.memcomp_ledger.ratio > 6
    # bytes are attributed to the LightningModule's qualified names (the compiled net's paths are relative)
    assert {"net.0", "net.3"} <= set(callback.memcomp_ledger.by_module()), callback.memcomp_ledger.by_module()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # full batches and the last smaller one: at most one compilation more than a plain compiled fit
    with_hooks = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    _fit(tmp_path, _Compiling())
    assert with_hooks <= torch._dynamo.utils.counters["stats"]["unique_graphs"] + 1


def test_strategy_compresses_a_compiled_lightning_module(tmp_path):
    torch._dynamo.reset()
    model = _Compiling()
    trainer = _fit(tmp_path, model, strategy="memcomp")
    engine = trainer.strategy._memcomp_engine
    assert isinstance(engine, G.CompiledSaveEngine)
    assert trainer.strategy.memcomp_ledger.ratio > 6
    assert math.isfinite(float(trainer.callback_metrics.get("train_loss", 0.0)))
