"""Smooth activations store their derivative in a few bits, not their input (Few-Bit Backward).

The backward of a pointwise activation ``y = f(x)`` is ``grad_x = grad_y * f'(x)``: it reads the saved tensor only
through the derivative. Quantizing the saved *input* to k bits moves that derivative a lot where ``f'`` is steep
(a SiLU input coded in 4 bits over a group range of [-5, 10] is off by up to 0.5, and ``f'`` by up to 0.25);
this is what spoils gradients on EfficientNet and MobileNet (issue 16 measured a parameter-gradient cosine of
0.94 from the SiLU inputs alone). Novikov et al., "Few-Bit Backward: Quantized Gradients of Activation Functions
for Memory Footprint Reduction" (arXiv 2202.00441) store instead a piecewise-constant approximation of ``f'`` in
a few bits.

Here: for each activation a fixed table of ``2**bits`` derivative *levels*, fitted once (1-D Lloyd-Max over the
derivative's values for inputs drawn from ``0.5 N(0, 1) + 0.5 N(0, 9)``; values that carry more than 2 % of that
mass, like the flat parts of Hardswish, are kept as exact levels). At pack time a saved tensor is coded as the
index of the level nearest to its derivative. At unpack the code becomes a *representative* saved value whose
derivative is that level (found once per level by bisection), so PyTorch's own backward formula, unchanged,
computes ``grad_y * level``: no custom autograd function, and in-place variants (which save a clone) work too.

Which calls are covered is decided by a :class:`torch.overrides.TorchFunctionMode` that the engine enters around
the forward: ``F.silu``, ``F.gelu`` (both approximations), ``F.hardswish``, ``F.hardsigmoid``, ``F.mish``,
``F.softplus``, ``F.elu``, ``F.leaky_relu``, ``torch.sigmoid`` and ``torch.tanh`` (functions, methods and their
in-place forms), whether called by ``nn.SiLU``-style modules or in a block's own ``forward``. The mode marks the
call; the engine's pack hook takes the one tensor the call saves (the input, or for ``sigmoid``/``tanh`` the
output) and codes it here; every other save goes to the bulk codec as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_memcomp.compression.bitpack import check_bits, from_memory_order, memory_order, pack_bits, unpack_bits
from lightning_memcomp.memory.engine import Codec, SaveContext

__all__ = ["DerivativeCodec", "DerivativeTable", "PrecisionPolicy", "derivative_table", "smooth_call"]

_CHUNK = 1 << 20  # elements coded at a time: bounds the float32 temporaries of the derivative


# -- the activations --------------------------------------------------------------------------------------
def _sigmoid(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def _silu_grad(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_grad(x: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
    pdf = torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    return cdf + x * pdf


def _gelu_tanh_grad(x: Tensor) -> Tensor:
    k = math.sqrt(2 / math.pi)
    inner = k * (x + 0.044715 * x ** 3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)


def _hardswish_grad(x: Tensor) -> Tensor:
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x <= 3, x / 3 + 0.5, torch.ones_like(x)))


def _hardsigmoid_grad(x: Tensor) -> Tensor:
    return torch.where((x > -3) & (x < 3), torch.full_like(x, 1 / 6), torch.zeros_like(x))


def _mish_grad(x: Tensor) -> Tensor:
    sp = F.softplus(x)
    t = torch.tanh(sp)
    return t + x * (1 - t * t) * torch.sigmoid(x)


@dataclass(frozen=True)
class _Activation:
    """``saved_of(x)``: what autograd saves for input ``x`` (``x`` itself or ``f(x)``); ``grad_of(s)``: the
    derivative ``f'(x)`` written in terms of that saved tensor, as PyTorch's backward computes it."""

    saved_of: Callable[[Tensor], Tensor]
    grad_of: Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def _activation(name: str, params: tuple[Any, ...]) -> _Activation:
    if name == "silu":
        return _Activation(_identity, _silu_grad)
    if name == "gelu":
        return _Activation(_identity, _gelu_tanh_grad if params[0] == "tanh" else _gelu_grad)
    if name == "hardswish":
        return _Activation(_identity, _hardswish_grad)
    if name == "hardsigmoid":
        return _Activation(_identity, _hardsigmoid_grad)
    if name == "mish":
        return _Activation(_identity, _mish_grad)
    if name == "softplus":
        beta, threshold = params
        return _Activation(_identity, lambda x: torch.where(x * beta > threshold, torch.ones_like(x),
                                                            torch.sigmoid(x * beta)))
    if name == "elu":
        (alpha,) = params
        return _Activation(_identity, lambda x: torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x)))
    if name == "elu_result":  # in place, ELU saves its output: the derivative is 1 above 0, y + alpha below
        (alpha,) = params
        return _Activation(lambda x: F.elu(x, alpha), lambda y: torch.where(y > 0, torch.ones_like(y), y + alpha))
    if name == "leaky_relu":
        (slope,) = params
        return _Activation(_identity, lambda x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope)))
    if name == "sigmoid":
        return _Activation(_sigmoid, lambda y: y * (1 - y))
    if name == "tanh":
        return _Activation(torch.tanh, lambda y: 1 - y * y)
    raise KeyError(name)


# -- the level tables -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DerivativeTable:
    """Derivative levels of one activation, the thresholds between them and a saved value per level."""

    name: str
    levels: Tensor  # (k,) float64, increasing
    thresholds: Tensor  # (k-1,) float64: midpoints between levels
    representatives: Tensor  # (k,) float64: a saved value whose derivative (PyTorch's formula) is the level
    grad_of: Callable[[Tensor], Tensor]
    #: for derivatives without jumps: the code of every saved value on a fine grid (``lut[round((s - lut_lo) /
    #: lut_step)]``, saved values clamped to the grid), so coding is a lookup instead of ``grad_of`` and a search
    lut: Tensor | None = None
    lut_lo: float = 0.0
    lut_step: float = 1.0
    #: how much further from its level a derivative may be through the lookup's rounding of the saved value
    lut_error: float = 0.0

    @property
    def max_error(self) -> float:
        """Largest gap between a derivative value in the fitted range and its level (half the widest step)."""
        return float((self.levels[1:] - self.levels[:-1]).max() / 2) if len(self.levels) > 1 else 0.0


_TABLES: dict[tuple[str, tuple[Any, ...], int], DerivativeTable] = {}
#: activations whose derivative has no jump (coded through a lookup table); the others (Hardswish, Hardsigmoid,
#: LeakyReLU, in-place ELU's output test) go through the exact derivative and a search
_CONTINUOUS = frozenset({"silu", "gelu", "mish", "softplus", "elu", "sigmoid", "tanh"})
_LUT_SIZE = 1 << 16


def _lloyd(values: Tensor, weights: Tensor, k: int) -> Tensor:
    """Levels minimising the weighted squared error of ``values`` to their nearest level (1-D Lloyd-Max);
    values that carry over 2 % of the weight (flat parts of the derivative) are exact levels of their own, and the
    other levels are fitted to the rest."""
    distinct, inverse = torch.unique(values, return_inverse=True)
    mass = torch.zeros_like(distinct).index_add_(0, inverse, weights)
    if len(distinct) <= k:
        return distinct
    fixed = distinct[mass > 0.02][:k]
    rest = ~torch.isin(values, fixed)
    values, weights = values[rest], weights[rest]
    free = k - len(fixed)
    if free <= 0 or len(values) == 0:
        return fixed
    order = torch.argsort(values)
    cdf = torch.cumsum(weights[order], 0)
    quantiles = (torch.arange(free, dtype=torch.float64) + 0.5) / free * cdf[-1]
    levels = values[order][torch.searchsorted(cdf, quantiles).clamp(max=len(values) - 1)]
    for _ in range(100):
        levels = torch.unique(levels)
        bucket = torch.bucketize(values, (levels[1:] + levels[:-1]) / 2)
        total = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, bucket, weights)
        moment = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, bucket, weights * values)
        updated = torch.where(total > 0, moment / total.clamp_min(1e-300), levels)
        if float((updated - levels).abs().max()) < 1e-9:
            break
        levels = updated
    return torch.unique(torch.cat([fixed, levels]))


def _representatives(act: _Activation, grid: Tensor, grads: Tensor, levels: Tensor) -> Tensor:
    """For each level, a saved value ``s`` (``saved_of(x)`` for some ``x``) with ``grad_of(s) == level``: the middle
    of the longest flat run where the derivative equals the level (Hardsigmoid's 1/6, ELU's 1; far from the edges,
    so the value survives rounding to float16/bfloat16), else the crossing nearest to the closest grid point, refined
    by bisection (all levels at once)."""
    diff = grads.unsqueeze(0) - levels.unsqueeze(1)  # (levels, grid)
    best = torch.argmin(diff.abs(), dim=1)
    change = torch.sign(diff[:, 1:]) != torch.sign(diff[:, :-1])
    index = torch.arange(change.shape[1]).expand_as(change)
    distance = torch.where(change, (index - best.unsqueeze(1)).abs(), torch.full_like(index, change.shape[1] * 2))
    crossing = torch.argmin(distance, dim=1)
    has_crossing = change.any(dim=1)
    lo, hi = grid[crossing], grid[(crossing + 1).clamp(max=len(grid) - 1)]
    f_lo = act.grad_of(act.saved_of(lo)) - levels
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        f_mid = act.grad_of(act.saved_of(mid)) - levels
        same = (f_mid < 0) == (f_lo < 0)
        lo, f_lo, hi = torch.where(same, mid, lo), torch.where(same, f_mid, f_lo), torch.where(same, hi, mid)
    x = torch.where(has_crossing, 0.5 * (lo + hi), grid[best])
    for k in torch.nonzero((diff.abs() < 1e-12).any(dim=1)).flatten().tolist():
        flat = torch.nonzero(diff[k].abs() < 1e-12).flatten()
        runs = torch.tensor_split(flat, (torch.nonzero(flat[1:] - flat[:-1] > 1).flatten() + 1).tolist())
        run = max(runs, key=len)
        x[k] = grid[int(run[len(run) // 2])]
    return act.saved_of(x)


def derivative_table(name: str, params: tuple[Any, ...] = (), bits: int = 4) -> DerivativeTable:
    """The level table of activation ``name`` (with its parameters) at ``bits`` bits (cached)."""
    key = (name, params, bits)
    table = _TABLES.get(key)
    if table is not None:
        return table
    act = _activation(name, params)
    grid = torch.linspace(-10, 10, 8001, dtype=torch.float64)
    weights = 0.5 * torch.exp(-0.5 * grid ** 2) + 0.5 / 3 * torch.exp(-0.5 * (grid / 3) ** 2)
    weights = weights / weights.sum()
    grads = act.grad_of(act.saved_of(grid))
    levels = _lloyd(grads, weights, 1 << bits)
    reps = _representatives(act, grid, grads, levels)
    thresholds = (levels[1:] + levels[:-1]) / 2
    lut, lo, step, lut_error = None, 0.0, 1.0, 0.0
    if name in _CONTINUOUS and len(levels) > 2:
        ends = act.saved_of(torch.tensor([-12.0, 12.0], dtype=torch.float64))
        lo, hi = float(ends.min()), float(ends.max())
        points = torch.linspace(lo, hi, _LUT_SIZE + 1, dtype=torch.float64)
        step = (hi - lo) / _LUT_SIZE
        lut = torch.bucketize(act.grad_of(points), thresholds).to(torch.uint8)
        # a saved value within half a step of a grid point: its derivative moves by at most this
        fine = torch.linspace(lo, hi, 8 * _LUT_SIZE + 1, dtype=torch.float64)
        lut_error = float((act.grad_of(fine) - act.grad_of(points[torch.round((fine - lo) / step).long()])).abs().max())
    table = DerivativeTable(name, levels, thresholds, reps, act.grad_of, lut, lo, step, lut_error)
    _TABLES[key] = table
    return table


# -- which calls ------------------------------------------------------------------------------------------
def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _calls() -> dict[Callable, Callable[[tuple, dict], tuple[str, tuple[Any, ...]] | None]]:
    plain = {
        "silu": (F.silu,),
        "hardswish": (F.hardswish,),
        "hardsigmoid": (F.hardsigmoid,),
        "mish": (F.mish,),
        "sigmoid": (torch.sigmoid, torch.sigmoid_, Tensor.sigmoid, Tensor.sigmoid_, F.sigmoid),
        "tanh": (torch.tanh, torch.tanh_, Tensor.tanh, Tensor.tanh_, F.tanh),
    }
    calls: dict[Callable, Callable] = {}
    for name, funcs in plain.items():
        for func in funcs:
            calls[func] = lambda args, kwargs, name=name: (name, ())
    calls[F.gelu] = lambda args, kwargs: ("gelu", (_arg(args, kwargs, 1, "approximate", "none"),))
    calls[F.softplus] = lambda args, kwargs: (
        "softplus", (float(_arg(args, kwargs, 1, "beta", 1.0)), float(_arg(args, kwargs, 2, "threshold", 20.0))))
    calls[F.elu] = lambda args, kwargs: ("elu_result" if _arg(args, kwargs, 2, "inplace", False) else "elu",
                                         (float(_arg(args, kwargs, 1, "alpha", 1.0)),))
    calls[F.leaky_relu] = lambda args, kwargs: ("leaky_relu", (float(_arg(args, kwargs, 1, "negative_slope", 0.01)),))
    return calls


_CALLS = _calls()


def smooth_call(func: Callable, args: tuple, kwargs: dict) -> tuple[str, tuple[Any, ...]] | None:
    """``(activation, parameters)`` when ``func(*args, **kwargs)`` is a covered activation, else ``None``."""
    which = _CALLS.get(func)
    return None if which is None else which(args, kwargs)


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward on this thread."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


# -- the codec --------------------------------------------------------------------------------------------
@dataclass
class DerivativePayload:
    codes: Tensor  # uint8, packed, in the tensor's memory order
    numel: int
    shape: tuple[int, ...]
    order: tuple[int, ...] | None  # memory_order's permutation (channels_last comes back channels_last)
    dtype: torch.dtype
    table: DerivativeTable


class DerivativeCodec(Codec):
    """Codes a smooth activation's saved tensor as the nearest of ``2**bits`` derivative levels (see module doc)."""

    name = "derivative"
    compresses = True

    def __init__(self, table: DerivativeTable, bits: int) -> None:
        self.table = table
        self.bits = check_bits(bits, "derivative_bits")
        self._on: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(thresholds in float32, representatives in ``dtype``) on ``device``, copied there once."""
        key = (device, dtype)
        tables = self._on.get(key)
        if tables is None:
            tables = self._on[key] = (self.table.thresholds.to(device=device, dtype=torch.float32),
                                      self.table.representatives.to(device=device, dtype=dtype))
        return tables

    def _lut(self, device: torch.device) -> Tensor | None:
        if self.table.lut is None:
            return None
        key = (device, torch.uint8)
        if key not in self._on:
            self._on[key] = (self.table.lut.to(device), self.table.lut)
        return self._on[key][0]

    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        return tensor.is_floating_point() and tensor.dim() >= 1

    def encode(self, tensor: Tensor, ctx: SaveContext) -> Any:
        flat, order = memory_order(tensor)
        per = 8 // self.bits
        out = torch.empty(-(-flat.numel() // per), dtype=torch.uint8, device=tensor.device)
        thresholds, _ = self._tables(tensor.device, tensor.dtype)
        lut = self._lut(tensor.device)
        table = self.table
        finite = torch.ones((), dtype=torch.bool, device=tensor.device)
        for start in range(0, flat.numel(), _CHUNK):
            piece = flat[start:start + _CHUNK].float()
            if lut is not None:
                finite &= torch.isfinite(piece).all()
                index = piece.sub(table.lut_lo).mul_(1 / table.lut_step).round_().clamp_(0, len(lut) - 1)
                index.nan_to_num_(0.0)  # the tensor is declined below; the lookup must not fail first
                codes = lut.index_select(0, index.to(torch.int32))
            else:
                grads = table.grad_of(piece)
                finite &= torch.isfinite(grads).all()
                codes = torch.bucketize(grads, thresholds).to(torch.uint8)
            if codes.numel() % per:
                codes = torch.cat([codes, codes.new_zeros(per - codes.numel() % per)])
            packed = pack_bits(codes, self.bits)
            out[start // per:start // per + packed.numel()] = packed
        if not bool(finite):  # one synchronisation per tensor
            return tensor  # declined: kept as it is (the engine counts it)
        return DerivativePayload(out, flat.numel(), tuple(tensor.shape), order, tensor.dtype, self.table)

    def stored_nbytes(self, payload: Any) -> int:
        return payload.codes.numel()  # the level table is shared by every payload of this activation

    def decode(self, payload: Any) -> Tensor:
        if isinstance(payload, Tensor):
            return payload
        if torch.is_grad_enabled() and _in_backward():
            # a backward with create_graph=True differentiates the backward formula itself, which needs the
            # saved value, not a value with the same derivative: refuse rather than give a wrong gradient
            raise RuntimeError(
                f"a {payload.table.name} activation saved its derivative codes (lightning_memcomp's precision "
                "policy), which give first-order gradients only; this backward has create_graph=True (a double "
                "backward or gradient penalty): pass policy='off' (or policy={'smooth': False}) to compress_activations"
                " / ActivationCompression"
            )
        _, reps = self._tables(payload.codes.device, payload.dtype)
        out = torch.empty(payload.numel, dtype=payload.dtype, device=payload.codes.device)
        per = 8 // self.bits
        for start in range(0, payload.numel, _CHUNK):
            stop = min(start + _CHUNK, payload.numel)
            codes = unpack_bits(payload.codes[start // per:-(-stop // per)], self.bits)[:stop - start]
            out[start:stop] = reps.index_select(0, codes.int())
        return from_memory_order(out, payload.shape, payload.order)

    def __repr__(self) -> str:
        return f"DerivativeCodec({self.table.name}, bits={self.bits})"


# -- the policy -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionPolicy:
    """What each kind of saved tensor gets, beyond the bulk codec.

    Args:
        smooth: smooth activations (SiLU, GELU, Hardswish, Hardsigmoid, Mish, Softplus, ELU, LeakyReLU, Sigmoid,
            Tanh) keep their derivative in ``derivative_bits`` bits instead of their input (module doc).
        derivative_bits: bits per element of those derivative codes (1, 2, 4 or 8). The default, 8, is what keeps
            deep networks' gradients right: the level error is deterministic and compounds through every activation
            of the backward (EfficientNet-B0 at 4-bit bulk: cosine 0.986 with 4-bit derivatives, 0.993 with 8-bit;
            ``benchmarks/zoo_coverage.py``). It stores one byte per element, the same as 8-bit input quantization,
            with the derivative error of 256 fitted levels instead of the input's.
        transform_max_error: the transform codecs (``wavelet``, ``dct``, ``threshold``) keep their payload only where
            its relative error, known at encode time from the kept coefficients' energy, is at most this; elsewhere
            the tensor is quantized to ``fallback_bits`` (:mod:`lightning_memcomp.compression.fallback`). ``None``:
            the transform everywhere, as the paper does.
        fallback_bits: bits of that fallback ``quant`` codec.
    """

    smooth: bool = True
    derivative_bits: int = 8
    transform_max_error: float | None = 0.1
    fallback_bits: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.smooth, bool):
            raise ValueError(f"smooth={self.smooth!r} is not allowed; use True or False")
        check_bits(self.derivative_bits, "derivative_bits")
        check_bits(self.fallback_bits, "fallback_bits")
        error = self.transform_max_error
        if error is not None and (isinstance(error, bool) or not isinstance(error, (int, float))
                                  or not 0 <= error <= 1):
            raise ValueError(f"transform_max_error={error!r} is not allowed; use a number from 0 to 1, or None")

    def codec_for_call(self, func: Callable, args: tuple, kwargs: dict) -> DerivativeCodec | None:
        if not self.smooth:
            return None
        which = smooth_call(func, args, kwargs)
        if which is None:
            return None
        return _codec(which[0], which[1], self.derivative_bits)

    def function_mode(self, engine: Any) -> TorchFunctionMode | None:
        return _SmoothActivations(engine, self) if self.smooth else None


_CODECS: dict[tuple[str, tuple[Any, ...], int], DerivativeCodec] = {}


def _codec(name: str, params: tuple[Any, ...], bits: int) -> DerivativeCodec:
    key = (name, params, bits)
    codec = _CODECS.get(key)
    if codec is None:
        table = derivative_table(name, params, bits)
        # a derivative with few values (LeakyReLU, Hardsigmoid: two) is exact in fewer bits
        narrow = next(b for b in (1, 2, 4, 8) if len(table.levels) <= 1 << b or b == bits)
        codec = _CODECS[key] = DerivativeCodec(table, min(bits, narrow))
    return codec


class _SmoothActivations(TorchFunctionMode):
    """Marks calls of covered activations so the engine codes what they save as derivative levels."""

    def __init__(self, engine: Any, policy: PrecisionPolicy) -> None:
        super().__init__()
        self.engine = engine
        self.policy = policy

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CALLS and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor) and x.requires_grad and x.is_floating_point():
                codec = self.policy.codec_for_call(func, args, kwargs)
                if codec is not None:
                    with self.engine.expecting(codec, tuple(x.shape), x.dtype):
                        return func(*args, **kwargs)
        return func(*args, **kwargs)
