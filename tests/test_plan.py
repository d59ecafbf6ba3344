"""``plan_batch_size``, ``BatchSizePlanner`` and ``memcomp plan``: probe steps, the linear fit, the budget, and
that probing leaves the model, its optimizer and the random number generators as they were."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_techniques import _Block as Block
from torch import nn

from lightning_memcomp.plan import (
    BatchSizePlanner,
    Plan,
    PlanRow,
    _Prober,
    available_memory,
    parse_budget,
    plan_batch_size,
    runtime_technique,
)
from lightning_memcomp.techniques import parse_technique

MiB = 1024 * 1024


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), Block(32), Block(32), Block(32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    return torch.randn(b, 3, 48, 48, generator=g), torch.randint(0, 10, (b,), generator=g)


@pytest.mark.parametrize(("text", "expected"), [("40GiB", 40 * 2**30), ("512 MiB", 512 * MiB), ("2.5GB", 2.5e9),
                                                 ("1e9", 10**9), (4096, 4096), ("3 kib", 3072)])
def test_budgets_parse(text: object, expected: float) -> None:
    assert parse_budget(text) == int(expected)


@pytest.mark.parametrize("bad", ["forty", "40 GiBs", "-1GiB", 0, "0MiB", True, "nan"])
def test_bad_budgets_are_refused_naming_the_option(bad: object) -> None:
    with pytest.raises(ValueError, match=r"budget=.* is not allowed"):
        parse_budget(bad)


def test_available_memory_on_cpu_is_positive_and_at_most_the_ram() -> None:
    import psutil

    assert 0 < available_memory("cpu") <= psutil.virtual_memory().total


# CPU step peaks are read from the process's resident set: in a process whose C heap is already full of
# freed memory (an xdist worker after many tests) a step reuses it in scattered pieces and the figures come
# out high. The numeric checks therefore plan in a fresh process, as ``memcomp plan`` does.
_FRESH = """
import json, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_plan import _net, _batch, _options
from lightning_memcomp.plan import plan_batch_size, _freed_memory_returned, _Prober
from lightning_memcomp.techniques import parse_technique
plan = plan_batch_size(_net(), _batch, ["baseline", "quant:4", "checkpoint"], budget="2GiB", probe_batches=(4, 8))
with _freed_memory_returned(True):
    prober = _Prober(_net(), parse_technique("baseline"), torch.device("cpu"), _options(), None)
    data = _batch(32)
    prober.step(data)
    measured = max(prober.measured_step(data)[0] for _ in range(2)) / 2**20
print(json.dumps({{"rows": plan.to_dicts(), "budget": plan.budget_bytes, "headroom": plan.headroom,
                  "notes": plan.notes, "measured_baseline_32": measured}}))
