"""Activation compression inside ``torch.compile``'d graphs: pack and unpack as graph code.

Python ``saved_tensors_hooks`` do nothing useful around a compiled region: the compiled function saves its
tensors inside one autograd node whose backward unpacks all of them at its start (pytorch issue 148222).
Since PyTorch 2.8, hooks given as :class:`torch.fx.GraphModule` objects are different: AOTAutograd traces
them for every tensor the forward graph saves and inlines them, the pack at the end of the forward graph and
the unpack at the start of the backward graph (pytorch PR 150032). What the compiled forward then keeps for
backward is the pack's output.

This module builds such hooks from the ``quant``, ``blpa`` and ``identity`` codecs:

* Each hook is a ``GraphModule`` whose graph is one call of a Python function (:func:`_graph_pack` /
  :func:`_graph_unpack`). AOTAutograd re-traces it for each saved node, so the function branches on dtype and
  size: booleans are bit-packed, other integers, tensors under ``min_bytes`` and 0-/1-D tensors pass through,
  floating tensors are encoded in the order they lie in memory (``channels_last`` included: reading them in
  logical order made the encoder several times slower and decoded tensors of the wrong layout). The payload
  is a plain tuple of tensors (tensor subclasses are refused by PyTorch), then a zero-size tensor that
  carries the shape and dtype and the dimension permutation to undo (a tuple of ints, a graph constant).
* While AOTAutograd traces, :func:`_get_saved_tensor_hook_context` (private PyTorch API, pinned by
  ``tests/test_compiled_compression.py``) gives the saved node; its ``nn_module_stack`` names the modules
  it was saved in, which is how ``modules=`` selections are honoured and how the ledger attributes bytes.
* Randomness: stochastic rounding cannot call ``torch.rand`` inside an inlined hook (inductor rejects the
  random op there: ``should have been handled in replace_random.py``). The dither is a counter-based hash
  of each element's position and its group's minimum (bits of the data), so it changes from step to step
  with the activations, needs no state, and a re-run on the same data gives the same bits.
* Hook objects are built once per (model, codec configuration, ``min_bytes``, selection) and reused, also by
  engines created every step: Dynamo guards on their identity, so new objects would recompile every step.

The ``wavelet``, ``dct`` and ``threshold`` codecs are refused under compile: their encoders select the
largest coefficients per span with data-dependent loops and store sparse payloads built in Python
(:mod:`lightning_memcomp.compression.sparse`), which is not expressible as one traced graph.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from lightning_memcomp.compression.bitpack import pack_bits, unpack_bits
from lightning_memcomp.memory.engine import DEFAULT_MIN_BYTES, Codec, mix_seed
from lightning_memcomp.memory.ledger import Ledger
from lightning_memcomp.surgery import module_filter

__all__ = [
    "CompiledSaveEngine",
    "GRAPH_CODECS",
    "graph_codec_problem",
    "has_compiled_parts",
]

GRAPH_CODECS = ("quant", "blpa", "identity")

_REFUSED_REASON = (
    "its encoder keeps the largest transform coefficients of each span with data-dependent loops and stores "
    "them as sparse payloads built in Python, which cannot be traced into the fixed-shape graph code that "
    "torch.compile inlines as a pack hook"
)


def has_compiled_parts(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules runs compiled: ``torch.compile(module)`` (an
    ``OptimizedModule``), ``module.compile()``, or Lightning's unwrapped compiled module (``_compiler_ctx``)."""
    if getattr(model, "_compiler_ctx", None) is not None:
        return True
    for module in model.modules():
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            return True
        if getattr(module, "_compiled_call_impl", None) is not None:
            return True
    return False


def graph_codec_problem(codec: Codec) -> str | None:
    """Why ``codec`` cannot run inside compiled graphs, or ``None`` when it can."""
    if not graph_hooks_supported():
        return (
            f"compressing a torch.compile'd model needs PyTorch >= 2.8 (saved-tensor hooks inlined into compiled "
            f"graphs, pytorch PR 150032); this is torch {torch.__version__}: pass the uncompiled model"
        )
    if hasattr(codec, "graph_encode") and hasattr(codec, "graph_decode"):
        return None
    if codec.name in GRAPH_CODECS:
        return None
    if codec.name in ("wavelet", "dct", "threshold"):
        return f"codec={codec.name!r} cannot compress a torch.compile'd model: {_REFUSED_REASON}"
    return (
        f"codec {codec!r} cannot compress a torch.compile'd model: it has no graph_encode/graph_decode "
        f"methods; the codecs that can are {', '.join(GRAPH_CODECS)}"
    )


