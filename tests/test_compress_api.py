"""compress_activations: argument checking shared by every codec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_memcomp import compress_activations


def test_unknown_codec_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"codec='zip' is not a known codec; allowed: identity, quant"):
        compress_activations(nn.Linear(2, 2), codec="zip")


def test_selection_that_matches_nothing_warns() -> None:
    with pytest.warns(UserWarning, match=r"modules='encoder\.\*' matched no module"):
        compress_activations(nn.Sequential(nn.Linear(2, 2)), codec="identity", modules="encoder.*")


def test_identity_options_are_refused() -> None:
    with pytest.raises(TypeError, match="takes no options"):
        compress_activations(nn.Linear(2, 2), codec="identity", bits=4)


def test_only_selected_modules_are_encoded() -> None:
    from lightning_memcomp import Codec

    class Recording(Codec):
        name = "recording"

        def __init__(self) -> None:
            self.modules: list[str] = []

        def encode(self, tensor, ctx):
            self.modules.append(ctx.module_name)
            return tensor

    codec = Recording()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Conv2d(8, 8, 3), nn.Tanh())
    with compress_activations(model, codec=codec, modules=["1", "3"], min_bytes=0) as ledger:
        model(torch.randn(1, 3, 16, 16, requires_grad=True))
    assert codec.modules == ["1", "3"]  # the Tanh outputs; conv inputs go through the identity codec
    assert ledger.by_codec()["recording"].count == 2


def test_a_string_model_gets_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"model='resnet18' is a str, not a torch.nn.Module"):
        compress_activations("resnet18", codec="quant")


def test_nested_engines_compose_inner_for_its_modules_outer_for_the_rest() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    outer = compress_activations(model, codec="blpa", bits=4, min_bytes=0)
    inner = compress_activations(model, codec="quant", bits=2, modules=["0"], min_bytes=0)
    x = torch.randn(32, 64)
    with outer:
        with inner:
            model(x).sum().backward()
    assert set(inner.ledger.by_codec()) == {"quant"} and set(inner.ledger.by_module()) == {"0"}
    # the rest (the tanh output the second linear saves) went to the outer engine, not dropped
    assert outer.ledger.by_codec().get("blpa") is not None and "0" not in outer.ledger.by_module()
    assert not inner.active and not outer.active


def test_a_model_on_the_meta_device_is_refused() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    engine = compress_activations(model, codec="quant")
    with pytest.raises(ValueError, match=r"parameter '0.weight' is on the meta device.*to_empty"):
        engine.start()
    assert not engine.active