"""


@pytest.fixture(scope="module")
def fresh() -> dict:
    import json
    import subprocess

    code = _FRESH.format(tests=str(Path(__file__).resolve().parent))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plan(fresh: dict) -> Plan:
    rows = [PlanRow(**{**r, "probe_batches": tuple(r["probe_batches"]), "probe_peaks_mib": tuple(r["probe_peaks_mib"]),
                       "lines": tuple(tuple(line) for line in r["lines"])}) for r in fresh["rows"]]
    return Plan(rows, fresh["budget"], fresh["headroom"], "cpu", "VmHWM", fresh["notes"])


def test_the_plan_fits_a_line_through_the_probes_and_fills_the_budget(plan: Plan) -> None:
    rows = {r.method: r for r in plan.rows}
    assert list(rows) == ["baseline", "quant:4", "checkpoint"]
    assert plan.notes == []  # a fresh process: no free heap to warn about
    for row in rows.values():
        assert row.status == "ok" and row.probe_batches == (4, 8)
        # the prediction goes through the measured peaks (the timeline's lines lie below them there) and is
        # at least the line through them beyond
        for b, peak in zip(row.probe_batches, row.probe_peaks_mib):
            assert row.predicted_peak_mib(b) == pytest.approx(peak)
        slope = (row.probe_peaks_mib[1] - row.probe_peaks_mib[0]) / 4
        assert row.predicted_peak_mib(64) >= row.probe_peaks_mib[1] + 56 * slope - 1e-6
        assert (row.fixed_mib, row.per_sample_mib) in row.lines
        usable = 2 * 1024 * 0.9
        assert row.predicted_peak_mib(row.max_batch) <= usable < row.predicted_peak_mib(row.max_batch + 1)
        assert row.step_s_per_sample > 0
    # an activation of 32x48x48 float32 is 0.28 MiB a sample: compression and checkpointing hold less of them
    # (measured 3.4, 2.5 and 2.3 MiB a sample)
    assert rows["quant:4"].per_sample_mib < 0.9 * rows["baseline"].per_sample_mib
    assert rows["checkpoint"].per_sample_mib < 0.9 * rows["baseline"].per_sample_mib
    assert rows["quant:4"].max_batch > rows["baseline"].max_batch


def test_the_plan_prints_converts_and_draws(plan: Plan) -> None:
    text = plan.table()
    assert "baseline" in text and "quant:4" in text and "budget 2,048 MiB on cpu, headroom 10%" in text
    dicts = plan.to_dicts()
    assert set(dicts[0]) >= {"method", "fixed_mib", "per_sample_mib", "max_batch", "step_s_per_sample"}
    assert plan.max_batch("quant:4") == dicts[1]["max_batch"]
    with pytest.raises(KeyError, match="dct:10"):
        plan.row("dct:10")
    figure = plan.figure()
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert any(label.startswith("quant:4 (max batch") for label in labels) and "budget" in labels


def test_the_prediction_at_a_larger_batch_holds(plan: Plan, fresh: dict) -> None:
    # measured on this machine: within 1%; 15% leaves room for another allocator or thread count
    assert plan.row("baseline").predicted_peak_mib(32) == pytest.approx(fresh["measured_baseline_32"], rel=0.15)


def test_a_full_heap_is_noted() -> None:
    from lightning_memcomp.plan import FRAGMENTED_HEAP_BYTES, free_heap_bytes

    free = free_heap_bytes()
    assert free is not None and free >= 0  # glibc here
    # 32 KiB blocks live in the heap under any mmap threshold; freeing every other one leaves holes that
    # cannot be trimmed away
    count = 2 * (FRAGMENTED_HEAP_BYTES // (32 * 1024)) + 4096
    blocks = [torch.empty(8 * 1024) for _ in range(count)]
    kept = blocks[1::2]
    del blocks
    assert free_heap_bytes() > FRAGMENTED_HEAP_BYTES
    plan = plan_batch_size(_net(), _batch, ["baseline"], budget="1GiB", probe_batches=(2, 4), steps=1)
    del kept
    assert any("free C heap" in note for note in plan.notes)


def _options():
    from lightning_memcomp.bench.config import BenchConfig

    return BenchConfig(network="custom")


def test_probing_leaves_model_and_random_state_as_they_were() -> None:
    model = _net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    plan_batch_size(model, _batch, ["quant:2", "checkpoint"], budget="1GiB", probe_batches=(2, 4), steps=1)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN statistics too
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())  # checkpointing patched a copy only


def test_a_method_that_does_not_apply_gets_a_row_saying_why() -> None:
    flat = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10))
    flat(torch.randn(1, 3, 48, 48))
    plan = plan_batch_size(flat, _batch, ["checkpoint"], budget="1GiB", probe_batches=(2, 4), steps=1)
    assert plan.rows[0].status.startswith("not applicable: ") and "matched no block" in plan.rows[0].status


def test_probes_that_cannot_fit_are_refused_or_skipped() -> None:
    with pytest.raises(ValueError, match=r"the first probe, batch 4 with baseline, already needs .* MiB"):
        plan_batch_size(_net(), _batch, ["baseline"], budget="1MiB", probe_batches=(4, 8), steps=1)
    plan = plan_batch_size(_net(), _batch, ["baseline"], budget="1GiB", probe_batches=(2, 4, 100_000), steps=1)
    assert plan.rows[0].probe_batches == (2, 4)  # the line through 2 and 4 says 100,000 would not fit


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"methods": []}, "names no method"), ({"headroom": 1.0}, "headroom=1.0 is not allowed"),
     ({"probe_batches": (8,)}, "probe_batches=.* is not allowed"), ({"probe_batches": (8, 4)}, "increasing"),
     ({"steps": 0}, "steps=0 is not allowed"), ({"methods": ["quant:3"]}, "bits=3 is not allowed")],
)
def test_bad_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_batch_size(_net(), _batch, **{"methods": ["baseline"], **kwargs})


# -- the callback ----------------------------------------------------------------------------------
class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        x, y = _batch(64)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=self.batch_size)


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(len(x))
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Snapshot(pl.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.optimizer = repr(trainer.optimizers[0].state_dict())
        self.rng = torch.get_rng_state()


def test_the_planner_sets_the_batch_size_and_leaves_the_run_untouched(tmp_path: Path) -> None:
    from lightning_memcomp import ActivationCompression

    before, after = Snapshot(), Snapshot()
    planner = BatchSizePlanner(budget="1GiB", probe_batches=(2, 4), steps=1, max_batch=48)
    model, data = Module(), Data()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path,
                         callbacks=[ActivationCompression(codec="quant", bits=4), before, planner, after])
    trainer.fit(model, data)
    assert planner.plan is not None and [r.method for r in planner.plan.rows] == ["quant:4", "baseline"]
    assert planner.plan.max_batch("quant:4") > 48 and planner.batch_size == 48 == data.batch_size
    assert model.seen == [48]
    assert all(torch.equal(before.state[k], v) for k, v in after.state.items())
    assert before.optimizer == after.optimizer and torch.equal(before.rng, after.rng)


def test_the_technique_in_use_is_read_from_the_trainer() -> None:
    from lightning_memcomp import ActivationCompression

    def trainer(**kwargs):
        return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, **kwargs)

    assert runtime_technique(trainer()) == "baseline"
    assert runtime_technique(trainer(callbacks=[ActivationCompression(codec="dct")])) == "dct:10"
    assert runtime_technique(trainer(strategy="memcomp")) == "quant:4"
    assert runtime_technique(trainer(callbacks=[ActivationCompression(codec="blpa", bits=2)],
                                     precision="bf16-mixed")) == "blpa:2+bf16"


def test_the_planner_refuses_a_missing_batch_size_attribute(tmp_path: Path) -> None:
    planner = BatchSizePlanner(budget="1GiB", attr_name="no_such_attr")
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[planner])
    with pytest.raises(ValueError, match="attr_name='no_such_attr' is neither on the model"):
        trainer.fit(Module(), Data())


def test_plan_row_without_a_line_predicts_nothing() -> None:
    assert PlanRow("baseline").predicted_peak_mib(8) is None


# -- memcomp plan ----------------------------------------------------------------------------------
def test_memcomp_plan_prints_the_table_and_writes_the_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_memcomp.cli import main

    monkeypatch.setattr(sys, "argv", ["memcomp"])
    out = tmp_path / "plan"
    code = main(["plan", "--config", "digits_quant4", "--budget", "1GiB", "--probe-batches", "2,4", "--steps", "1",
                 "--technique", "checkpoint", "--out", str(out), "--data.init_args.size=16", "--device", "cpu"])
    assert code == 0
    text = capsys.readouterr().out
    rows = [line.split()[0] for line in text.splitlines() if line.split() and line.split()[0] in
            ("baseline", "quant:4", "checkpoint")]
    assert rows == ["baseline", "quant:4", "checkpoint"]
    assert out.with_suffix(".png").is_file() and "max_batch" in out.with_suffix(".csv").read_text()


def test_default_probes_put_the_sliced_convolution_backward_in_slices() -> None:
    from lightning_memcomp.plan import default_probe_batches

    # the largest convolution's input and output are 2 x 32x48x48 float32, 576 KiB a sample: 32 of them make
    # four slices of the 4 MiB chunk
    assert default_probe_batches(_net(), _batch, torch.device("cpu")) == (32, 64)
    wide = nn.Sequential(nn.Conv2d(3, 512, 1), nn.Conv2d(512, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))
    assert default_probe_batches(wide, _batch, torch.device("cpu")) == (4, 8)  # 4.5 MiB a sample: four slices at 4
    small = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    assert default_probe_batches(small, _batch, torch.device("cpu")) == (64, 128)  # at most 64


@pytest.mark.gpu
def test_on_cuda_the_planned_batch_fits_under_a_cap_and_a_fifth_more_does_not() -> None:
    import torchvision

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    cap = 4 * 2**30
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        model = torchvision.models.resnet50(num_classes=10).to(device)

        def make_batch(b: int):
            return torch.randn(b, 3, 128, 128, device=device), torch.randint(0, 10, (b,), device=device)

        plan = plan_batch_size(model, make_batch, ["baseline", "quant:4"], budget=cap, device=device)
        for method in ("baseline", "quant:4"):
            planned = plan.max_batch(method)
            assert planned and planned > max(plan.row(method).probe_batches)
            prober = _Prober(model, parse_technique(method), device, _options(), None)
            prober.step(make_batch(planned))  # no out-of-memory error
            with pytest.raises(torch.cuda.OutOfMemoryError):
                prober.step(make_batch(int(planned * 1.2) + 1))
            del prober
            torch.cuda.empty_cache()
        assert plan.max_batch("quant:4") > plan.max_batch("baseline")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
