"""The saved-tensor engine: one place that sees every tensor autograd saves for backward.

Built on :class:`torch.autograd.graph.saved_tensors_hooks`. During the forward pass each saved tensor is
handed to the pack hook; the engine attributes it to the innermost module that was running, skips
parameters and buffers (by storage identity, never by value), stores each storage once (with the codec
of the module that saved it first), and
asks the codec chosen for that module to encode it. Backward calls the unpack hook, which decodes.
The forward pass itself is never changed.

What the engine guarantees, whatever the codec (see the README, "What is never encoded"):

* **In-place checks.** ``saved_tensors_hooks`` switch off PyTorch's own check that a saved tensor was not
  modified in place before backward. The engine records each saved tensor's version counter at pack time
  (through a zero-size alias that shares the counter but holds no memory) and raises PyTorch's error, with
  the module that saved it, at unpack if the version moved.
* **Parameters and computed weights stay exact**: parameters and buffers (by storage identity), autocast
  copies of parameters, outputs of ``torch.nn.utils.parametrize`` parametrizations (weight and spectral
  norm included), tensors a module holds as plain attributes that require grad (hook-based weight norm),
  and anything passed to :func:`keep_exact` (CSG's generated filters) are never encoded.
* **Non-finite values**: a codec keeps a tensor with NaN/Inf as it is (counted as passthrough), and a
  payload that would be as large as the tensor is dropped for the tensor itself.
* **Views**: one storage is packed once: a later save of a view that lies inside a packed dense region
  (a transpose, a slice) is rebuilt from it; an expanded view is stored at the size of its storage.
* **Bounded lifetime**: the engine's cache holds weak references only, so a payload is freed as soon as
  autograd frees the graph that holds it, also while the engine stays open for a whole fit.
* **Reproducible randomness**: codecs with a random stream are reseeded at every :meth:`start` from a
  base seed (``torch.initial_seed()`` by default) and a step number.

Codecs (identity here; quantization and transform-domain codecs in :mod:`lightning_memcomp.compression`)
subclass :class:`Codec`.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from lightning_memcomp.memory import lean_conv
from lightning_memcomp.memory.ledger import Ledger

__all__ = [
    "Codec",
    "IdentityCodec",
    "SaveContext",
    "SavedTensorEngine",
    "keep_exact",
    "mix_seed",
    "payload_nbytes",
    "track_saved_tensors",
]

DEFAULT_MIN_BYTES = 4096

try:  # the module that computes a parametrized weight (torch.nn.utils.parametrize)
    from torch.nn.utils.parametrize import ParametrizationList as _ParametrizationList

    _PARAMETRIZATION_TYPES: tuple[type, ...] = (_ParametrizationList,)
except ImportError:  # pragma: no cover - every supported torch has it
    _PARAMETRIZATION_TYPES = ()


@dataclass(frozen=True)
class SaveContext:
    """Where a tensor was saved: the innermost running module that has a codec (or the innermost one)."""

    module_name: str
    module: nn.Module | None


def payload_nbytes(payload: Any) -> int:
    """Bytes held by the tensors inside an encoded payload (tuples, lists, dicts and objects' slots)."""
    if isinstance(payload, Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, (tuple, list)):
        return sum(payload_nbytes(p) for p in payload)
    if isinstance(payload, dict):
        return sum(payload_nbytes(p) for p in payload.values())
    if hasattr(payload, "__dataclass_fields__"):
        return sum(payload_nbytes(getattr(payload, f)) for f in payload.__dataclass_fields__)
    return 0


class Codec:
    """Encodes a saved tensor at pack time and decodes it when backward needs it.

    Subclasses override :meth:`encode` and :meth:`decode`; :meth:`accepts` decides which tensors the
    codec takes (the rest pass through untouched and are counted as passthrough).
    """

    name: str = "identity"
    #: a compressing codec: when it returns the tensor itself (it declined: NaN/Inf), the engine counts the
    #: tensor as passthrough (left uncompressed) rather than as encoded
    compresses: bool = False

    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        return tensor.is_floating_point() and tensor.requires_grad

    def encode(self, tensor: Tensor, ctx: SaveContext) -> Any:
        return tensor

    def decode(self, payload: Any) -> Tensor:
        return payload

    def decode_batch(self, payload: Any, start: int, stop: int) -> Tensor | None:
        """Rows ``start:stop`` of the first dimension of what :meth:`decode` gives, decoded on their own (the
        sliced convolution backward asks for them), or ``None`` when this payload decodes only whole (the
        caller then decodes it once). Codecs whose payload keeps the samples apart override it."""
        return None

    def stored_nbytes(self, payload: Any) -> int:
        return payload_nbytes(payload)

    def reseed(self, seed: int, step: int = 0) -> None:
        """Restart the codec's random stream (if it has one) from ``(seed, step)``; called at each engine
        start with the engine's base seed and step."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IdentityCodec(Codec):
    """Keeps the tensor as it is: the engine then only accounts."""


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps): nearby inputs give unrelated streams."""
    z = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for v in values:
        z = (z + (int(v) & mask) * 0xBF58476D1CE4E5B9 + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
    return z & ((1 << 63) - 1)


# the default generators' fingerprint at the last engine start, and how many starts have seen it
_RNG_TRACK: dict[str, Any] = {"fingerprint": None, "count": 0}


def _global_rng_fingerprint() -> bytes:
    """A digest of torch's default generators' states (read, never advanced)."""
    digest = hashlib.blake2b(bytes(torch.default_generator.get_state().numpy()), digest_size=8)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        digest.update(bytes(torch.cuda.default_generators[torch.cuda.current_device()].get_state().numpy()))
    return digest.digest()


def _version_probe(tensor: Tensor) -> Tensor | None:
    """A zero-size tensor that shares ``tensor``'s version counter but none of its memory.

    ``detach()`` shares the version counter (and the storage); replacing its data by an empty tensor
    keeps the counter and drops the storage, without bumping the version.
    """
    try:
        probe = tensor.detach()
        probe.data = tensor.new_empty(0)
        return probe
    except (RuntimeError, TypeError):  # tensor subclasses that refuse a shallow copy: no check
        return None


def _tensor_type(dtype: torch.dtype, device: torch.device) -> str:
    name = torch.empty(0, dtype=dtype).type()  # "torch.FloatTensor"
    return name.replace("torch.", f"torch.{device.type}.", 1) if device.type != "cpu" else name


class _Packed:
    """What the autograd graph holds instead of a saved tensor: the payload and what the checks need."""

    __slots__ = ("codec", "payload", "probe", "version", "module_name", "grad_fn", "output_nr", "shape",
                 "dtype", "device", "expand_to", "__weakref__")

    def __init__(self, codec: Codec, payload: Any, tensor: Tensor, module_name: str) -> None:
        self.codec = codec
        self.payload = payload
        self.version = tensor._version
        # the payload is the tensor itself (passthrough): its own counter is read at unpack
        self.probe = None if payload is tensor else _version_probe(tensor)
        self.module_name = module_name
        fn = tensor.grad_fn
        self.grad_fn = fn.name() if fn is not None else None
        self.output_nr = tensor.output_nr if fn is not None else 0
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.device = tensor.device
        self.expand_to: tuple[int, ...] | None = None

    def current_version(self) -> int:
        if self.probe is not None:
            return self.probe._version
        if isinstance(self.payload, Tensor):
            return self.payload._version
        return self.version

    def check_version(self) -> None:
        current = self.current_version()
        if current == self.version:
            return
        where = f", which is output {self.output_nr} of {self.grad_fn}," if self.grad_fn else ""
        module = f"module '{self.module_name}'" if self.module_name else "the root module"
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"[{_tensor_type(self.dtype, self.device)} {list(self.shape)}]{where} is at version {current}; "
            f"expected version {self.version} instead. Hint: the tensor was saved for backward while {module} "
            "was running; lightning_memcomp checks this itself because saved_tensors_hooks switch off "
            "PyTorch's own check. Clone the tensor before modifying it, or use the out-of-place operation."
        )

    def decode(self) -> Tensor:
        self.check_version()
        out = self.codec.decode(self.payload)
        if self.expand_to is not None:
            out = out.expand(self.expand_to)
        return out

    def decode_batch(self, start: int, stop: int) -> Tensor | None:
        """Rows ``start:stop`` of the decoded tensor, or ``None`` (see :meth:`Codec.decode_batch`); the caller
        has checked the version."""
        if self.expand_to is not None:
            return None
        if isinstance(self.payload, Tensor):
            return self.payload[start:stop]
        return self.codec.decode_batch(self.payload, start, stop)


class _ViewPacked:
    """A saved view rebuilt from the pack of a dense region of the same storage (packed once)."""

    __slots__ = ("base", "size", "stride", "offset", "base_size", "base_stride", "__weakref__")

    def __init__(self, base: _Packed, tensor: Tensor, base_offset: int, base_size: tuple[int, ...],
                 base_stride: tuple[int, ...]) -> None:
        self.base = base
        self.size = tuple(tensor.shape)
        self.stride = tuple(tensor.stride())
        self.offset = tensor.storage_offset() - base_offset
        self.base_size = base_size
        self.base_stride = base_stride

    def decode(self) -> Tensor:
        decoded = self.base.decode()
        if decoded.stride() != self.base_stride or tuple(decoded.shape) != self.base_size:
            # lay the decoded region out as it was in the original storage, then take the view
            buf = decoded.new_empty(_span(self.base_size, self.base_stride))
            buf.as_strided(self.base_size, self.base_stride).copy_(decoded)
            decoded = buf
        return decoded.as_strided(self.size, self.stride, decoded.storage_offset() + self.offset)

    def check_version(self) -> None:
        self.base.check_version()

    def decode_batch(self, start: int, stop: int) -> None:
        return None  # a view of a larger pack: decoded whole


def _is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers a gap-free block of its storage, each element once (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in sorted(range(t.dim()), key=lambda d: t.stride(d)):
        if t.shape[d] == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def _span(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from the first to one past the last element a strided view touches."""
    if any(s == 0 for s in size):
        return 0
    return 1 + sum((n - 1) * st for n, st in zip(size, stride))


@dataclass
class _Region:
    """A dense region of a storage that one pack holds: element offset, span, and its view's layout."""

    offset: int
    span: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    packed: weakref.ref
    storage: StorageWeakRef  # expired once the storage is freed (its address may then be reused)


_ACTIVE_ENGINES: list[SavedTensorEngine] = []


def _uninitialized(t: Tensor) -> bool:
    """A lazy module's parameter or buffer before its first forward (``nn.LazyLinear`` and the like)."""
    return isinstance(t, nn.parameter.UninitializedTensorMixin)


def keep_exact(tensor: Tensor) -> Tensor:
    """Mark ``tensor`` (e.g. a weight computed from parameters) so no active engine encodes it; returns it.

    Use it in a ``forward`` for weights generated from parameters that the engine cannot recognise by
    itself (CSG's generated filters call it). Outside an engine it does nothing.
    """
    for engine in _ACTIVE_ENGINES:
        engine._mark_computed(tensor)
    return tensor


CodecFor = Callable[[str, nn.Module], "Codec | None"]


class SavedTensorEngine:
    """Context manager that routes every tensor autograd saves inside it through a codec.

    Args:
        model: the module whose submodules scope the saved tensors; its parameters and buffers are
            never encoded.
        codec_for: ``(qualified_name, module) -> Codec | None``; evaluated per module, the innermost
            running module with a codec encodes what is saved. ``None`` everywhere (the default for
            a plain tracker) uses the identity codec for every module.
        min_bytes: tensors smaller than this pass through untouched.
        ledger: the ledger to fill (a new one by default); it is reset on each ``__enter__``.
        conv_chunk_bytes: ``0`` (the default: the modules run unchanged), or the convolutions with a
            compressing codec (``nn.Conv1d/2d/3d``; not the identity) run a backward that decodes their saved
            input a slice of the batch at a time, slices of about this many bytes (``None``: 4 MiB on CPU,
            64 MiB on CUDA); see :mod:`lightning_memcomp.memory.lean_conv`.
        seed: base seed of the codecs' random streams (stochastic rounding); default
            ``torch.initial_seed()`` at each start.
        policy: what some saves get instead of their module's codec (e.g.
            :class:`~lightning_memcomp.compression.smooth.PrecisionPolicy`: smooth activations keep their
            derivative): an object whose ``function_mode(engine)`` returns a ``TorchFunctionMode`` that is active
            during the forward and marks calls with :meth:`expecting`, or ``None``.

    Use as ``with engine as ledger: loss = model(x)``; ``start()``/``stop()`` do the same for
    callbacks that open and close the scope in different hooks. Each start reseeds the codecs' random
    streams from ``(seed, step)``: ``start(step=k)`` names the step (the Lightning callbacks and
    strategies pass the trainer's step and batch index, so a resumed run draws what the uninterrupted
    one drew); without a step, the step is derived from the state of torch's default generators, read
    but never advanced: after ``torch.manual_seed(s)`` the same code draws the same numbers, and starts
    that find the generators unchanged (no random op ran in between) are counted so that no two draw
    alike; :meth:`reset_rng` restarts that count.
    """

    def __init__(
        self,
        model: nn.Module,
        codec_for: CodecFor | None = None,
        *,
        min_bytes: int = DEFAULT_MIN_BYTES,
        ledger: Ledger | None = None,
        seed: int | None = None,
        conv_chunk_bytes: int | None = 0,
        policy: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"min_bytes={min_bytes!r} is not allowed; use an integer >= 0")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed={seed!r} is not allowed; use an int or None (torch.initial_seed())")
        lean_conv.check_chunk_bytes(conv_chunk_bytes)
        self.model = model
        self.min_bytes = int(min_bytes)
        self.conv_chunk_bytes = conv_chunk_bytes
        self._undo_conv: list[Callable[[], None]] = []
        self._repeat: tuple[int, int, tuple[int, ...], tuple[int, ...]] | None = None
        self.ledger = ledger if ledger is not None else Ledger()
        self.seed = seed
        self.policy = policy
        self._expect: tuple[Codec, tuple[int, ...], torch.dtype] | None = None
        self._mode: Any = None
        self._identity = IdentityCodec()
        self._codecs: dict[str, Codec | None] = {}
        for name, module in model.named_modules():
            codec = codec_for(name, module) if codec_for is not None else self._identity
            self._codecs[name] = codec
        # some modules have no codec: what they save is left as it is, "not selected"
        self._selective = any(codec is None for codec in self._codecs.values())
        self._stack: list[tuple[str, nn.Module, Codec | None]] = []
        self._outer: SavedTensorEngine | None = None
        # storage pointer -> dense regions packed from it (weak references: autograd owns the packs)
        self._regions: dict[int, list[_Region]] = {}
        # storage pointer -> (weak storage, version) of weights computed from parameters in this forward
        self._computed: dict[int, tuple[StorageWeakRef, int]] = {}
        self._param_ptrs: set[int] = set()
        self._handles: list[Any] = []
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        #: the (base seed, step) the codecs were last seeded with
        self.rng_state: tuple[int, int] | None = None

    # -- scope -----------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._hooks is not None

    def codec_of(self, name: str) -> Codec | None:
        return self._codecs.get(name)

    def codecs(self) -> list[Codec]:
        """The distinct codecs this engine uses."""
        seen: dict[int, Codec] = {}
        for codec in (self._identity, *self._codecs.values()):
            if codec is not None:
                seen.setdefault(id(codec), codec)
        return list(seen.values())

    def reset_rng(self) -> None:
        """Forget the start count: the next start without a step draws as the first one after a seed did."""
        _RNG_TRACK["fingerprint"] = None
        _RNG_TRACK["count"] = 0

    def _reseed(self, step: int | None) -> None:
        if step is None:
            # read, not advance, torch's default generators: the same state (torch.manual_seed) gives the
            # same numbers, and starts that find it unchanged (nothing random ran since) count up
            fingerprint = _global_rng_fingerprint()
            if fingerprint != _RNG_TRACK["fingerprint"]:
                _RNG_TRACK["fingerprint"], _RNG_TRACK["count"] = fingerprint, 0
            count = _RNG_TRACK["count"]
            _RNG_TRACK["count"] = count + 1
            step = mix_seed(int.from_bytes(fingerprint, "little"), count)
        base = self.seed if self.seed is not None else torch.initial_seed()
        self.rng_state = (int(base), int(step))
        for codec in self.codecs():
            codec.reseed(int(base), int(step))

    def start(self, step: int | None = None) -> Ledger:
        if self._hooks is not None:
            raise RuntimeError("this SavedTensorEngine is already active; engines are not re-entrant")
        # nested engines compose: this one takes the tensors saved in its modules, the engine it was opened
        # inside (if any) the rest
        self._outer = _ACTIVE_ENGINES[-1] if _ACTIVE_ENGINES else None
        meta = next((name for name, p in self.model.named_parameters() if not _uninitialized(p) and p.is_meta), None)
        if meta is not None:
            raise ValueError(
                f"the model's parameter {meta!r} is on the meta device: a forward on meta tensors saves no data and "
                "the ledger would be all zeros; materialize the model first (model.to_empty(device=...) and "
                "initialise it, or load its weights)"
            )
        self.ledger.reset()
        self._regions.clear()
        self._computed.clear()
        self._stack.clear()
        self._reseed(step)
        self._param_ptrs = {
            t.untyped_storage().data_ptr()
            for t in (*self.model.parameters(), *self.model.buffers())
            if not _uninitialized(t) and t.numel() > 0  # a lazy module's parameters exist after its first call
        }
        names = {module: name for name, module in self.model.named_modules(remove_duplicate=False)}
        mode = self.policy.function_mode(self) if self.policy is not None else None  # before anything is entered
        try:
            for module, name in names.items():
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                self._handles.append(module.register_forward_hook(self._post_hook(name), always_call=True))
            if self.conv_chunk_bytes != 0:
                for module, name in names.items():
                    codec = self._codecs.get(name)
                    # a codec that keeps tensors as they are (identity) changes nothing, not even rounding
                    if codec is not None and codec.compresses and lean_conv.is_lean_candidate(module):
                        self._undo_conv.append(lean_conv.install(module, self._pack_for_conv, self.conv_chunk_bytes))
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
            _ACTIVE_ENGINES.append(self)
            if mode is not None:
                mode.__enter__()
                self._mode = mode
        except BaseException:
            self.stop()  # leaves nothing entered or registered
            raise
        return self.ledger

    def stop(self) -> Ledger:
        try:
            if self._mode is not None:
                mode, self._mode = self._mode, None
                mode.__exit__(None, None, None)
            if self._hooks is not None:
                self._hooks.__exit__(None, None, None)
        finally:
            self._hooks = None
            if self in _ACTIVE_ENGINES:
                _ACTIVE_ENGINES.remove(self)
            self._remove_module_hooks()
            self._regions.clear()
            self._computed.clear()
            self._stack.clear()
        return self.ledger

    def __enter__(self) -> Ledger:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _remove_module_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for undo in self._undo_conv:
            undo()
        self._undo_conv.clear()
        self._repeat = None

    @contextlib.contextmanager
    def expecting(self, codec: Codec, shape: tuple[int, ...], dtype: torch.dtype) -> Iterator[None]:
        """Inside: a floating save of this shape and dtype (the one tensor a marked call saves, e.g. a SiLU's
        input) is coded by ``codec`` when the running module has a codec, and never shared with other saves of
        the same storage (the payload means something only to that call's backward)."""
        previous, self._expect = self._expect, (codec, shape, dtype)
        try:
            yield
        finally:
            self._expect = previous

    def _mark_computed(self, tensor: Tensor) -> None:
        if isinstance(tensor, Tensor) and tensor.numel() > 0 and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            self._computed[storage.data_ptr()] = (StorageWeakRef(storage), tensor._version)

    def _pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append((name, module, self._codecs.get(name)))
            # weights computed before the forward and held as plain attributes (hook-based weight norm)
            for value in module.__dict__.values():
                if isinstance(value, Tensor) and value.requires_grad and not isinstance(value, nn.Parameter):
                    self._mark_computed(value)

        return hook

    def _post_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # pop up to and including this module's frame (a failed child leaves its own frame)
            while self._stack:
                top_name, top_module, _ = self._stack.pop()
                if top_module is module and top_name == name:
                    break
            if isinstance(module, _PARAMETRIZATION_TYPES) and isinstance(output, Tensor):
                self._mark_computed(output)  # a parametrized weight (weight/spectral norm, orthogonal, ...)

        return hook

    def _scope(self) -> tuple[SaveContext, Codec | None]:
        for name, module, codec in reversed(self._stack):
            if codec is not None:
                return SaveContext(name, module), codec
        if self._stack:
            name, module, _ = self._stack[-1]
            return SaveContext(name, module), None
        root_codec = self._codecs.get("")
        return SaveContext("", self.model), root_codec

    # -- hooks -----------------------------------------------------------------------------------
    def _is_exact_weight(self, tensor: Tensor, ptr: int) -> bool:
        if ptr in self._param_ptrs or self._is_parameter_cast(tensor):
            return True
        computed = self._computed.get(ptr)
        return computed is not None and not computed[0].expired()

    def _find_region(self, ptr: int, tensor: Tensor) -> tuple[_Region, _Packed] | None:
        regions = self._regions.get(ptr)
        if not regions:
            return None
        lo = tensor.storage_offset()
        hi = lo + _span(tuple(tensor.shape), tuple(tensor.stride()))
        for region in regions:
            packed = region.packed()
            if (packed is None or region.storage.expired() or packed.version != tensor._version
                    or packed.dtype != tensor.dtype):
                continue
            if region.offset <= lo and hi <= region.offset + region.span:
                return region, packed
        return None

    def _pack(self, tensor: Tensor) -> Any:
        if tensor.device.type == "meta" or tensor.numel() == 0:
            return tensor
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if self._is_exact_weight(tensor, ptr):
            self.ledger.parameter_saves += 1
            return tensor
        if self._expect is not None:
            packed = self._pack_expected(tensor)
            if packed is not None:
                return packed
        # one pack per storage region: a later save of a view inside a packed dense region (the next conv
        # saving a ReLU output, a transpose) is rebuilt from that pack, whatever codec the later module has
        found = self._find_region(ptr, tensor)
        if found is not None:
            region, packed = found
            geometry = (ptr, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
            if self._repeat == geometry:
                self._repeat = None  # the sliced convolution's own save of what it packed: counted once
            else:
                self.ledger.shared_saves += 1
            if tuple(tensor.shape) == region.size and tuple(tensor.stride()) == region.stride and (
                tensor.storage_offset() == region.offset
            ):
                return packed
            return _ViewPacked(packed, tensor, region.offset, region.size, region.stride)
        ctx, codec = self._scope()
        if codec is None and self._outer is not None and self._outer.active:
            return self._outer._pack(tensor)  # not one of this engine's modules: the outer engine's codec
        reason = None
        if codec is None:
            codec = self._identity
            reason = "not selected" if self._selective else None
        # an expanded view is packed at the size of what it expands (stride-0 dimensions taken once)
        base = tensor
        if 0 in tensor.stride() and not _is_dense(tensor):
            for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride())):
                if stride == 0 and size > 1:
                    base = base.narrow(dim, 0, 1)
        raw = base.numel() * base.element_size()
        if reason is None and raw < self.min_bytes:
            reason = "small"
        elif reason is None and not codec.accepts(base, ctx):
            reason = "not floating" if not base.is_floating_point() else "declined by codec"
        passthrough = reason is not None
        if passthrough:
            codec = self._identity
        payload = codec.encode(base, ctx)
        stored = raw if passthrough else codec.stored_nbytes(payload)
        if not passthrough and ((codec.compresses and payload is base) or stored > raw):
            # kept as it is: the codec declined (non-finite values) or the payload would not be smaller
            passthrough, codec, payload, stored = True, self._identity, base, raw
            reason = "declined by codec"
        packed = _Packed(codec, payload, base, ctx.module_name)
        if base is not tensor:
            packed.expand_to = tuple(tensor.shape)
        name = "passthrough" if passthrough else getattr(codec, "payload_name", lambda _: codec.name)(payload)
        self.ledger.record(ctx.module_name, name, raw, stored, passthrough, reason)
        if _is_dense(base):
            regions = self._regions.setdefault(ptr, [])
            if len(regions) > 64:
                regions[:] = [r for r in regions if r.packed() is not None]
            regions.append(_Region(base.storage_offset(), base.numel(), tuple(base.shape), tuple(base.stride()),
                                   weakref.ref(packed, self._forget(ptr)), StorageWeakRef(storage)))
        return packed

    def _pack_expected(self, tensor: Tensor) -> _Packed | None:
        """The save a marked call expects (:meth:`expecting`), coded by its codec; ``None``: the usual path."""
        codec, shape, dtype = self._expect  # type: ignore[misc]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or not _is_dense(tensor):
            return None
        ctx, module_codec = self._scope()
        raw = tensor.numel() * tensor.element_size()
        if module_codec is None or not module_codec.compresses or raw < self.min_bytes:
            return None  # not selected, the identity (accounting only), or small: as any other save
        if not codec.accepts(tensor, ctx):
            return None
        payload = codec.encode(tensor, ctx)
        if payload is tensor:
            return None  # declined (non-finite values): the usual path keeps it
        self._expect = None  # one save per marked call
        packed = _Packed(codec, payload, tensor, ctx.module_name)
        self.ledger.record(ctx.module_name, codec.name, raw, codec.stored_nbytes(payload), False)
        return packed

    def _pack_for_conv(self, tensor: Tensor, weight: Tensor) -> _Packed | _ViewPacked | None:
        """The pack of a convolution's input for its sliced backward, or ``None``: the convolution stays
        PyTorch's (the input is not one dense region, or the weight is not a parameter or a weight computed
        from parameters, which the plain save would encode). The convolution saves the same input right after;
        that save finds this pack and is not counted again. The weight is counted as the plain save counts it."""
        if tensor.device.type == "meta" or tensor.numel() == 0 or not _is_dense(tensor):
            return None
        if not self._innermost_hooks():
            return None  # other saved-tensor hooks run inside this engine (a checkpoint): they decide the save
        if weight.numel() == 0 or not self._is_exact_weight(weight, weight.untyped_storage().data_ptr()):
            return None
        packed = self._pack(tensor)
        if not isinstance(packed, (_Packed, _ViewPacked)):
            return None
        self.ledger.parameter_saves += 1
        self._repeat = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                        tuple(tensor.stride()))
        return packed

    def _innermost_hooks(self) -> bool:
        """Whether this engine's saved-tensor hooks are the ones a save would run now (not those of a
        non-reentrant ``torch.utils.checkpoint`` or of another engine opened inside it)."""
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        if top is None:
            return True  # no way to tell on this torch: as before
        hooks = top(False)
        return hooks is not None and hooks[0] == self._pack

    def _forget(self, ptr: int) -> Callable:
        regions_ref = weakref.ref(self)

        def callback(ref: weakref.ref) -> None:
            engine = regions_ref()
            if engine is None:
                return
            regions = engine._regions.get(ptr)
            if regions is None:
                return
            regions[:] = [r for r in regions if r.packed is not ref]
            if not regions:
                engine._regions.pop(ptr, None)

        return callback

    def _is_parameter_cast(self, tensor: Tensor) -> bool:
        """A parameter cast by autocast (``ToCopyBackward0`` straight from a parameter's AccumulateGrad).

        Such a copy is a weight, not an activation: encoding it would perturb every gradient that
        flows through the layer, and autocast's cast cache holds it anyway.
        """
        fn = tensor.grad_fn
        if fn is None or fn.name() != "ToCopyBackward0":
            return False
        for next_fn, _ in fn.next_functions:
            variable = getattr(next_fn, "variable", None)
            if variable is not None and variable.untyped_storage().data_ptr() in self._param_ptrs:
                return True
        return False

    @staticmethod
    def _unpack(packed: Any) -> Tensor:
        if isinstance(packed, (_Packed, _ViewPacked)):
            return packed.decode()
        return packed


def track_saved_tensors(model: nn.Module, *, min_bytes: int = DEFAULT_MIN_BYTES) -> SavedTensorEngine:
    """Account for everything autograd saves for backward while ``model`` runs, without changing it.

    Example::

        with track_saved_tensors(model) as ledger:
            loss = model(x).sum()
        print(ledger.raw_bytes, ledger.stored_bytes)   # equal: the identity codec stores as is
        print(ledger.table(top=10))                    # the modules that hold the most
    """
    return SavedTensorEngine(model, None, min_bytes=min_bytes)
