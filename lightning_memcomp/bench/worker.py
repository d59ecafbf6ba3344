"""One method, one process: the worker's measurements, and the parent's side of running it in a fresh process.

The parent calls :func:`spawn`, which runs ``python -m lightning_memcomp.bench ... --worker METHOD``; that
process runs :func:`serve`, which measures with :func:`run_worker` and prints the result as one marked JSON
line (:mod:`lightning_memcomp.bench.process`).
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lightning_memcomp.bench.accuracy import measure_accuracy
from lightning_memcomp.bench.config import BenchConfig
from lightning_memcomp.bench.methods import Method
from lightning_memcomp.bench.networks import NetworkSpec, random_batch, resolve_network
from lightning_memcomp.bench.prepare import PreparedModel
from lightning_memcomp.bench.probes import MemoryProbe, resident_bytes
from lightning_memcomp.bench.process import WorkerFailed, emit, run_fresh
from lightning_memcomp.bench.results import MethodResult
from lightning_memcomp.bench.timing import interleaved, median, train_step

__all__ = ["config_argv", "run_worker", "serve", "spawn"]


@dataclass
class _Step:
    time_s: float
    after_forward: int | None = None
    peak: int | None = None
    held: int | None = None
    held_raw: int | None = None


def _train_step(prep: PreparedModel, x: Tensor, y: Tensor, probe: MemoryProbe, *, measure: bool,
                ledger: bool = False) -> _Step:
    """One training step; time excludes the garbage collections done for the memory readings."""
    step = _Step(0.0)
    start = 0
    entered = []

    def before() -> None:
        nonlocal start
        if measure:
            probe.settle()
            start = probe.current()
            probe.reset_peak()

    def after_forward(led: object) -> None:
        entered.append(led)
        if measure:
            probe.settle()
            step.after_forward = probe.current() - start

    step.time_s = train_step(prep.model, x, y, prep.optimizer, lambda: prep.forward_context(ledger),
                             device=probe.device, before=before, after_forward=after_forward)
    if measure:
        step.peak = probe.peak(start, resident_bytes(prep.model, prep.optimizer, x, y))
    led = entered[0]
    if led is not None:
        step.held, step.held_raw = led.stored_bytes, led.raw_bytes
    return step


def _peak_per_sample(cfg: BenchConfig, spec: NetworkSpec, prep: PreparedModel, probe: MemoryProbe,
                     device: torch.device, peak_small: int | None) -> float | None:
    """The step peak's slope in the batch size: peak at ``cfg.peak_batch`` (after a warm-up step there) minus
    the peak at the network's batch, over the difference. Weights, optimizer state, libraries and workspace
    cancel; what remains is what one more sample costs at the step's peak."""
    if cfg.peak_batch is None or peak_small is None:
        return None
    if cfg.peak_batch <= spec.batch_size:
        raise ValueError(f"--peak-batch={cfg.peak_batch} is not allowed; use a batch size larger than "
                         f"{spec.batch_size}")
    x, y = random_batch(spec, device, cfg.seed, cfg.peak_batch)
    _train_step(prep, x, y, probe, measure=False)
    peaks = [_train_step(prep, x, y, probe, measure=True).peak for _ in range(min(cfg.steps, 2))]
    if any(p is None for p in peaks):
        return None
    return (max(peaks) - peak_small) / (cfg.peak_batch - spec.batch_size)  # type: ignore[type-var]


