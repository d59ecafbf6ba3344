"""``memcomp compare`` on real run directories written by tiny Lightning fits (TensorBoard events, CSV, config)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_memcomp import ActivationCompression, MemoryMonitor
from lightning_memcomp.compare import (
    RunSummary,
    compare,
    find_runs,
    format_table,
    main,
    summarize_run,
)
from lightning_memcomp.techniques import technique_of

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class TinyClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                 nn.Linear(128, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def _accuracy(self, batch, name: str) -> None:
        x, y = batch
        self.log(name, (self.net(x).argmax(1) == y).float().mean())

    def validation_step(self, batch, batch_idx):
        self._accuracy(batch, "val/acc")

    def test_step(self, batch, batch_idx):
        self._accuracy(batch, "test/acc")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n: int = 32) -> torch.utils.data.DataLoader:
    ds = torch.utils.data.TensorDataset(torch.randn(n, 1, 12, 12), torch.randint(0, 4, (n,)))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _run(root: Path, name: str, callbacks: list, test: bool = False) -> Path:
    trainer = pl.Trainer(
        max_epochs=1, logger=TensorBoardLogger(root, name=name, default_hp_metric=False), callbacks=callbacks,
        limit_val_batches=2, num_sanity_val_steps=0, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
    )
    model = TinyClassifier()
    trainer.fit(model, _loader(), _loader(16))
    if test:
        trainer.test(model, _loader(16), verbose=False)
    return Path(trainer.log_dir)


QUANT_CONFIG = """\
# lightning.pytorch==2.6.6 (as LightningCLI saves it, shortened)
seed_everything: 0
trainer:
  strategy: auto
  precision: null
  callbacks:
  - class_path: lightning_memcomp.ActivationCompression
    init_args:
      codec: quant
      bits: 4
      modules: null
  - class_path: lightning_memcomp.MemoryMonitor
    init_args:
      every_n_steps: 1
model:
  class_path: TinyClassifier
"""

BASELINE_CONFIG = """\
trainer:
  callbacks:
  - class_path: lightning_memcomp.MemoryMonitor
    init_args:
      every_n_steps: 1
technique: null
"""


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    """memcomp_logs-like tree: tiny_baseline/version_0, tiny_quant/version_0 (fit + test), tiny_plain/version_0
    (no MemoryMonitor, no config.yaml)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("compare") / "logs"
    base = _run(root, "tiny_baseline", [MemoryMonitor(every_n_steps=1)])
    (base / "config.yaml").write_text(BASELINE_CONFIG)
    quant = _run(root, "tiny_quant", [ActivationCompression(codec="quant", bits=4), MemoryMonitor(every_n_steps=1)],
                 test=True)
    (quant / "config.yaml").write_text(QUANT_CONFIG)
    _run(root, "tiny_plain", [])
    return root