# -- the encoders: plain tensor code, traced by AOTAutograd --------------------------------------------------

_WEYL = 0.6180339887498949  # golden-ratio Weyl sequence: k * phi mod 1 is equidistributed in [0, 1)


def _dither(rows: Tensor, salt: Tensor) -> Tensor:
    """Uniform [0, 1) dither for stochastic rounding: the Weyl sequence ``frac(k * phi + offset)`` along each row
    of the group, with an offset per group from ``salt`` (the group's minimum, so it changes with the data).
    Marginally uniform, so rounding stays unbiased; plain float arithmetic that fuses into the encoder (a
    per-element integer hash made the encoder ten times slower on CPU)."""
    k = torch.arange(rows.shape[1], device=rows.device, dtype=torch.float32)
    offset = salt * 0.7548776662466927 + 0.5698402909980532
    offset = offset - offset.floor()  # not torch.frac, which is negative for negative values
    u = k * _WEYL + offset
    return u - u.floor()


def _rows(x: Tensor, group: int) -> Tensor:
    """``x`` as rows of ``group`` elements: per sample, the sample padded by its last value."""
    per_sample = math.prod(x.shape[1:])
    flat = x.reshape(x.shape[0], per_sample)
    pad = (-per_sample) % group
    if pad:
        flat = torch.cat([flat, flat[:, -1:].expand(flat.shape[0], pad)], dim=1)
    return flat.reshape(-1, group)


def _from_rows(rows: Tensor, like: Tensor) -> Tensor:
    shape = like.shape[1:]
    per_sample = math.prod(shape[1:])
    flat = rows.reshape(shape[0], -1)
    if flat.shape[1] != per_sample:
        flat = flat[:, :per_sample]
    return flat.reshape(shape).to(like.dtype)


def _pack_rows(q: Tensor, bits: int) -> Tensor:
    """uint8 codes ``[rows, group]`` packed ``8 // bits`` to a byte, the first in the lowest bits (as
    :func:`~lightning_memcomp.compression.bitpack.pack_bits`), written as strided ORs that fuse."""
    per = 8 // bits
    if per == 1:
        return q
    q = q.view(q.shape[0], -1, per)
    out = q[..., 0]
    for j in range(1, per):
        out = out | (q[..., j] << (j * bits))
    return out


def quant_encode(x: Tensor, bits: int, group_size: int, stochastic: bool) -> tuple[Tensor, ...]:
    """k-bit per-group codes of ``x`` (groups of ``group_size`` within each sample).

    A group whose minimum is exactly 0 (a ReLU's output) keeps code 0 for exact zeros and spreads the other
    levels over its positive values (at 1 bit: their mean), so the ReLU mask its backward reads is exact; ``zero``
    marks those groups (one byte per group)."""
    per_sample = max(math.prod(x.shape[1:]), 1)
    group = min(group_size, 1 << max(5, math.ceil(math.log2(per_sample))))
    g = _rows(x, group).float()
    levels = (1 << bits) - 1
    lo = g.amin(1, keepdim=True)
    hi = g.amax(1, keepdim=True)
    positive_lo = torch.where(g > 0, g, float("inf")).amin(1, keepdim=True)
    zero = lo == 0
    if levels == 1:  # 1 bit: a zero group's one nonzero level is the mean of its positive values
        positives = (g > 0).float()
        positive_mean = (g * positives).sum(1, keepdim=True) / positives.sum(1, keepdim=True).clamp_min(1)
        base = torch.where(zero, positive_mean, lo)
    else:
        base = torch.where(zero, torch.minimum(positive_lo, hi), lo)
    step = (hi - base) / torch.where(zero, float(max(levels - 1, 1)), float(levels))
    inv = torch.where(step > 0, 1.0 / step, 0.0)
    dither = _dither(g, lo) if stochastic else 0.5
    q = ((g - base) * inv + dither).floor() + zero.float()
    q = torch.where(zero, torch.where(g > 0, q.clamp_min(1), 0.0), q).clamp(0, levels).to(torch.uint8)
    return _pack_rows(q, bits), base.squeeze(1), step.squeeze(1), zero.squeeze(1)


