"""The benchmark's settings: everything a worker needs to rebuild the same network, input and training step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_memcomp.bandlimit.functional import FFT_SIZES as BAND_FFT_SIZES

__all__ = ["DEVICES", "TIMINGS", "BenchConfig"]

TIMINGS = ("interleaved", "isolated")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class BenchConfig:
    """Everything a worker needs to rebuild the same network, input and training step."""

    network: str = "resnet18_cifar"
    batch_size: int | None = None
    input_size: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None
    steps: int = 5
    warmup: int = 2
    timing: str = "interleaved"
    accuracy_epochs: int = 0
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    lr: float = 0.01
    csg_slice: tuple[int, ...] | None = None
    csg_code_size: int = 128
    checkpoint_modules: tuple[str, ...] | None = None
    band_fft_size: str = "power2"
    timeout: float = 3600.0
    peak_batch: int | None = None
    #: every method (the baseline too) runs ``model.compile()``; activation codecs then run inside the graphs
    compile: bool = False

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--steps={self.steps} is not allowed; use 1 or more")
        if self.warmup < 0:
            raise ValueError(f"--warmup={self.warmup} is not allowed; use 0 or more")
        if self.timing not in TIMINGS:
            raise ValueError(f"--timing={self.timing!r} is not allowed; use one of {', '.join(TIMINGS)}")
        if self.device not in DEVICES:
            raise ValueError(f"--device={self.device!r} is not allowed; use one of {', '.join(DEVICES)}")
        if self.accuracy_epochs < 0:
            raise ValueError(f"--accuracy-epochs={self.accuracy_epochs} is not allowed; use 0 (off) or more")
        for option, value in (("--batch-size", self.batch_size), ("--input-size", self.input_size),
                              ("--in-channels", self.in_channels), ("--num-classes", self.num_classes),
                              ("--threads", self.threads)):
            if value is not None and value < 1:
                raise ValueError(f"{option}={value} is not allowed; use a positive integer")
        if not self.lr > 0:
            raise ValueError(f"--lr={self.lr} is not allowed; use a positive learning rate")
        if self.timeout <= 0:
            raise ValueError(f"--timeout={self.timeout} is not allowed; use a positive number of seconds")
        if self.peak_batch is not None and (self.peak_batch < 2 or (
                self.batch_size is not None and self.peak_batch <= self.batch_size)):
            raise ValueError(f"--peak-batch={self.peak_batch} is not allowed; use a batch size larger than "
                             f"--batch-size ({self.batch_size or 'the network default'})")
        if self.band_fft_size not in BAND_FFT_SIZES:
            raise ValueError(f"--band-fft-size={self.band_fft_size!r} is not allowed; use one of "
                             f"{', '.join(BAND_FFT_SIZES)}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device=cuda was given but no CUDA device is available; use --device cpu or auto")
        return torch.device(self.device)