def _csv(run: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(run / "memory_log.csv") as f:
        for row in csv.DictReader(f):
            step = int(float(row.pop("step")))
            for key, text in row.items():
                if text:
                    series.setdefault(key, []).append((step, float(text)))
    return series


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_rows_are_the_figures_the_run_logged(logs) -> None:
    run = logs / "tiny_quant" / "version_0"
    row = summarize_run(run)
    logged = _csv(run)
    assert row.run == "tiny_quant/version_0" and row.technique == "quant:4" and row.device == "cpu"
    # the event files hold float32: the CSV's float64 figures agree to float32 precision
    assert row.peak_mib == pytest.approx(max(v for _, v in logged["memory/peak_mib"]), rel=1e-6)
    assert row.peak_reading == "VmHWM"
    step, raw = max(logged["memory/held_raw_mib"], key=lambda sv: sv[1])
    assert row.held_raw_mib == pytest.approx(raw, rel=1e-6)
    assert row.held_stored_mib == pytest.approx(dict(logged["memory/held_stored_mib"])[step], rel=1e-6)
    assert row.held_ratio == pytest.approx(raw / row.held_stored_mib, rel=1e-6) and row.held_ratio > 1.5
    times = [v for _, v in sorted(logged["time/step_s"])]
    assert len(times) == 4 and row.step_s == pytest.approx(statistics.median(times[1:]), rel=1e-6)
    # test/ is preferred over val/; the value is the event file's (float32), the last logged
    acc = _events(run)
    assert {"val/acc", "test/acc"} <= set(acc.Tags()["scalars"])
    assert row.metric == "test/acc" and row.metric_value == acc.Scalars("test/acc")[-1].value
    params = sum(p.numel() for p in TinyClassifier().parameters())
    assert row.trainable_params == params == logged["model/trainable_params"][0][1]


def test_a_run_without_monitor_or_config_shows_dashes(logs) -> None:
    row = summarize_run(logs / "tiny_plain" / "version_0")
    assert row.technique == "tiny_plain"  # no config.yaml: the run's name
    assert (row.peak_mib, row.held_raw_mib, row.held_stored_mib, row.held_ratio, row.step_s, row.trainable_params) == (
        None, None, None, None, None, None)
    assert row.metric == "val/acc" and row.metric_value is not None
    cells = format_table([row]).splitlines()[2].split()
    assert cells[:7] == ["tiny_plain/version_0", "tiny_plain", "-", "-", "-", "-", "-"]
    assert cells[7] == f"{100 * row.metric_value:.2f}%" and cells[8] == "-"


def test_parent_directories_expand_to_their_runs(logs) -> None:
    runs = find_runs([logs])
    assert [r.relative_to(logs).as_posix() for r in runs] == [
        "tiny_baseline/version_0", "tiny_plain/version_0", "tiny_quant/version_0"]
    # an experiment folder, and the same run twice: once each, in the order given
    again = find_runs([logs / "tiny_quant", logs / "tiny_baseline" / "version_0", logs / "tiny_quant" / "version_0"])
    assert [r.relative_to(logs).as_posix() for r in again] == ["tiny_quant/version_0", "tiny_baseline/version_0"]


def test_versions_sort_naturally(tmp_path) -> None:
    for v in (10, 2, 1):
        (tmp_path / "exp" / f"version_{v}").mkdir(parents=True)
        (tmp_path / "exp" / f"version_{v}" / "events.out.tfevents.0.host.1.0").write_bytes(b"")
    assert [r.name for r in find_runs([tmp_path])] == ["version_1", "version_2", "version_10"]


def test_main_prints_the_table_and_writes_csv_and_png(logs, tmp_path, capsys) -> None:
    out = tmp_path / "results" / "cmp"
    assert main([str(logs / "tiny_quant" / "version_0"), str(logs / "tiny_baseline"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split("  ")[0] == "run"
    assert "step peak MiB (VmHWM)" in lines[0] and "held stored MiB" in lines[0] and "trainable params" in lines[0]
    assert lines[2].startswith("tiny_quant/version_0") and "quant:4" in lines[2]
    assert lines[3].startswith("tiny_baseline/version_0") and "baseline" in lines[3]
    # accuracy shown in %, under the key's name when every run shows the same key; else with the key
    rows, _, _ = compare([logs / "tiny_quant" / "version_0", logs / "tiny_baseline"], out=None)
    assert f"{100 * rows[0].metric_value:.2f}% (test/acc)" in lines[2]
    assert f"{100 * rows[1].metric_value:.2f}% (val/acc)" in lines[3]
    # ratios to the baseline run, though it was given second
    assert "relative to tiny_baseline/version_0 (baseline):" in text
    ratio_line = next(line for line in lines if line.startswith("tiny_quant/version_0") and line.endswith("x"))
    held = rows[0].held_stored_mib / rows[1].held_stored_mib
    assert ratio_line.split()[3] == f"{held:.2f}x"
    assert f"wrote {out}.csv" in text and f"wrote {out}.png" in text
    assert (tmp_path / "results" / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results" / "cmp.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["tiny_quant/version_0", "tiny_baseline/version_0"]
    for written, row in zip(table, rows):
        assert written["technique"] == row.technique
        assert float(written["step_peak_mib"]) == row.peak_mib
        assert float(written["held_stored_mib"]) == row.held_stored_mib
        assert float(written["step_s"]) == row.step_s
        assert float(written["metric_value"]) == row.metric_value
        assert int(written["trainable_params"]) == row.trainable_params
        assert written["reference"] == "tiny_baseline/version_0"
    assert float(table[0]["held_stored_vs_reference"]) == pytest.approx(held)


def test_default_out_is_the_current_directory(logs, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([str(logs), "--metric", "val/acc"]) == 0
    text = capsys.readouterr().out
    assert "wrote memcomp_compare.csv" in text and "wrote memcomp_compare.png" in text
    assert (tmp_path / "memcomp_compare.png").is_file()
    with open(tmp_path / "memcomp_compare.csv") as f:
        assert {r["metric"] for r in csv.DictReader(f)} == {"val/acc"}
    assert text.splitlines()[0].split()[-3] == "val/acc"  # one key for every run: the header names it


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{missing}"], "memcomp compare: error: RUN_DIR '{missing}' does not exist; expected a run's TensorBoard"),
        (["{empty}"], "memcomp compare: error: RUN_DIR '{empty}' holds no run: no events.out.tfevents.* file"),
        (["{logs}", "--metric", "val/dice"], "memcomp compare: error: --metric 'val/dice' is not logged by any"),
    ],
)
def test_errors_are_one_line_and_exit_2(logs, tmp_path, capsys, args, expected) -> None:
    (tmp_path / "empty").mkdir()
    names = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"), "logs": str(logs)}
    argv = [a.format(**names) for a in args]
    assert main(argv + ["--out", str(tmp_path / "cmp")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(expected.format(**names))
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert not (tmp_path / "cmp.csv").exists()


def test_no_run_dir_is_a_usage_error(capsys) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memcomp compare: error: ") and "RUN_DIR" in err and len(err.splitlines()) <= 2
    assert "memcomp compare --help" in err


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, "baseline"),
        ({"trainer": {"callbacks": [{"class_path": "MemoryMonitor"}]}}, "baseline"),
        ({"technique": "csg+quant:4", "trainer": {"callbacks": []}}, "csg+quant:4"),
        ({"technique": None, "trainer": {"callbacks": [{"class_path": "ActivationCompression",
                                                        "init_args": {"codec": "quant", "bits": 2}}]}}, "quant:2"),
        ({"trainer": {"callbacks": [{"class_path": "lightning_memcomp.ActivationCompression",
                                     "init_args": {"codec": "blpa", "bits": None}}]}}, "blpa:4"),
        ({"trainer": {"callbacks": [{"class_path": "ActivationCompression", "init_args": {"codec": "dct"},
                                     "dict_kwargs": {"compression_ratio": 10}}]}}, "dct:10"),
        ({"trainer": {"callbacks": [{"class_path": "ActivationCompression", "init_args": {"codec": "wavelet"}}]}},
         "wavelet:10"),
        ({"trainer": {"callbacks": [{"class_path": "ActivationCompression", "init_args": {"codec": "identity"}}]}},
         "identity"),
        ({"trainer": {"callbacks": [{"class_path": "lightning_memcomp.bandlimit.callback.BandLimiting",
                                     "init_args": {"compress_rate": 85, "fft_size": "minimal"}}]}}, "bandlimit:85"),
        ({"trainer": {"callbacks": [{"class_path": "BandLimiting", "init_args": {"compress_rate": None}}]}},
         "bandlimit:50"),
        ({"trainer": {"callbacks": [{"class_path": "BandLimiting", "init_args": {"preserve_energy": 95}}]}},
         "bandlimit(energy 95%)"),
        ({"trainer": {"callbacks": [{"class_path": "ConvSliceGeneration", "init_args": {"binary": True}}]}}, "bcsg"),
        ({"trainer": {"callbacks": [{"class_path": "ConvSliceGeneration", "init_args": {"code_size": 32}},
                                    {"class_path": "ActivationCompression", "init_args": {"codec": "quant", "bits": 4}},
                                    {"class_path": "MemoryMonitor"}]}}, "csg+quant:4"),
        ({"trainer": {"strategy": "memcomp"}}, "quant:4 (strategy)"),
        ({"trainer": {"strategy": {"class_path": "lightning_memcomp.strategies.DDPMemCompStrategy",
                                   "init_args": {"codec": "threshold", "codec_options": {"compression_ratio": 4}}}}},
         "threshold:4 (strategy)"),
        ({"trainer": {"strategy": "ddp", "precision": "bf16-mixed"}}, "bf16"),
        ({"trainer": {"precision": "32-true", "callbacks": None}}, "baseline"),
    ],
)
def test_technique_of_a_saved_config(config, expected) -> None:
    assert technique_of(config) == expected


def test_a_broken_config_falls_back_to_the_run_name(tmp_path) -> None:
    run = tmp_path / "exp" / "version_3"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("trainer: [unclosed\n")
    row = summarize_run(run, scalars={})
    assert row.technique == "exp" and row.run == "exp/version_3" and row.metric is None


def test_table_with_mixed_readings_and_metrics() -> None:
    rows = [
        RunSummary("a/version_0", Path("a"), "baseline", device="cuda", peak_mib=120.0, held_raw_mib=50.0,
                   held_stored_mib=50.0, held_ratio=1.0, step_s=0.1, metric="test/dice", metric_value=0.8123,
                   trainable_params=1234),
        RunSummary("b/version_0", Path("b"), "quant:4", device="cpu", peak_mib=900.0, held_raw_mib=50.0,
                   held_stored_mib=6.25, held_ratio=8.0, step_s=0.2, metric="val/acc", metric_value=0.5),
    ]
    text = format_table(rows)
    header, _, first, second = text.splitlines()[:4]
    assert "step peak MiB" in header and "accuracy / Dice" in header
    assert "120.0 (max allocated)" in first and "0.8123 (test/dice)" in first and "1,234" in first
    assert "900.0 (VmHWM)" in second and "50.00% (val/acc)" in second and second.endswith("-")
    ratios = [line.split() for line in text.splitlines() if line.startswith("b/version_0") and line.endswith("x")]
    assert ratios == [["b/version_0", "quant:4", "7.50x", "0.12x", "2.00x"]]
