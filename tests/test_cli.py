"""The ``memcomp`` command: subcommands, short names, bench dispatch, refused combinations, summary, checkpoints."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from lightning_memcomp.cli import MemcompCLI, main

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
# one tiny digits run: 2 training batches of 8 images at 16x16, one validation and one test batch
TINY = ["--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=8", "--data.init_args.size=16", "--trainer.enable_progress_bar=false"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["memcomp"])


def _logs(tmp_path: Path) -> str:
    return f"--trainer.logger.init_args.save_dir={tmp_path}"


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict", "bench"):
        assert subcommand in out


def test_bench_dispatches_to_the_bench_module(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("lightning_memcomp.bench")
    fake.main = lambda argv: seen.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lightning_memcomp.bench", fake)
    assert main(["bench", "--steps", "3"]) == 0
    assert seen == [["--steps", "3"]]


def test_bench_without_the_bench_module_fails_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "lightning_memcomp.bench", None)
    assert main(["bench"]) == 2
    assert "lightning_memcomp.bench" in capsys.readouterr().err


def test_callbacks_and_options_resolve_by_short_name_on_the_command_line(tmp_path: Path) -> None:
    cli = MemcompCLI(args=[
        "--config", str(CONFIGS / "digits_baseline.yaml"), _logs(tmp_path),
        "--trainer.callbacks+=ActivationCompression", "--trainer.callbacks.codec=quant",
        "--trainer.callbacks.bits=2",
    ], run=False)
    compressor = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ActivationCompression")
    assert compressor.options == {"bits": 2}
    assert type(cli.model).__name__ == "ImageClassifier"
    assert type(cli.datamodule).__name__ == "DigitsDataModule"


def test_memcomp_strategy_resolves_by_name(tmp_path: Path) -> None:
    cli = MemcompCLI(args=["--config", str(CONFIGS / "digits_baseline.yaml"), _logs(tmp_path),
                           "--trainer.strategy=memcomp", "--trainer.accelerator=cpu"], run=False)
    assert hasattr(cli.trainer.strategy, "memcomp_ledger")


def test_unknown_network_error_lists_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resnet56_cifar.*densenet_bc"):
        MemcompCLI(args=["--config", str(CONFIGS / "digits_baseline.yaml"), _logs(tmp_path),
                         "--model.init_args.network=resnet9000"], run=False)


def test_model_and_data_that_disagree_on_classes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_classes=100.*--model.init_args.num_classes=10"):
        MemcompCLI(args=["fit", "--config", str(CONFIGS / "digits_baseline.yaml"), _logs(tmp_path), *TINY,
                         "--model.init_args.num_classes=100"])


def test_activation_compression_with_the_memcomp_strategy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either the callback or the memcomp strategy"):
        MemcompCLI(args=["fit", "--config", str(CONFIGS / "digits_quant4.yaml"), _logs(tmp_path), *TINY,
                         "--trainer.strategy=memcomp"])


def test_two_activation_compressions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 ActivationCompression callbacks"):
        MemcompCLI(args=["fit", "--config", str(CONFIGS / "digits_quant4.yaml"), _logs(tmp_path), *TINY,
                         "--trainer.callbacks+=ActivationCompression", "--trainer.callbacks.codec=blpa"])


def test_band_limiting_and_slice_generation_on_the_same_layers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BandLimiting and ConvSliceGeneration"):
        MemcompCLI(args=["fit", "--config", str(CONFIGS / "digits_csg.yaml"), _logs(tmp_path), *TINY,
                         "--trainer.callbacks+=BandLimiting", "--trainer.callbacks.compress_rate=50"])


def test_missing_cifar_without_download_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*cifar-10-batches-py.*download=true"):
        MemcompCLI(args=["fit", "--config", str(CONFIGS / "cifar10_baseline.yaml"), _logs(tmp_path),
                         f"--data.init_args.data_dir={tmp_path}", "--trainer.fast_dev_run=1"])


def test_fit_tests_and_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = MemcompCLI(args=["fit", "--config", str(CONFIGS / "digits_quant4.yaml"), _logs(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert "test/acc" in cli.test_results[0]
    assert "=== memcomp summary ===" in out and "test/acc" in out
    held = next(line for line in out.splitlines() if line.startswith("held for backward"))
    raw, stored = (float(held.split(word)[1].split("MiB")[0]) for word in ("raw", "stored"))
    assert stored < raw
    assert str(tmp_path) in out and "tensorboard --logdir" in out


def test_test_after_fit_can_be_switched_off(tmp_path: Path) -> None:
    cli = MemcompCLI(args=["fit", "--config", str(CONFIGS / "digits_baseline.yaml"), _logs(tmp_path), *TINY,
                           "--test_after_fit=false", "--summary=false"])
    assert cli.test_results is None
    assert not any(k.startswith("test/") for k in cli.trainer.callback_metrics)


def test_converted_checkpoint_loads_and_resumes(tmp_path: Path) -> None:
    from recipes.classification import ImageClassifier

    cli = MemcompCLI(args=["fit", "--config", str(CONFIGS / "digits_combined.yaml"), _logs(tmp_path), *TINY,
                           "--summary=false", "--test_after_fit=false"])
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert ckpt and Path(ckpt).is_file()
    loaded = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert any(type(m).__name__.startswith("SliceConv") for m in loaded.modules())
    model = cli.model.eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))

    resumed = MemcompCLI(args=["fit", "--config", str(CONFIGS / "digits_combined.yaml"), _logs(tmp_path), *TINY,
                               "--trainer.max_epochs=2", f"--ckpt_path={ckpt}", "--summary=false",
                               "--test_after_fit=false"])
    assert resumed.trainer.global_step == 4  # two steps restored + two more