def quant_decode(codes: Tensor, base: Tensor, step: Tensor, zero: Tensor, bits: int, like: Tensor) -> Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    base, step, zero = base.unsqueeze(1), step.unsqueeze(1), zero.unsqueeze(1)
    parts = []
    for j in range(per):
        q = ((codes >> (j * bits)) & mask).float() if per > 1 else codes.float()
        value = base + (q - zero.float()) * step
        parts.append(torch.where(zero & (q == 0), 0.0, value))
    values = torch.stack(parts, -1).view(codes.shape[0], -1) if per > 1 else parts[0]
    return _from_rows(values, like)


def blpa_encode(x: Tensor, bits: int, window: float) -> tuple[Tensor, ...]:
    """BLPA's per-channel bins (Chakrabarti & Moseley, Sec. 3.2): ``2**bits`` bins over ``window`` batch standard
    deviations, centred on the channel mean; for a non-negative channel (a ReLU's output) the threshold 0 lies on
    a bin edge with one bin below it, so the recovered ReLU mask is exact."""
    n = 1 << bits
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    var, mu = torch.var_mean(xf, dim=dims, correction=0)
    lo = xf.amin(dim=dims)
    sigma = var.clamp_min(0).sqrt()
    delta = torch.where(sigma > 0, window * sigma / n, torch.ones_like(sigma))
    relu = lo >= 0
    t = torch.where(relu, torch.zeros_like(mu), mu)
    s = torch.where(relu, torch.ones_like(mu), torch.full_like(mu, n / 2))
    view = [1, -1] + [1] * (x.dim() - 2)
    k = torch.ceil((xf - t.view(view)) / delta.view(view)) - 1 + s.view(view)
    k = k.clamp(0, n - 1).to(torch.uint8)
    per_sample = math.prod(x.shape[1:])
    per = 8 // bits
    flat = k.reshape(x.shape[0], per_sample)
    pad = (-per_sample) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(x.shape[0], pad)], dim=1)
    return pack_bits(flat, bits), t, delta, torch.where(relu, -s, s)


def blpa_decode(codes: Tensor, t: Tensor, delta: Tensor, marked: Tensor, bits: int, like: Tensor) -> Tensor:
    shape = like.shape[1:]
    k = unpack_bits(codes, bits).float()[:, : math.prod(shape[1:])].reshape(shape)
    view = [1, -1] + [1] * (len(shape) - 2)
    relu = marked < 0
    s = marked.abs()
    values = t.view(view) + (k - s.view(view) + 0.5) * delta.view(view)
    values = torch.where(relu.view(view), values.clamp_min(0), values)
    return values.to(like.dtype)


# -- what each saved tensor becomes ---------------------------------------------------------------------------

@dataclass
class _Entry:
    module: str
    raw: int
    stored: int
    reason: str | None  # None: encoded; otherwise why it was left as it is


@dataclass
class _HookState:
    """What one engine's hooks need: the codec, the size floor, the selection and where to record."""

    codec: Codec
    min_bytes: int
    select: Callable[[str], bool] | None
    names: frozenset[str] = frozenset()  # the model's qualified module names
    plans: dict[tuple[int, int], dict[str, _Entry]] = field(default_factory=dict)
    eager: list[_Entry] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATES: dict[int, _HookState] = {}
_NEXT_KEY = [0]
_HOOKS: dict[tuple, tuple] = {}
_MAX_CACHED = 64


def _selection_key(modules: Any) -> Any:
    if modules is None or isinstance(modules, (str, type)):
        return modules
    if callable(modules):
        return id(modules)
    return tuple(modules)