def run_worker(cfg: BenchConfig, method: Method) -> MethodResult:
    """Measure one method in this process (the parent runs it in a fresh one); see the package docstring.

    Phases: the method alone (``warmup`` steps, the last with the ledger, then ``steps`` measured steps);
    with ``timing="interleaved"`` a baseline model and ``steps`` pairs of baseline/method steps in
    alternating order; with ``accuracy_epochs`` a fresh model with the method trained on the recipe data.
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.resolved_device()
    spec = resolve_network(cfg)
    result = MethodResult(method.name, method.description, method.family)
    gc.collect()
    probe = MemoryProbe(device)

    torch.manual_seed(cfg.seed)
    prep = PreparedModel(method, spec, cfg, device, ledger=True)
    result.notes = "; ".join(prep.notes)
    result.trainable_params = prep.params
    x, y = random_batch(spec, device, cfg.seed)
    for i in range(cfg.warmup):
        step = _train_step(prep, x, y, probe, measure=False, ledger=i == cfg.warmup - 1)
        if step.held is not None:
            result.held_bytes, result.held_raw_bytes = step.held, step.held_raw
    measured = []
    for i in range(cfg.steps):
        step = _train_step(prep, x, y, probe, measure=True, ledger=result.held_bytes is None and i == 0)
        if step.held is not None and result.held_bytes is None:
            result.held_bytes, result.held_raw_bytes = step.held, step.held_raw
        measured.append(step)
    result.after_forward_bytes = int(median(s.after_forward for s in measured))  # type: ignore[misc]
    peaks = [s.peak for s in measured if s.peak is not None]
    result.step_peak_bytes = max(peaks) if peaks else None
    result.step_time_alone_s = median(s.time_s for s in measured)
    result.step_time_s = result.step_time_alone_s
    if cfg.peak_batch is not None:
        result.peak_per_sample_bytes = _peak_per_sample(cfg, spec, prep, probe, device, result.step_peak_bytes)
    if cfg.timing == "interleaved" and method.kind != "baseline":
        torch.manual_seed(cfg.seed)
        base = PreparedModel(Method("baseline"), spec, cfg, device, ledger=False)
        for _ in range(cfg.warmup):
            _train_step(base, x, y, probe, measure=False)
        times = interleaved({"baseline": lambda: _train_step(base, x, y, probe, measure=False).time_s,
                             "method": lambda: _train_step(prep, x, y, probe, measure=False).time_s}, cfg.steps)
        result.step_time_s = median(times["method"])
        result.baseline_step_time_s = median(times["baseline"])
        result.time_ratio = result.step_time_s / result.baseline_step_time_s
        del base
    elif method.kind == "baseline":
        result.baseline_step_time_s = result.step_time_s
        result.time_ratio = 1.0
    del prep
    gc.collect()
    if cfg.accuracy_epochs:
        result.accuracy, result.accuracy_metric = measure_accuracy(cfg, spec, method, device)
    return result


def serve(cfg: BenchConfig, method: Method) -> int:
    """The worker process (``--worker METHOD``): measure and print the result line; a method whose module is
    not installed becomes an ``unavailable`` row."""
    try:
        result = run_worker(cfg, method)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith(("lightning_memcomp", "recipes")):
            raise
        result = MethodResult(method.name, method.description, method.family, status="unavailable",
                              error=f"{err.name} is not part of this installation")
    emit(asdict(result))
    return 0


def config_argv(cfg: BenchConfig) -> list[str]:
    """The command-line options that rebuild ``cfg`` in a worker."""
    argv = ["--network", cfg.network, "--steps", str(cfg.steps), "--warmup", str(cfg.warmup),
            "--timing", cfg.timing, "--accuracy-epochs", str(cfg.accuracy_epochs), "--device", cfg.device,
            "--seed", str(cfg.seed), "--lr", repr(cfg.lr), "--csg-code-size", str(cfg.csg_code_size),
            "--band-fft-size", cfg.band_fft_size]
    for option, value in (("--batch-size", cfg.batch_size), ("--input-size", cfg.input_size),
                          ("--in-channels", cfg.in_channels), ("--num-classes", cfg.num_classes),
                          ("--threads", cfg.threads), ("--peak-batch", cfg.peak_batch)):
        if value is not None:
            argv += [option, str(value)]
    if cfg.csg_slice:
        argv += ["--csg-slice", ",".join(map(str, cfg.csg_slice))]
    if cfg.checkpoint_modules:
        argv += ["--checkpoint-modules", ",".join(cfg.checkpoint_modules)]
    if cfg.compile:
        argv.append("--compile")
    return argv


def spawn(cfg: BenchConfig, method: Method) -> MethodResult:
    """Measure ``method`` in a fresh process (see :func:`lightning_memcomp.bench.process.run_fresh`); a worker
    that fails or times out becomes a ``failed`` row with the reason."""
    failed = MethodResult(method.name, method.description, method.family, status="failed")
    try:
        data = run_fresh(["-m", "lightning_memcomp.bench", *config_argv(cfg), "--worker", method.name],
                         timeout=cfg.timeout)
    except WorkerFailed as err:
        failed.error = (f"no result within --timeout={cfg.timeout:g} s" if err.timed_out
                        else f"worker exited with status {err.returncode}: {err.last_line}")
        return failed
    return MethodResult.from_dict(data)
