"""The saved-tensor engine and its ledger (identity codec)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_memcomp import Codec, SavedTensorEngine, track_saved_tensors
from lightning_memcomp.memory.engine import SaveContext


def _conv_relu_conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))


def test_ledger_counts_hand_computed_bytes_once_per_storage() -> None:
    model = _conv_relu_conv()
    x = torch.randn(2, 4, 16, 16)
    with track_saved_tensors(model, min_bytes=0) as ledger:
        model(x)
    input_bytes = 2 * 4 * 16 * 16 * 4  # conv0 saves its input
    relu_bytes = 2 * 8 * 16 * 16 * 4  # the ReLU saves its output; conv2 saves the same storage again
    assert ledger.raw_bytes == input_bytes + relu_bytes
    assert ledger.stored_bytes == ledger.raw_bytes
    assert ledger.count == 2
    assert ledger.shared_saves == 1
    by_module = ledger.by_module()
    assert by_module["0"].raw_bytes == input_bytes
    assert by_module["1"].raw_bytes == relu_bytes
    assert "2" not in by_module  # its input was already packed by the ReLU


def test_parameters_are_never_counted_as_activations() -> None:
    model = nn.Sequential(nn.Linear(256, 512), nn.Tanh())
    x = torch.randn(8, 256, requires_grad=True)  # so addmm saves the weight for grad_input
    with track_saved_tensors(model, min_bytes=0) as ledger:
        model(x)
    assert ledger.parameter_saves >= 1
    weight_bytes = model[0].weight.numel() * 4
    assert ledger.raw_bytes == 8 * 256 * 4 + 8 * 512 * 4  # input + tanh output, no weight
    assert ledger.raw_bytes < weight_bytes


def test_parameter_identity_not_value_equality() -> None:
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    x = model[0].weight.detach().clone().requires_grad_()  # same values as the weight, different storage
    with track_saved_tensors(model, min_bytes=0) as ledger:
        model(x)
    assert ledger.by_module()["0"].raw_bytes == x.numel() * 4


def test_small_non_float_and_no_grad_tensors_pass_through() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2))
    x = torch.randn(2, 3, 32, 32)
    with track_saved_tensors(model, min_bytes=0) as ledger:
        model(x)
    codecs = ledger.by_codec()
    # the input (no grad) and the max-pool indices (int64) pass through; the conv output is encoded
    assert codecs["passthrough"].count == 2
    assert codecs["passthrough"].raw_bytes == 2 * 3 * 32 * 32 * 4 + 2 * 8 * 16 * 16 * 8
    assert codecs["identity"].raw_bytes == 2 * 8 * 32 * 32 * 4
    assert ledger.passthrough_bytes == codecs["passthrough"].raw_bytes


def test_min_bytes_threshold_passes_small_tensors_through() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with track_saved_tensors(model, min_bytes=1 << 20) as ledger:
        model(torch.randn(2, 4, requires_grad=True))
    assert ledger.count > 0
    assert ledger.passthrough_count == ledger.count


def test_identity_engine_gives_bit_identical_gradients() -> None:
    model = _conv_relu_conv()
    x = torch.randn(2, 4, 16, 16)
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with track_saved_tensors(model):
        loss = model(x).square().sum()
    loss.backward()
    for p, g in zip(model.parameters(), expected):
        assert torch.equal(p.grad, g)


class _CountingCodec(Codec):
    name = "counting"

    def __init__(self) -> None:
        self.encoded = 0
        self.decoded = 0
        self.modules: list[str] = []

    def encode(self, tensor: torch.Tensor, ctx: SaveContext):
        self.encoded += 1
        self.modules.append(ctx.module_name)
        return tensor.clone()

    def decode(self, payload):
        self.decoded += 1
        return payload


def test_codec_chosen_per_module_and_decoded_in_backward() -> None:
    model = _conv_relu_conv()
    codec = _CountingCodec()
    engine = SavedTensorEngine(model, lambda name, m: codec if isinstance(m, nn.ReLU) else None, min_bytes=0)
    x = torch.randn(2, 4, 16, 16)
    with engine as ledger:
        loss = model(x).sum()
    assert codec.modules == ["1"]  # only the ReLU output, shared with conv 2, encoded once
    loss.backward()
    assert codec.decoded == 2  # the ReLU's backward and conv 2's backward both unpack it
    assert ledger.by_codec()["counting"].count == 1


def test_freed_storage_reused_at_same_address_is_not_confused() -> None:
    # a compressing codec drops the original; a new tensor at the reused address must be packed anew
    class Clone(Codec):
        name = "clone"

        def encode(self, tensor, ctx):
            return tensor.detach().clone()

        def decode(self, payload):
            return payload

    class Twice(nn.Module):
        def forward(self, x):
            a = torch.sin(x)  # saved (x), then freed by no one
            b = torch.exp(a * 2)  # result saved
            return b

    model = Twice()
    x = torch.randn(64, 64, requires_grad=True)
    with SavedTensorEngine(model, lambda n, m: Clone(), min_bytes=0):
        out = model(x)
    out.sum().backward()
    ref = x.detach().clone().requires_grad_()
    torch.exp(torch.sin(ref) * 2).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_hooks_removed_after_exception_in_forward() -> None:
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(8, 8), Boom())
    engine = track_saved_tensors(model, min_bytes=0)
    with pytest.raises(RuntimeError, match="boom"):
        with engine:
            model(torch.randn(2, 8, requires_grad=True))
    assert not engine.active
    before = engine.ledger.count
    y = model[0](torch.randn(2, 8, requires_grad=True)).tanh()  # would be recorded if hooks leaked
    assert engine.ledger.count == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    y.sum().backward()


def test_nested_and_no_grad_use_leave_no_hooks() -> None:
    model = _conv_relu_conv()
    outer = track_saved_tensors(model, min_bytes=0)
    inner = track_saved_tensors(model, min_bytes=0)
    with outer:
        with inner as inner_ledger:
            model(torch.randn(1, 4, 8, 8))
        with torch.no_grad():
            model(torch.randn(1, 4, 8, 8))
    assert inner_ledger.count == 2  # the innermost hooks see the saves
    assert outer.ledger.count == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    count = inner.ledger.count
    model(torch.randn(1, 4, 8, 8))
    assert inner.ledger.count == count


def test_engine_is_not_reentrant() -> None:
    engine = track_saved_tensors(nn.Linear(2, 2))
    with engine:
        with pytest.raises(RuntimeError, match="already active"):
            engine.start()


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        track_saved_tensors("resnet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_bytes"):
        track_saved_tensors(nn.Linear(2, 2), min_bytes=-1)


def test_autocast_weight_copies_are_parameters_not_activations() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with track_saved_tensors(model, min_bytes=0) as ledger:
            model(torch.randn(2, 3, 16, 16))
    assert ledger.parameter_saves == 1
    assert ledger.by_codec()["identity"].raw_bytes == 2 * 16 * 14 * 14 * 2  # the bf16 ReLU output


def test_ledger_table_lists_the_biggest_modules_first() -> None:
    model = _conv_relu_conv()
    with track_saved_tensors(model, min_bytes=0) as ledger:
        model(torch.randn(2, 4, 16, 16))
    table = ledger.table()
    lines = table.splitlines()
    assert lines[2].startswith("| 1 |") and lines[3].startswith("| 0 |")
    total = next(i for i, line in enumerate(lines) if "**total**" in line)
    # the input, which does not require grad, is what the identity codec leaves as it is
    assert lines[total + 1:] == ["", "By codec: identity 0.02 -> 0.02 MiB",
                                 "Left as it is: 0.01 MiB (33.3% of raw): declined by codec 0.01 MiB"]


RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, psutil, torch, torchvision
    from lightning_memcomp import track_saved_tensors
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    x = torch.randn(32, 3, 224, 224)
    proc = psutil.Process()
    with track_saved_tensors(model):
        model(x)  # warm-up: allocator pools, thread pools
    gc.collect()
    before = proc.memory_info().rss
    with track_saved_tensors(model) as ledger:
        out = model(x)
    after = proc.memory_info().rss
    print(json.dumps({"raw": ledger.raw_bytes, "stored": ledger.stored_bytes, "rss": after - before}))
    """
)


@pytest.mark.slow
def test_resnet18_ledger_agrees_with_rss_growth() -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], env=env, capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["stored"] == figures["raw"]
    assert abs(figures["raw"] - figures["rss"]) / figures["rss"] < 0.05, figures
