"""The parent: every method in its own process, the ratios to the baseline, and the Pareto front."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence

from lightning_memcomp.bench.config import BenchConfig
from lightning_memcomp.bench.methods import Method
from lightning_memcomp.bench.networks import resolve_network
from lightning_memcomp.bench.results import MethodResult, ratio
from lightning_memcomp.bench.worker import spawn

__all__ = ["add_ratios", "run_benchmark"]


def add_ratios(results: list[MethodResult], timing: str = "interleaved") -> None:
    """Fill each row's ratios to the baseline row and mark the rows on the memory/time Pareto front."""
    base = next((r for r in results if r.method == "baseline" and r.status == "ok"), None)
    for r in results:
        if r.status != "ok" or base is None:
            continue
        r.held_ratio = ratio(r.held_bytes, base.held_bytes)
        r.after_forward_ratio = ratio(r.after_forward_bytes, base.after_forward_bytes)
        r.step_peak_ratio = ratio(r.step_peak_bytes, base.step_peak_bytes)
        r.batch_multiplier = ratio(base.peak_per_sample_bytes, r.peak_per_sample_bytes)
        r.params_ratio = ratio(r.trainable_params, base.trainable_params)
        if r is base:
            r.time_ratio = 1.0
        elif timing == "isolated" or r.time_ratio is None:
            r.time_ratio = ratio(r.step_time_s, base.step_time_s)
    ok = [r for r in results if r.status == "ok" and r.held_bytes is not None and r.time_ratio is not None]
    for r in ok:
        r.pareto = not any(
            o is not r and o.held_bytes <= r.held_bytes and o.time_ratio <= r.time_ratio  # type: ignore[operator]
            and (o.held_bytes < r.held_bytes or o.time_ratio < r.time_ratio)  # type: ignore[operator]
            for o in ok
        )


def run_benchmark(
    cfg: BenchConfig,
    methods: Sequence[Method],
    *,
    progress: bool = True,
    jobs: int = 1,
    on_result: Callable[[list[MethodResult]], None] | None = None,
) -> list[MethodResult]:
    """Run every method in its own process (the baseline added when missing) and add the ratios.

    Args:
        jobs: workers running at the same time. Memory figures are per process and stay exact; step times
            slow down together, so with ``jobs > 1`` use ``timing="interleaved"``, whose ratios compare
            steps taken side by side in one worker.
        on_result: called with the rows measured so far (in method order, ratios filled) after each method,
            e.g. to write partial results during a long run.
    """
    cfg.validate()
    if jobs < 1:
        raise ValueError(f"--jobs={jobs} is not allowed; use 1 or more")
    resolve_network(cfg)  # fail here, once, on a bad name
    methods = list(methods)
    if Method("baseline") in methods:
        methods.remove(Method("baseline"))
    methods.insert(0, Method("baseline"))
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:  # pragma: no cover - tqdm is a Lightning dependency
        tqdm = None
    bar = tqdm(total=len(methods), desc="memcomp bench", unit="method", file=sys.stderr,
               disable=not progress) if tqdm else None
    done: dict[Method, MethodResult] = {}

    def finished(method: Method, result: MethodResult) -> None:
        done[method] = result
        if bar is not None:
            bar.set_postfix_str(f"{method.name} {result.status}")
            bar.update(1)
        if on_result is not None:
            rows = [copy.copy(done[m]) for m in methods if m in done]
            add_ratios(rows, cfg.timing)
            on_result(rows)

    if jobs == 1:
        for method in methods:
            if bar is not None:
                bar.set_postfix_str(method.name)
            finished(method, spawn(cfg, method))
    else:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(spawn, cfg, m): m for m in methods}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    if bar is not None:
        bar.close()
    results = [done[m] for m in methods]
    add_ratios(results, cfg.timing)
    return results
