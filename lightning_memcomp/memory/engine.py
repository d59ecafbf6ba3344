"""The saved-tensor engine: one place that sees every tensor autograd saves for backward.

Built on :class:`torch.autograd.graph.saved_tensors_hooks`. During the forward pass each saved tensor is
handed to the pack hook; the engine attributes it to the innermost module that was running, skips
parameters and buffers (by storage identity, never by value), stores each storage once (with the codec
of the module that saved it first), and
asks the codec chosen for that module to encode it. Backward calls the unpack hook, which decodes.
The forward pass itself is never changed.

Codecs (identity here; quantization and transform-domain codecs in :mod:`lightning_memcomp.compression`)
subclass :class:`Codec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from lightning_memcomp.memory.ledger import Ledger

__all__ = [
    "Codec",
    "IdentityCodec",
    "SaveContext",
    "SavedTensorEngine",
    "payload_nbytes",
    "track_saved_tensors",
]

DEFAULT_MIN_BYTES = 4096


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

    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        return tensor.is_floating_point() and tensor.requires_grad

    def encode(self, tensor: Tensor, ctx: SaveContext) -> Any:
        return tensor

    def decode(self, payload: Any) -> Tensor:
        return payload

    def stored_nbytes(self, payload: Any) -> int:
        return payload_nbytes(payload)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IdentityCodec(Codec):
    """Keeps the tensor as it is: the engine then only accounts."""


class _Packed:
    """What the autograd graph holds instead of a saved tensor."""

    __slots__ = ("codec", "payload")

    def __init__(self, codec: Codec, payload: Any) -> None:
        self.codec = codec
        self.payload = payload


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

    Use as ``with engine as ledger: loss = model(x)``; ``start()``/``stop()`` do the same for
    callbacks that open and close the scope in different hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        codec_for: CodecFor | None = None,
        *,
        min_bytes: int = DEFAULT_MIN_BYTES,
        ledger: Ledger | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
        self.model = model
        self.min_bytes = int(min_bytes)
        self.ledger = ledger if ledger is not None else Ledger()
        self._identity = IdentityCodec()
        self._codecs: dict[str, Codec | None] = {}
        for name, module in model.named_modules():
            codec = codec_for(name, module) if codec_for is not None else self._identity
            self._codecs[name] = codec
        self._stack: list[tuple[str, nn.Module, Codec | None]] = []
        self._cache: dict[tuple, tuple[StorageWeakRef, _Packed, Codec]] = {}
        self._param_ptrs: set[int] = set()
        self._handles: list[Any] = []
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    # -- scope -----------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._hooks is not None

    def codec_of(self, name: str) -> Codec | None:
        return self._codecs.get(name)

    def start(self) -> Ledger:
        if self._hooks is not None:
            raise RuntimeError("this SavedTensorEngine is already active; engines are not re-entrant")
        self.ledger.reset()
        self._cache.clear()
        self._stack.clear()
        self._param_ptrs = {
            t.untyped_storage().data_ptr()
            for t in (*self.model.parameters(), *self.model.buffers())
            if t.numel() > 0
        }
        names = {module: name for name, module in self.model.named_modules(remove_duplicate=False)}
        try:
            for module, name in names.items():
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                self._handles.append(module.register_forward_hook(self._post_hook(name), always_call=True))
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        except BaseException:
            self._remove_module_hooks()
            raise
        return self.ledger

    def stop(self) -> Ledger:
        try:
            if self._hooks is not None:
                self._hooks.__exit__(None, None, None)
        finally:
            self._hooks = None
            self._remove_module_hooks()
            self._cache.clear()
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

    def _pre_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append((name, module, self._codecs.get(name)))

        return hook

    def _post_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # pop up to and including this module's frame (a failed child leaves its own frame)
            while self._stack:
                top_name, top_module, _ = self._stack.pop()
                if top_module is module and top_name == name:
                    break

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
    def _pack(self, tensor: Tensor) -> Any:
        if tensor.device.type == "meta" or tensor.numel() == 0:
            return tensor
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._param_ptrs or self._is_parameter_cast(tensor):
            self.ledger.parameter_saves += 1
            return tensor
        ctx, codec = self._scope()
        if codec is None:
            codec = self._identity
        raw = tensor.numel() * tensor.element_size()
        passthrough = raw < self.min_bytes or not codec.accepts(tensor, ctx)
        if passthrough:
            codec = self._identity
        # one pack per storage: a later save of the same storage (the next conv saving a ReLU output)
        # reuses the first pack, whatever codec that later module has, so the original is never kept
        key = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype,
               tensor._version)
        cached = self._cache.get(key)
        if cached is not None and not cached[0].expired():
            self.ledger.shared_saves += 1
            return cached[1]
        payload = codec.encode(tensor, ctx)
        packed = _Packed(codec, payload)
        stored = raw if passthrough else codec.stored_nbytes(payload)
        self.ledger.record(ctx.module_name, "passthrough" if passthrough else codec.name, raw, stored,
                           passthrough)
        if len(self._cache) > 4096:
            self._cache = {k: v for k, v in self._cache.items() if not v[0].expired()}
        self._cache[key] = (StorageWeakRef(storage), packed, codec)
        return packed

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
        if isinstance(packed, _Packed):
            return packed.codec.decode(packed.payload)
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
