"""The convolutional slice generator (CSG) of Omidvar et al., AISTATS 2021, eq. (1).

One linear map ``A`` (no bias), shared by every converted convolution of a network, turns a code
vector ``c`` of ``code_size`` numbers into one slice ``s = Reshape(A c)`` of ``slice_shape``
(``[n_f, k, h, w]`` for 2-D convolutions: output channels, input channels, kernel). With
``binary=True`` it is the paper's BCSG: ``A = sign(W) * scale`` with ``W`` drawn from a normal
distribution, fixed, never trained.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = ["GENERATOR_NAME", "SliceGenerator", "check_slice_options"]

#: Attribute under which :func:`~lightning_memcomp.csg.slice_generate` registers the network's generator.
GENERATOR_NAME = "memcomp_slice_generator"

GeneratorSource = Union["SliceGenerator", nn.Module, Mapping[str, Any], str, os.PathLike]


def check_slice_options(slice_shape: Any, code_size: Any) -> tuple[tuple[int, ...], int]:
    """Validate ``slice_shape`` and ``code_size``; returns them as ``(tuple of ints, int)``."""
    try:
        shape = tuple(slice_shape)
    except TypeError:
        raise TypeError(
            f"slice_shape={slice_shape!r} is not a sequence; give (out_channels, in_channels, *kernel), "
            "e.g. (16, 16, 3, 3)"
        ) from None
    if not 3 <= len(shape) <= 5 or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ValueError(
            f"slice_shape={slice_shape!r} is not allowed; give 3 to 5 integers (out_channels, in_channels, "
            "*kernel) for 1-D, 2-D or 3-D convolutions, e.g. (16, 16, 3, 3)"
        )
    if any(s <= 0 for s in shape):
        raise ValueError(f"slice_shape={slice_shape!r} is not allowed; every size must be a positive integer")
    if not isinstance(code_size, int) or isinstance(code_size, bool) or code_size <= 0:
        raise ValueError(f"code_size={code_size!r} is not allowed; it must be a positive integer (the paper uses 128)")
    return shape, code_size


class SliceGenerator(nn.Module):
    """The shared linear map from a code vector to one filter slice (CSG; BCSG when ``binary``).

    Omidvar et al., "Associative Convolutional Layers", AISTATS 2021, eq. (1): ``s_i = Reshape(A c_i)``
    with ``A`` of shape ``[prod(slice_shape), code_size]`` (stored as :attr:`weight`, laid out like an
    ``nn.Linear(code_size, prod(slice_shape), bias=False)``).

    Args:
        slice_shape: ``(out_channels, in_channels, *kernel)`` of one slice, e.g. ``(16, 16, 3, 3)``.
        code_size: length of a code vector (``n_c``; the paper uses about ``prod(slice_shape) / 18``).
        binary: BCSG: ``weight = sign(W) * scale`` from a normal ``W``, fixed; implies ``trainable=False``.
        trainable: whether the generator is trained with the codes (default: unless ``binary``).
            ``False`` gives a frozen generator (the paper's "pre-trained CSG"); a binary generator is
            never trained.
        scale: magnitude of the binary weights; default ``1 / sqrt(code_size)``, so that a generated
            entry has the variance of the codes (the paper's ``+-1`` differs only by a code rescaling).

    The initial (non-binary) weights are ``N(0, 1 / code_size)`` for the same reason. Codes are
    initialized by the converted layers so that the generated filters have Kaiming variance.

    Raises:
        ValueError: non-positive sizes, or ``binary=True`` with ``trainable=True``.
    """

    def __init__(
        self,
        slice_shape: Sequence[int],
        code_size: int,
        binary: bool = False,
        trainable: bool | None = None,
        scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.slice_shape, self.code_size = check_slice_options(slice_shape, code_size)
        if trainable is None:
            trainable = not binary
        if binary and trainable:
            raise ValueError(
                "binary=True with trainable=True is not allowed: a binary generator (BCSG) is fixed at "
                "sign(w) * scale and never trained; pass trainable=False"
            )
        if scale is not None and (not binary or scale <= 0):
            raise ValueError(f"scale={scale!r} is only allowed for binary=True, and must be positive")
        self.binary = bool(binary)
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.code_size)
        self.weight = nn.Parameter(
            torch.empty(self.slice_numel, self.code_size, device=device, dtype=dtype), requires_grad=trainable
        )
        self.reset_parameters()

    @property
    def slice_numel(self) -> int:
        """Number of entries of one slice, ``prod(slice_shape)``."""
        return math.prod(self.slice_shape)

    @property
    def trainable(self) -> bool:
        """Whether the generator receives gradients (never for a binary generator)."""
        return self.weight.requires_grad and not self.binary

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Redraw ``A``: ``N(0, 1/code_size)``, or ``sign(N(0, 1)) * scale`` when binary."""
        if self.binary:
            w = torch.randn(self.weight.shape, device=self.weight.device)
            self.weight.copy_(torch.where(w >= 0, self.scale, -self.scale))
        else:
            nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.code_size))

    def freeze(self) -> SliceGenerator:
        """Stop training the generator (the paper's pre-trained, fixed CSG); returns ``self``."""
        self.weight.requires_grad_(False)
        return self

    def forward(self, codes: Tensor) -> Tensor:
        """Slices ``[n, prod(slice_shape)]`` (flat, row-major in ``slice_shape``) from codes ``[n, code_size]``."""
        # a binary (or frozen) generator is detached so that it cannot train even if a caller flips
        # requires_grad on it
        if codes.dim() not in (1, 2) or codes.shape[-1] != self.code_size:
            raise ValueError(
                f"SliceGenerator(code_size={self.code_size}) got an input of shape {tuple(codes.shape)}, not codes "
                f"[n, {self.code_size}]. Called as a stage of an nn.Sequential? slice_generate registers the "
                f"generator on the model it converts (as {GENERATOR_NAME}), so a converted nn.Sequential runs it; "
                "convert a module that holds the Sequential instead"
            )
        weight = self.weight if self.trainable else self.weight.detach()
        return torch.nn.functional.linear(codes, weight)

    def mean_square_gain(self) -> float:
        """``E[(A c)_j^2] / E[c_k^2]`` for i.i.d. zero-mean codes: ``sum(A^2) / prod(slice_shape)``."""
        return float(self.weight.detach().double().pow(2).sum()) / self.slice_numel

    # -- least-squares fitting (init="fit") --------------------------------------------------------

    @torch.no_grad()
    def fit_codes(self, slices: Tensor, mask: Tensor | None = None) -> Tensor:
        """Least-squares codes ``argmin_c ||mask * (A c - s)||`` for each row of ``slices`` ``[n, slice_numel]``.

        ``mask`` (bool, same shape) marks the entries that exist in the layer; cropped entries of
        fractional slices are free. Solved with a pseudo-inverse per mask pattern, in float64.
        """
        a = self.weight.detach().double()
        target = slices.detach().to(a)
        codes = torch.zeros(slices.shape[0], self.code_size, dtype=torch.float64, device=a.device)
        if mask is None:
            mask = torch.ones_like(target, dtype=torch.bool)
        patterns, inverse = torch.unique(mask.to(a.device), dim=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            rows = inverse == p
            pinv = torch.linalg.pinv(a[pattern])
            codes[rows] = target[rows][:, pattern] @ pinv.T
        return codes

    @torch.no_grad()
    def fit_to_slices_(self, slices: Tensor, mask: Tensor | None = None) -> None:
        """Set ``A`` to the ``code_size`` principal directions of ``slices`` (rows), the best linear fit.

        Rows with cropped entries (``mask`` false) are used only when fewer than ``code_size`` complete
        slices exist (their missing entries count as zeros). Directions beyond the data's rank are
        filled with random orthogonal ones. ``A`` keeps the scale of the random initialization.
        """
        if self.binary:
            raise ValueError("a binary generator (BCSG) is fixed at sign(w) * scale and cannot be fitted")
        data = slices.detach().double()
        if mask is not None:
            full = mask.all(dim=1)
            data = data[full] if int(full.sum()) >= self.code_size else data * mask
        gram = data.T @ data  # [numel, numel]: cheap whatever the number of slices
        _, vectors = torch.linalg.eigh(gram)
        basis = vectors[:, -self.code_size :].flip(1)  # orthonormal, strongest first
        # eigh returns an orthonormal basis of the whole space, so directions beyond the data's rank
        # are already orthogonal complements
        a = basis * math.sqrt(self.slice_numel / self.code_size)
        self.weight.copy_(a.to(self.weight))

    # -- extra state: makes a saved generator self-describing ------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"slice_shape": list(self.slice_shape), "code_size": self.code_size, "binary": self.binary}

    def set_extra_state(self, state: Any) -> None:
        shape = tuple(state["slice_shape"])
        if shape != self.slice_shape or state["code_size"] != self.code_size:
            raise ValueError(
                f"cannot load a slice generator with slice_shape={shape}, code_size={state['code_size']} into "
                f"one with slice_shape={self.slice_shape}, code_size={self.code_size}"
            )
        if bool(state.get("binary", False)) != self.binary:
            raise ValueError(
                f"cannot load a generator with binary={state.get('binary')} into one with binary={self.binary}"
            )

    def extra_repr(self) -> str:
        kind = "binary" if self.binary else ("trainable" if self.trainable else "frozen")
        return f"slice_shape={self.slice_shape}, code_size={self.code_size}, {kind}"

    # -- taking a generator from elsewhere ---------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: GeneratorSource, trainable: bool = False) -> SliceGenerator:
        """A copy of the generator held by ``source``, frozen unless ``trainable`` (the paper's pre-trained CSG).

        ``source`` is a :class:`SliceGenerator`, a module that holds exactly one (a converted model or
        layer), a state dict or Lightning checkpoint dict holding exactly one saved generator, or a
        path to a file that ``torch.load`` reads into such a dict.

        Raises:
            ValueError: ``source`` holds no generator, or several.
        """
        if isinstance(source, (str, os.PathLike)):
            source = torch.load(source, map_location="cpu", weights_only=True)
        if isinstance(source, SliceGenerator):
            found = copy.deepcopy(source)
        elif isinstance(source, nn.Module):
            held = {id(g): g for g in _generators_in(source)}
            if len(held) != 1:
                raise ValueError(
                    f"generator source {type(source).__name__} holds {len(held)} slice generators; "
                    "it must hold exactly one"
                )
            found = copy.deepcopy(next(iter(held.values())))
        elif isinstance(source, Mapping):
            found = cls._from_state_dict(source)
        else:
            raise TypeError(
                f"generator={type(source).__name__} is not allowed; give a SliceGenerator, a module holding one, "
                "a state dict or checkpoint dict, or a checkpoint path"
            )
        found.weight.requires_grad_(trainable and not found.binary)
        if trainable and found.binary:
            raise ValueError("trainable=True is not allowed for a binary generator (BCSG is never trained)")
        return found

    @classmethod
    def _from_state_dict(cls, state: Mapping[str, Any]) -> SliceGenerator:
        if "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]  # a Lightning checkpoint
        prefixes = [
            key[: -len("_extra_state")]
            for key, value in state.items()
            if key.endswith("_extra_state")
            and isinstance(value, Mapping)
            and {"slice_shape", "code_size"} <= set(value)
            and key[: -len("_extra_state")] + "weight" in state
        ]
        if len(prefixes) != 1:
            raise ValueError(
                f"the state dict holds {len(prefixes)} saved slice generators ({', '.join(prefixes) or 'none'}); "
                "it must hold exactly one (keys '<name>.weight' and '<name>._extra_state')"
            )
        prefix = prefixes[0]
        meta = state[prefix + "_extra_state"]
        weight = state[prefix + "weight"]
        gen = cls(meta["slice_shape"], meta["code_size"], binary=bool(meta.get("binary", False)), trainable=False,
                  dtype=weight.dtype)
        gen.load_state_dict({"weight": weight, "_extra_state": meta})
        return gen


def _generators_in(module: nn.Module) -> list[SliceGenerator]:
    """Slice generators registered in ``module`` or referenced by its converted layers."""
    found = [m for m in module.modules() if isinstance(m, SliceGenerator)]
    for m in module.modules():
        gen = getattr(m, "_generator", None)
        if isinstance(gen, SliceGenerator):
            found.append(gen)
    return found
