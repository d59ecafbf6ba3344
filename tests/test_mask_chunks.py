"""The routing masks (dropout masks, sign and hardtanh masks) are packed and applied piece by piece; with
pieces of a few elements they give exactly what one piece gives (the full-tensor implementation)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_memcomp.compression import bitpack
from lightning_memcomp.compression.bitpack import decode_routing, encode_routing, pack_mask
from lightning_memcomp.compression.quant import QuantCodec, threshold_mask
from lightning_memcomp.memory.engine import SaveContext


@pytest.fixture(params=[8, 24, 1 << 20], ids=["8", "24", "default"])
def piece(request, monkeypatch):
    monkeypatch.setattr(bitpack, "MASK_CHUNK", request.param)
    return request.param


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) and (
        not a.is_floating_point() or torch.equal(torch.signbit(a), torch.signbit(b)))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 200), p=st.floats(0.0, 0.9), dtype=st.sampled_from([torch.float32, torch.float16, torch.bool]),
       seed=st.integers(0, 2**16))
def test_dropout_masks_round_trip_exactly_in_pieces(n, p, dtype, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bitpack, "MASK_CHUNK", 16)
        gen = torch.Generator().manual_seed(seed)
        keep = torch.rand(n, generator=gen) >= p
        x = keep if dtype == torch.bool else keep.to(dtype) / (1 - p if p < 1 else 1)
        payload = encode_routing(x)
        assert payload is not None
        assert torch.equal(payload.bits, pack_mask(keep if dtype == torch.bool else x != 0))
        assert _same(decode_routing(payload), x)
        bad = x.clone()
        if dtype != torch.bool:
            bad[n // 2] = 0.5  # a third value: not a dropout mask
            assert encode_routing(bad) is None or bool(((bad == 0) | (bad == bad.max())).all())


@pytest.mark.parametrize("module", [nn.LeakyReLU(0.1), nn.Hardtanh(-1.0, 1.0), nn.ReLU6()], ids=["sign", "hardtanh",
                                                                                              "relu6"])
def test_exact_routing_masks_are_applied_in_pieces(piece, module, monkeypatch):
    """quant's sign/hardtanh masks: the same decode for every piece size (monkeypatched) and for the torch path
    of the mask itself."""
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 7, 9) * 2).requires_grad_()
    ctx = SaveContext("act", module)
    codec = QuantCodec(bits=2, stochastic=False)
    payload = codec.encode(x, ctx)
    got = codec.decode(payload)
    monkeypatch.setattr(bitpack, "MASK_CHUNK", 1 << 20)
    whole = codec.decode(payload)
    assert _same(got, whole)
    monkeypatch.setenv("MEMCOMP_KERNELS", "torch")
    if isinstance(module, nn.LeakyReLU):
        low, high = 0.0, float("inf")
    else:
        low, high = float(module.min_val), float(module.max_val)
    flat = x.detach().reshape(-1)
    monkeypatch.setattr(bitpack, "MASK_CHUNK", piece)
    assert torch.equal(threshold_mask(flat, low, high).bits, pack_mask((flat > low) & (flat < high)))
