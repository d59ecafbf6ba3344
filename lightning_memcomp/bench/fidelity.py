"""Fidelity probes: what a codec gives back, and how close the gradients of a compressed step are.

* :func:`codec_roundtrip`: encode and decode one tensor with a codec: relative error and stored/raw bytes;
* :class:`CheckedCodec`: wraps a codec in an engine and counts the decodes that come back with the exact
  shape and dtype of what was encoded;
* :func:`flat_gradients` and :func:`gradient_agreement`: a step's parameter gradients against a reference.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_memcomp.memory.engine import Codec, SaveContext

__all__ = ["CheckedCodec", "Roundtrip", "codec_roundtrip", "flat_gradients", "gradient_agreement"]


@dataclass(frozen=True)
class Roundtrip:
    """One encode/decode of a tensor (see :func:`codec_roundtrip`)."""

    #: ``||x - decode(encode(x))|| / ||x||``, computed in float64
    rel_error: float
    #: stored bytes of the payload over the bytes of ``x``
    stored_ratio: float
    #: the decoded tensor has ``x``'s shape and dtype
    exact_shape_dtype: bool


def codec_roundtrip(codec: Codec, x: Tensor, ctx: SaveContext | None = None) -> Roundtrip:
    """Encode ``x`` with ``codec`` and decode it, as the engine would when backward needs it."""
    payload = codec.encode(x, ctx if ctx is not None else SaveContext("bench", None))
    rec = codec.decode(payload)
    ref = x.double()
    norm = ref.norm().item()
    error = (rec.double() - ref).norm().item()
    return Roundtrip(
        rel_error=error / norm if norm else error,
        stored_ratio=codec.stored_nbytes(payload) / (x.numel() * x.element_size()),
        exact_shape_dtype=tuple(rec.shape) == tuple(x.shape) and rec.dtype == x.dtype,
    )


class CheckedCodec(Codec):
    """``inner`` as it is (same name, same choice of tensors, same stored bytes), counting ``decodes`` and the
    ``exact`` ones: those whose shape and dtype are those of the tensor encoded."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.name = inner.name
        self.compresses = inner.compresses
        self.decodes = 0
        self.exact = 0

    def accepts(self, tensor: Tensor, ctx: SaveContext) -> bool:
        return self.inner.accepts(tensor, ctx)

    def encode(self, tensor: Tensor, ctx: SaveContext) -> Any:
        payload = self.inner.encode(tensor, ctx)
        if payload is tensor:  # the codec declined: the engine keeps the tensor as it is
            return tensor
        return tuple(tensor.shape), tensor.dtype, payload

    def decode(self, payload: Any) -> Tensor:
        shape, dtype, inner = payload
        out = self.inner.decode(inner)
        self.decodes += 1
        self.exact += int(tuple(out.shape) == shape and out.dtype == dtype)
        return out

    def stored_nbytes(self, payload: Any) -> int:
        return self.inner.stored_nbytes(payload[2])

    def reseed(self, seed: int, step: int = 0) -> None:
        self.inner.reseed(seed, step)

    def __repr__(self) -> str:
        return f"CheckedCodec({self.inner!r})"


def flat_gradients(model: nn.Module, x: Tensor, y: Tensor, context: AbstractContextManager[Any] | None = None
                   ) -> Tensor:
    """The parameter gradients of one cross-entropy step on ``(x, y)`` with the forward inside ``context``,
    flattened into one float64 vector (the model's gradients are zeroed first)."""
    model.zero_grad(set_to_none=True)
    with context if context is not None else contextlib.nullcontext():
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def gradient_agreement(grads: Tensor, reference: Tensor) -> tuple[float, bool]:
    """Cosine similarity of two flat gradients, and whether they are bit-identical."""
    cosine = float(nn.functional.cosine_similarity(grads, reference, dim=0))
    return cosine, bool(torch.equal(grads, reference))
