"""MemoryMonitor inside real Trainer.fit runs: TensorBoard events, CSV, figure, step time, progress bar, DDP rank 0."""

from __future__ import annotations

import csv
import json
import os
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import run_ddp_script
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_memcomp import MemoryMonitor
from lightning_memcomp.memory.monitor import KEYS, memory_figure


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n: int = 48, batch: int = 8) -> torch.utils.data.DataLoader:
    ds = torch.utils.data.TensorDataset(torch.randn(n, 1, 16, 16), torch.randint(0, 10, (n,)))
    return torch.utils.data.DataLoader(ds, batch_size=batch)


def _fit(tmp_path: Path, monitor: MemoryMonitor, epochs: int = 1, module: pl.LightningModule | None = None,
         loader: torch.utils.data.DataLoader | None = None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, logger=TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False), callbacks=[monitor],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        accelerator="cpu", devices=1,
    )
    trainer.fit(module or TinyModule(), loader or _loader())
    return trainer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[pl.Trainer, MemoryMonitor]:
    monitor = MemoryMonitor(every_n_steps=2)
    return _fit(tmp_path_factory.mktemp("mm"), monitor), monitor


def _events(trainer: pl.Trainer) -> EventAccumulator:
    acc = EventAccumulator(trainer.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_are_written_on_the_cadence(fitted) -> None:
    trainer, _ = fitted
    acc = _events(trainer)
    expected = {"memory/held_raw_mib", "memory/held_stored_mib", "memory/held_ratio", "memory/rss_mib",
                "memory/held_uncompressed_mib",
                "memory/rss_forward_delta_mib", "memory/peak_mib"}
    assert expected <= set(acc.Tags()["scalars"])
    assert set(acc.Tags()["scalars"]) <= set(KEYS)
    assert "hp_metric" not in acc.Tags()["scalars"]  # the monitor logs no hyperparameters
    assert [e.step for e in acc.Scalars("memory/held_raw_mib")] == [0, 2, 4]
    assert [e.step for e in acc.Scalars("time/step_s")] == [0, 2, 4]


def test_cpu_step_peak_is_logged_from_vmhwm(fitted) -> None:
    trainer, _ = fitted
    acc = _events(trainer)
    peaks = [e.value for e in acc.Scalars("memory/peak_mib")]
    rss = [e.value for e in acc.Scalars("memory/rss_mib")]
    assert len(peaks) == len(rss) == 3
    # VmHWM is reset to the RSS at step start, so the step's peak is at least the RSS at its end
    assert all(p >= r for p, r in zip(peaks, rss))


def test_held_bytes_match_the_model(fitted) -> None:
    trainer, _ = fitted
    acc = _events(trainer)
    # conv output (BN input) and ReLU output: 8x8x16x16 fp32 each; the pool output 8x8x4x4; min_bytes 4096
    expected = (2 * 8 * 8 * 16 * 16 * 4 + 8 * 8 * 4 * 4 * 4) / 2**20
    raw = [e.value for e in acc.Scalars("memory/held_raw_mib")]
    stored = [e.value for e in acc.Scalars("memory/held_stored_mib")]
    assert raw == stored
    # plus the passthrough input (8x1x16x16 fp32, no grad) and the flatten/linear input view
    assert expected <= raw[0] <= expected + (8 * 256 * 4 + 8 * 128 * 4) / 2**20


def test_trainable_parameters_are_logged_once(fitted) -> None:
    trainer, monitor = fitted
    expected = sum(p.numel() for p in trainer.lightning_module.parameters() if p.requires_grad)
    events = _events(trainer).Scalars("model/trainable_params")
    assert [(e.step, e.value) for e in events] == [(0, expected)]
    assert monitor.history[0]["model/trainable_params"] == expected
    assert all("model/trainable_params" not in row for row in monitor.history[1:])
    with open(Path(trainer.log_dir) / "memory_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["model/trainable_params"]) == expected and rows[1]["model/trainable_params"] == ""


class LazyModule(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net[-1] = nn.LazyLinear(10)  # its parameters exist only after the first forward


def test_lazy_modules_are_counted_after_the_first_batch(tmp_path) -> None:
    monitor = MemoryMonitor(every_n_steps=2)
    trainer = _fit(tmp_path, monitor, module=LazyModule())
    expected = sum(p.numel() for p in trainer.lightning_module.parameters() if p.requires_grad)
    assert expected == (8 * 9 + 8) + 8 * 2 + (128 * 10 + 10)  # conv, batch norm, the materialised linear
    assert [e.value for e in _events(trainer).Scalars("model/trainable_params")] == [expected]
    assert monitor.history[0]["model/trainable_params"] == expected
    assert monitor.history[0]["memory/held_raw_mib"] > 0  # the tracking engine ran with the lazy parameters


class Sleepy(TinyModule):
    """Sleeps ``naps[global_step]`` seconds in each training step."""

    def __init__(self, naps: dict[int, float]) -> None:
        super().__init__()
        self.naps = naps

    def training_step(self, batch, batch_idx):
        time.sleep(self.naps.get(self.global_step, 0.0))
        return super().training_step(batch, batch_idx)


def test_step_time_is_the_median_of_the_steps_between_logs(tmp_path) -> None:
    # logged steps 0 and 4; steps 1-3 are not instrumented and sleep 0.02, 0.06, 0.2 s: the median is 0.06 s
    monitor = MemoryMonitor(every_n_steps=4)
    _fit(tmp_path, monitor, module=Sleepy({0: 0.01, 1: 0.02, 2: 0.06, 3: 0.2}), loader=_loader(n=40))
    times = {int(row["step"]): row["time/step_s"] for row in monitor.history}
    assert sorted(times) == [0, 4]
    assert times[0] >= 0.01  # nothing before the first log: the logged step's own time
    assert 0.06 <= times[4] < 0.2


def test_every_step_logged_gives_each_step_its_own_time(tmp_path) -> None:
    monitor = MemoryMonitor(every_n_steps=1)
    _fit(tmp_path, monitor, module=Sleepy({1: 0.05}), loader=_loader(n=24))
    times = [row["time/step_s"] for row in monitor.history]
    assert len(times) == 3 and times[1] >= 0.05


def test_prog_bar_shows_step_peak_and_held_ratio(tmp_path, fitted) -> None:
    monitor = MemoryMonitor(every_n_steps=2, prog_bar=True)
    trainer = _fit(tmp_path, monitor)
    bar = trainer.progress_bar_metrics
    last = monitor.history[-1]
    assert bar["peak_mib"] == pytest.approx(last["memory/peak_mib"])
    assert bar["held_x"] == pytest.approx(last["memory/held_ratio"])
    assert "peak_mib" not in _events(trainer).Tags()["scalars"]  # progress bar only, the raw keys stay
    trainer_off, _ = fitted  # prog_bar=False, the default
    assert not {"peak_mib", "held_x"} & set(trainer_off.progress_bar_metrics)


READABLE_CPU = {"step peak (VmHWM, whole process)", "held for backward, dense (raw)", "held for backward, stored",
                "RSS at step end", "step time (median of the steps between logs)"}


def _legends(fig) -> list[list[str]]:
    return [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]


def test_memory_curves_png_has_readable_legends(fitted) -> None:
    trainer, monitor = fitted
    assert (Path(trainer.log_dir) / "memory_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = memory_figure(monitor.history, "cpu")
    try:
        legends = _legends(fig)
        texts = {t for legend in legends for t in legend}
        assert texts == READABLE_CPU
        assert all(len(legend) <= 2 for legend in legends)  # one panel per kind of figure
        assert not any("/" in t for t in texts)
        assert "memory/rss_forward_delta_mib" in monitor.history[0]  # logged, but not drawn (it can go negative)
        assert fig.axes[-1].get_xlabel() == "training step"
        assert [ax.get_ylabel() for ax in fig.axes] == ["memory (MiB)"] * 3 + ["time (s)"]
        assert "trainable parameters" in fig._suptitle.get_text()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_memory_figure_names_the_cuda_readings() -> None:
    import matplotlib.pyplot as plt

    row = {k: 1.0 for k in KEYS if not k.startswith("memory/rss")}
    history = [{"step": float(s), **row} for s in range(3)]
    fig = memory_figure(history, "cuda")
    try:
        legends = _legends(fig)
        assert legends[0] == ["step peak (max allocated)"]
        assert "reserved by the caching allocator" in legends[2]
        assert legends[3] == ["step time (every step logged)"]
        assert not any("/" in t for legend in legends for t in legend)
    finally:
        plt.close(fig)
    assert memory_figure([{"step": 0.0}], "cpu") is None


def test_layout_table_and_figure_are_in_tensorboard(fitted) -> None:
    trainer, _ = fitted
    tags = _events(trainer).Tags()
    assert "custom_scalars__config__" in tags["tensors"]
    assert "memory/held_by_module/text_summary" in tags["tensors"]
    assert "memory/curves" in tags["images"]


def test_csv_figure_and_table_files(fitted) -> None:
    trainer, monitor = fitted
    log_dir = Path(trainer.log_dir)
    with open(log_dir / "memory_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["step"])) for r in rows] == [0, 2, 4]
    assert float(rows[0]["memory/held_raw_mib"]) == pytest.approx(monitor.history[0]["memory/held_raw_mib"])
    png = (log_dir / "memory_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    table = (log_dir / "memory_by_module.md").read_text()
    assert "| net.1 |" in table and "**total**" in table


def test_monitor_reads_an_activation_compression_ledger(tmp_path) -> None:
    from lightning_memcomp import ActivationCompression

    monitor = MemoryMonitor()
    trainer = pl.Trainer(
        max_steps=2, logger=TensorBoardLogger(tmp_path), callbacks=[ActivationCompression(codec="identity"), monitor],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
    )
    trainer.fit(TinyModule(), _loader())
    assert monitor._engine is None  # it did not install a second engine
    assert monitor.history[0]["memory/held_raw_mib"] > 0


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="every_n_steps=0"):
        MemoryMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="snapshot_steps"):
        MemoryMonitor(snapshot_steps=(5, 2))


def test_snapshot_options_warn_on_cpu(tmp_path) -> None:
    with pytest.warns(UserWarning, match="no snapshot will be written"):
        _fit(tmp_path, MemoryMonitor(snapshot_steps=(0, 2)))


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    sys.path.insert(0, {tests!r})
    from test_memory_monitor import TinyModule, _loader
    from lightning_memcomp import MemoryMonitor

    class RankSized(TinyModule):
        # rank r trains on (r + 1) * 4 samples per step, so the ranks hold different amounts
        def training_step(self, batch, batch_idx):
            x, y = batch
            n = 4 * (self.global_rank + 1)
            loss = torch.nn.functional.cross_entropy(self.net(x[:n]), y[:n])
            return loss

    class Record(pl.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            ledger = monitor._ledger()
            with open(f"{{out}}/rank{{trainer.global_rank}}.json", "a") as f:
                f.write(json.dumps(ledger.raw_bytes / 2**20) + "\\n")

    out = sys.argv[1]
    monitor = MemoryMonitor()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp",
                         logger=TensorBoardLogger(out, name="tb"), callbacks=[monitor, Record()],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(RankSized(), _loader(n=64, batch=8))
    """
)


@pytest.mark.slow
def test_ddp_two_processes_only_rank0_writes_the_max(tmp_path) -> None:
    script = tmp_path / "ddp_monitor.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    done = run_ddp_script([str(script), str(tmp_path)], env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    versions = list((tmp_path / "tb").iterdir())
    assert len(versions) == 1
    events = list(versions[0].glob("events.out.tfevents.*"))
    assert len(events) == 1
    with open(versions[0] / "memory_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    per_rank = [[json.loads(line) for line in (tmp_path / f"rank{r}.json").read_text().splitlines()] for r in (0, 1)]
    assert per_rank[1][0] > per_rank[0][0]
    for row, r0, r1 in zip(rows, *per_rank):
        assert float(row["memory/held_raw_mib"]) == pytest.approx(max(r0, r1))


@pytest.mark.gpu
def test_cuda_keys_and_snapshot_window_on_gpu(tmp_path) -> None:
    monitor = MemoryMonitor(snapshot_steps=(1, 3))
    trainer = pl.Trainer(max_steps=4, accelerator="gpu", devices=1, logger=TensorBoardLogger(tmp_path),
                         callbacks=[monitor], enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(TinyModule(), _loader())
    row = monitor.history[0]
    cuda_keys = {"memory/alloc_before_forward_mib", "memory/alloc_after_forward_mib", "memory/forward_delta_mib",
                 "memory/alloc_after_backward_mib", "memory/alloc_after_step_mib", "memory/peak_mib",
                 "memory/reserved_mib", "memory/reserved_unused_mib", "memory/alloc_retries", "memory/oom_count"}
    assert cuda_keys <= set(row)
    assert row["memory/forward_delta_mib"] > 0
    assert row["memory/peak_mib"] >= row["memory/alloc_after_forward_mib"]
    assert row["memory/reserved_mib"] >= row["memory/alloc_after_step_mib"]
    snapshot = Path(trainer.log_dir) / "memory_snapshot_1_3.pickle"
    assert snapshot.stat().st_size > 0
    import pickle

    with open(snapshot, "rb") as f:
        assert "segments" in pickle.load(f)


@pytest.mark.gpu
def test_oom_snapshot_is_written_on_gpu(tmp_path) -> None:
    class Hog(TinyModule):
        def training_step(self, batch, batch_idx):
            free, _ = torch.cuda.mem_get_info()
            torch.empty(int(free * 2), dtype=torch.uint8, device=self.device)  # cannot fit
            return super().training_step(batch, batch_idx)

    monitor = MemoryMonitor(snapshot_on_oom=True)
    trainer = pl.Trainer(max_steps=2, accelerator="gpu", devices=1, logger=TensorBoardLogger(tmp_path),
                         callbacks=[monitor], enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(torch.cuda.OutOfMemoryError), pytest.warns(UserWarning, match="allocator history"):
        trainer.fit(Hog(), _loader())
    assert (Path(trainer.log_dir) / "oom_snapshot.pickle").stat().st_size > 0
