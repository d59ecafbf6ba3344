"""Module selection and replacement shared by the converters."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_memcomp.surgery import Unsupported, module_filter, replace_modules, select_modules


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()),  # "0.0", "0.1"
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)),  # "1.0", "1.1"
    )


def test_select_by_class_name_glob_type_and_callable() -> None:
    net = _net()
    assert [n for n, _ in select_modules(net, "Conv2d")] == ["0.0", "1.0"]
    assert [n for n, _ in select_modules(net, "1.*")] == ["1.0", "1.1"]
    assert [n for n, _ in select_modules(net, nn.ReLU)] == ["0.1"]
    assert [n for n, _ in select_modules(net, ["ReLU", "1.1"])] == ["0.1", "1.1"]
    assert [n for n, _ in select_modules(net, lambda m, n: n.endswith(".0"))] == ["0.0", "1.0"]


def test_base_class_names_match() -> None:
    net = _net()
    assert [n for n, _ in select_modules(net, "_ConvNd")] == ["0.0", "1.0"]


def test_default_applies_when_modules_is_none() -> None:
    predicate = module_filter(None, lambda m, n: isinstance(m, nn.BatchNorm2d))
    assert [n for n, m in _net().named_modules() if predicate(m, n)] == ["1.1"]


def test_bad_selection_names_the_option() -> None:
    with pytest.raises(TypeError, match="modules entry 3"):
        module_filter(["Conv2d", 3])
    with pytest.raises(TypeError, match="layers=5"):
        module_filter(5, option="layers")  # type: ignore[arg-type]


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class NewConv(nn.Conv2d):
    pass


def test_replace_is_idempotent_keeps_hooks_and_mode_and_reports() -> None:
    net = _net()
    net.eval()
    calls = []
    net[0][0].register_forward_hook(lambda *a: calls.append(1))
    select = module_filter("Conv2d")

    def factory(m, name):
        if m.kernel_size == (1, 1):
            raise Unsupported("1x1 convolution")
        return NewConv(m.in_channels, m.out_channels, m.kernel_size)

    with pytest.warns(UserWarning, match="skipping 1.0"):
        report = replace_modules(net, "wrap", select, factory, converted_types=NewConv)
    assert [c.name for c in report.converted] == ["0.0"]
    assert [(s.name, s.reason) for s in report.skipped] == [("1.0", "1x1 convolution")]
    assert isinstance(net[0][0], NewConv) and not net[0][0].training
    import torch

    net(torch.randn(1, 3, 8, 8))
    assert calls == [1]
    with pytest.warns(UserWarning):
        again = replace_modules(net, "wrap", select, factory, converted_types=NewConv)
    assert again.converted == [] and again.already_converted == ["0.0"]
    assert "converted 1 layer(s), skipped 1" in str(report)


def test_shared_module_is_converted_once_and_stays_shared() -> None:
    conv = nn.Conv2d(3, 3, 3)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    made = []

    def factory(m, name):
        made.append(name)
        return Wrapped(m)

    replace_modules(net, "wrap", module_filter("Conv2d"), factory, converted_types=Wrapped)
    assert made == ["0"]
    assert net[0] is net[2]


def test_converting_nothing_warns() -> None:
    with pytest.warns(UserWarning, match="no module was converted"):
        replace_modules(_net(), "wrap", module_filter("Linear"), lambda m, n: m)