def _hint(n: Any) -> int:
    """An int for a size, without guarding on it when it is symbolic (its example value)."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    if hint is not None:
        return int(hint)
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint
    except ImportError:  # pragma: no cover - older torch
        return 0
    return int(optimization_hint(n, fallback=0))


def _nbytes(t: Tensor) -> int:
    return _hint(t.numel()) * t.element_size()


def _module_path(node: Any) -> list[str]:
    """Qualified names of the modules a saved node was computed in, outermost first (Dynamo's spelling
    ``L['self'].layer1[0].conv1`` becomes ``layer1.0.conv1``; ``module.compile()`` adds ``__self__``)."""
    stack = (getattr(node, "meta", None) or {}).get("nn_module_stack") or {}
    names = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        path = path.replace("L['self']", "").replace("L['fn']", "").replace("['", ".").replace("']", "")
        path = path.replace("[", ".").replace("]", "")
        names.append(".".join(p for p in path.split(".") if p not in ("", "__self__", "_modules", "_orig_mod")))
    return names


def clean_name(name: str) -> str:
    """A qualified module name without ``torch.compile``'s ``_orig_mod`` level (``net._orig_mod.0`` -> ``net.0``)."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _full_name(path: str, names: frozenset[str]) -> str:
    """A path relative to a compiled submodule (``0.conv``) as the model's qualified name (``net.0.conv``)
    when exactly one module name ends with it."""
    if path in names or not names:
        return path
    found = [n for n in names if n.endswith("." + path)]
    return found[0] if len(found) == 1 else path


def _is_leaf_parameter(x: Tensor) -> bool:
    return isinstance(x, nn.Parameter) or (x.is_leaf and x.requires_grad)


def _graph_pack(x: Tensor, key: int) -> tuple[Tensor, ...]:
    state = _STATES[key]
    ctx = _trace_context()
    node = ctx["_node"] if ctx is not None else None
    like = x.new_empty((0, *x.shape))
    path = [_full_name(p, state.names) for p in _module_path(node)] if node is not None else []
    module = path[-1] if path else ""
    raw = _nbytes(x)
    reason: str | None = None
    payload: tuple[Tensor, ...]
    tracing = node is not None or is_fake(x)
    if not tracing and _is_leaf_parameter(x):
        return (x, like, ())  # eager code between compiled regions: parameters are never encoded nor counted
    if state.select is not None and not any(state.select(name) for name in path):
        reason = "not selected"
    elif raw < state.min_bytes:
        reason = "small"
    elif x.dtype == torch.bool:
        flat = x.reshape(-1)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        payload = (pack_bits(flat.to(torch.uint8).view(-1, 8), 1), like, ())
    elif not x.is_floating_point():
        reason = "not floating"
    elif x.dim() < 2:
        reason = "declined by codec"  # 0-/1-D: statistics, biases, scalars
    elif not tracing and not bool(torch.isfinite(x).all()):
        reason = "declined by codec"  # NaN/Inf
    if reason is None and x.dtype != torch.bool:
        order = _memory_order(x)
        xp = x.permute(order) if order else x  # encode in memory order (channels_last stays channels_last)
        inverse = tuple(sorted(range(len(order)), key=order.__getitem__)) if order else ()
        payload = _encode(state.codec, xp) + (xp.new_empty((0, *xp.shape)), inverse)
        if len(payload) == 3 and payload[0].dtype == x.dtype:
            reason = "declined by codec"
    if reason is not None:
        payload = (x, like, ())
    stored = raw if reason is not None else sum(_nbytes(p) for p in payload if isinstance(p, Tensor))
    entry = _Entry(module, raw, stored, reason)
    if node is not None:
        cid = torch._guards.CompileContext.current_compile_id()
        plan_key = (cid.frame_id or 0, cid.frame_compile_id or 0) if cid is not None else (0, 0)
        with state.lock:  # AOTAutograd traces the pack twice per saved node: keyed by the node's name
            state.plans.setdefault(plan_key, {})[str(getattr(node, "name", id(node)))] = entry
    elif not tracing:
        state.eager.append(entry)
    return payload


def _graph_unpack(payload: tuple[Tensor, ...], key: int) -> Tensor:
    state = _STATES[key]
    like, inverse = payload[-2], payload[-1]
    if len(payload) == 3 and payload[0].dtype == like.dtype:  # passed through
        return payload[0]
    if like.dtype == torch.bool:
        numel = math.prod(like.shape[1:])
        return unpack_bits(payload[0], 1).reshape(-1)[:numel].view(like.shape[1:]).bool()
    out = _decode(state.codec, payload[:-2], like)
    return out.permute(inverse) if inverse else out


def _memory_order(x: Tensor) -> tuple[int, ...] | None:
    """The dimension order in which ``x`` lies in memory, when that is not its own order and the batch stays
    outermost (``channels_last``: N, H, W, C); ``None`` otherwise. Decided from static strides only."""
    strides = x.stride()
    if x.dim() < 3 or not all(isinstance(st, int) for st in strides):
        return None
    order = tuple(sorted(range(x.dim()), key=lambda d: (-strides[d], d)))
    if order[0] != 0 or order == tuple(range(x.dim())):
        return None
    return order


