"""A row of the benchmark: one method's figures and its ratios to the baseline, as it travels between processes;
and the ratio of two figures."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["MethodResult", "ratio"]


@dataclass
class MethodResult:
    """One row: the figures of a method, and (filled by the parent) its ratios to the baseline."""

    method: str
    description: str = ""
    family: str = ""
    status: str = "ok"  # ok | failed | unavailable
    error: str = ""
    notes: str = ""
    held_bytes: int | None = None
    held_raw_bytes: int | None = None
    after_forward_bytes: int | None = None
    step_peak_bytes: int | None = None
    #: with --peak-batch: (peak at the larger batch - peak at --batch-size) / (difference of the batch sizes)
    peak_per_sample_bytes: float | None = None
    step_time_s: float | None = None
    baseline_step_time_s: float | None = None
    step_time_alone_s: float | None = None
    trainable_params: int | None = None
    accuracy: float | None = None
    accuracy_metric: str = ""
    held_ratio: float | None = None
    after_forward_ratio: float | None = None
    step_peak_ratio: float | None = None
    #: the baseline's peak per sample over this method's: how many times larger a batch fits
    batch_multiplier: float | None = None
    time_ratio: float | None = None
    params_ratio: float | None = None
    pareto: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or ``None`` where either is missing or ``base`` is 0."""
    if value is None or base is None or base == 0:
        return None
    return value / base