def _encode(codec: Codec, x: Tensor) -> tuple[Tensor, ...]:
    if hasattr(codec, "graph_encode"):
        return tuple(codec.graph_encode(x))  # type: ignore[attr-defined]
    if codec.name == "quant":
        return quant_encode(x, codec.bits, codec.group_size, graph_stochastic(codec))
    if codec.name == "blpa":
        return blpa_encode(x, codec.bits, codec.window)  # type: ignore[attr-defined]
    return (x,)


def graph_stochastic(codec: Codec) -> bool:
    """Whether the compiled ``quant`` encoder dithers: only when ``stochastic=True`` was asked for. The automatic
    choice (``stochastic=None``) is nearest rounding under compile: measured on resnet18_cifar, batch 64, 4 bits,
    parameter-gradient cosine 0.9981 with nearest rounding and 0.9964 with the dither (the eager codec's
    stochastic rounding gives 0.9963 there); nearest rounding has a third of the error variance."""
    option = getattr(codec, "_stochastic_option", None)
    return bool(option) if option is not None else False


def _decode(codec: Codec, payload: tuple[Tensor, ...], like: Tensor) -> Tensor:
    if hasattr(codec, "graph_decode"):
        return codec.graph_decode(payload, like)  # type: ignore[attr-defined]
    if codec.name == "quant":
        return quant_decode(*payload, codec.bits, like)  # type: ignore[attr-defined]
    if codec.name == "blpa":
        return blpa_decode(*payload, codec.bits, like)  # type: ignore[attr-defined]
    return payload[0]


def _trace_context() -> dict[str, Any] | None:
    try:  # private, PyTorch >= 2.10; without it selection and the ledger's per-graph plan are not available
        from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context
    except ImportError:  # pragma: no cover - older torch
        return None
    return _get_saved_tensor_hook_context()


def graph_hooks_supported() -> bool:
    """Whether this PyTorch inlines ``GraphModule`` saved-tensor hooks into compiled graphs (2.8 and later)."""
    try:
        from torch._functorch._aot_autograd import utils
    except ImportError:  # pragma: no cover
        return False
    return hasattr(utils, "saved_tensors_hooks_are_inlineable")


def _hook_module(fn: Callable, key: int, name: str) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    arg = graph.placeholder(name)
    graph.output(graph.call_function(fn, (arg, key)))
    return torch.fx.GraphModule(nn.Module(), graph)


class CompiledSaveEngine:
    """The saved-tensor engine for models that run compiled: graph hooks AOTAutograd inlines.

    Same interface as :class:`~lightning_memcomp.memory.engine.SavedTensorEngine` (``start``/``stop``, a
    context manager, ``ledger``, ``seed``). Differences, documented in the README ("Under torch.compile"):

    * What is seen: the tensors the compiled forward graphs save that are intermediates of the graph
      (AOTAutograd's default ``saved_tensors_hooks_filtering_mode="donated"``): never parameters, buffers or
      the graph's inputs. Which tensors those are is the partitioner's choice, not the modules' (a ReLU's
      output is saved once for both the ReLU and the next convolution). Code that runs eagerly inside the
      block (graph breaks, a loss computed outside the compiled module) goes through the same functions.
    * ``modules=`` selections by name or class are honoured through each saved node's ``nn_module_stack``;
      a callable selection is refused (the module objects are not available while tracing).
    * The ledger is the compiled plan: the bytes each compiled graph saves, raw and as its payload, recorded
      while AOTAutograd traced it (per compiled frame, the largest graph compiled); the compiled code cannot
      report per step. Eager saves inside the block are counted per step.
    """

    compiled = True

    def __init__(self, model: nn.Module, codec: Codec, *, min_bytes: int = DEFAULT_MIN_BYTES,
                 modules: Any = None, layout_optimization: bool = False) -> None:
        problem = graph_codec_problem(codec)
        if problem is not None:
            raise ValueError(problem)
        self.model = model
        self.codec = codec
        self.min_bytes = min_bytes
        self.seed: int | None = None
        self.rng_state: tuple[int, int] | None = None
        self.ledger = Ledger()
        self.layout_optimization = layout_optimization
        self._config: Any = None
        self._active: torch.autograd.graph.saved_tensors_hooks | None = None
        select = name_selection(modules, model)
        # The hooks are built once per (model, codec configuration, size floor, selection) and reused, also by
        # engines created anew every step (``with compress_activations(...)`` in a loop): Dynamo guards on the
        # hooks' identity, so new objects would recompile the graph every step.
        cache_key = (id(model), type(codec), repr(codec), min_bytes, _selection_key(modules))
        cached = _HOOKS.get(cache_key)
        if cached is not None and cached[0]() is model:
            _, self._key, self.pack_hook, self.unpack_hook = cached
            self._state = _STATES[self._key]
            self._state.codec = codec
            return
        key = _NEXT_KEY[0]
        _NEXT_KEY[0] += 1
        self._key = key
        names = frozenset(clean_name(name) for name, _ in model.named_modules() if clean_name(name))
        self._state = _HookState(codec, min_bytes, select, names)
        _STATES[key] = self._state
        self.pack_hook = _hook_module(_graph_pack, key, "saved")
        self.unpack_hook = _hook_module(_graph_unpack, key, "payload")
        while len(_HOOKS) >= _MAX_CACHED:  # the oldest configuration goes
            _, old_key, *_ = _HOOKS.pop(next(iter(_HOOKS)))
            _STATES.pop(old_key, None)
        _HOOKS[cache_key] = (weakref.ref(model), key, self.pack_hook, self.unpack_hook)

    @property
    def active(self) -> bool:
        return self._active is not None

    def codecs(self) -> list[Codec]:
        return [self.codec]

    def start(self, step: int | None = None) -> Ledger:
        if self._active is not None:
            raise RuntimeError("this CompiledSaveEngine is already active; engines are not re-entrant")
        base = self.seed if self.seed is not None else torch.initial_seed()
        self.rng_state = (int(base), int(mix_seed(base, step or 0)))
        self.ledger.reset()
        self._state.eager.clear()
        self._config = None
        if not self.layout_optimization and self.codec.compresses:
            import torch._inductor.config as inductor_config

            self._config = inductor_config.patch(layout_optimization=False)
            self._config.__enter__()
        self._active = torch.autograd.graph.saved_tensors_hooks(self.pack_hook, self.unpack_hook)
        self._active.__enter__()
        return self.ledger

    def stop(self) -> Ledger:
        try:
            if self._active is not None:
                self._active.__exit__(None, None, None)
        finally:
            self._active = None
            if self._config is not None:
                self._config.__exit__(None, None, None)
                self._config = None
        self._fill_ledger()
        return self.ledger

    def __enter__(self) -> Ledger:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def plan(self) -> list[_Entry]:
        """The entries of the largest graph compiled for each compiled frame."""
        best: dict[int, list[_Entry]] = {}
        with self._state.lock:
            for (frame, _), by_node in self._state.plans.items():
                entries = list(by_node.values())
                if sum(e.raw for e in entries) >= sum(e.raw for e in best.get(frame, [])):
                    best[frame] = entries
        return [e for entries in best.values() for e in entries]

    def _fill_ledger(self) -> None:
        self.ledger.reset()
        for e in (*self.plan(), *self._state.eager):
            self.ledger.record(e.module, "passthrough" if e.reason else self.codec.name, e.raw, e.stored,
                               e.reason is not None, e.reason)

    def left_as_is(self) -> dict[str, int]:
        """Bytes of the compiled plan left as they are, by reason (small, not floating, ...)."""
        out: dict[str, int] = {}
        for e in self.plan():
            if e.reason:
                out[e.reason] = out.get(e.reason, 0) + e.raw
        return out


def name_selection(modules: Any, model: nn.Module) -> Callable[[str], bool] | None:
    """A ``modules=`` selection as a predicate on qualified names, for the compiled path (``None``: all)."""
    if modules is None:
        return None
    if callable(modules) and not isinstance(modules, type):
        raise ValueError(
            "modules=<callable> cannot be honoured for a torch.compile'd model: saved tensors are chosen while "
            "the graph is traced, where only module names and classes are known; pass class names, qualified-"
            "name globs or module classes instead"
        )
    select = module_filter(modules)  # the eager selection's own rules: class names, globs, classes
    by_name = {clean_name(name): module for name, module in model.named_modules()}

    def predicate(path: str) -> bool:  # paths arrive as the model's qualified names (see _full_name)
        module = by_name.get(path)
        return module is not None and select(module, path)

    return predicate
