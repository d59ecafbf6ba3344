"""The ``memcomp`` command for a new user: configs by name, ``--technique``, ``memcomp configs`` and short errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lightning_memcomp.cli import MemcompCLI, main
from lightning_memcomp.configs import list_configs, resolve_config, resolve_config_args, shipped_configs

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
TINY = ["--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=8", "--data.init_args.size=16", "--trainer.enable_progress_bar=false"]
MAX_ERROR_LINES = 5


@pytest.fixture(autouse=True)
def _argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["memcomp"])
    monkeypatch.delenv("MEMCOMP_DEBUG", raising=False)


def _logs(tmp_path: Path) -> str:
    return f"--trainer.logger.init_args.save_dir={tmp_path}"


# -- configs by name -----------------------------------------------------------------------------
def test_shipped_configs_are_the_repository_configs() -> None:
    assert set(shipped_configs()) == {p.stem for p in CONFIGS.glob("*.yaml")}


def test_a_config_resolves_by_name_with_or_without_suffix_and_by_repository_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository root
    target = shipped_configs()["digits_quant4"]
    for given in ("digits_quant4", "digits_quant4.yaml", "recipes/configs/digits_quant4.yaml"):
        assert Path(resolve_config(given)) == target
    own = tmp_path / "digits_quant4.yaml"  # a file of the user's own always wins
    own.write_text("seed_everything: 1\n")
    assert resolve_config("digits_quant4.yaml") == "digits_quant4.yaml"
    assert resolve_config_args(["fit", "--config=digits_dct", "-c", "digits_csg", "--x=1"]) == [
        "fit", f"--config={shipped_configs()['digits_dct']}", "-c", str(shipped_configs()["digits_csg"]), "--x=1"]


def test_an_unknown_config_name_suggests_close_ones() -> None:
    with pytest.raises(ValueError, match=r"--config='digits_quant5' is neither a file nor a shipped config; "
                                         r"did you mean digits_quant4"):
        resolve_config("digits_quant5")


def test_memcomp_configs_lists_dataset_network_and_technique(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "--dataset", "digits"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.startswith("digits_")}
    assert set(rows) == {p.stem for p in CONFIGS.glob("digits_*.yaml")}
    assert rows["digits_quant4"][1:4] == ["digits", "resnet20_cifar", "quant:4"]
    assert rows["digits_combined"][3] == "csg+quant:4"
    info = {c.name: c for c in list_configs()}
    assert info["spleen_baseline"].network == "unet 3-D" and info["spleen_baseline"].technique == "baseline"
    assert info["digits_quant4"].description.startswith("activations stored for backward in 4 bits")
    assert main(["configs", "--paths"]) == 0
    assert str(shipped_configs()["digits_dct"]) in capsys.readouterr().out.splitlines()


def test_configs_keep_hp_metric_out_of_tensorboard() -> None:
    for path in CONFIGS.glob("*.yaml"):
        logger = yaml.safe_load(path.read_text())["trainer"]["logger"]
        assert logger["init_args"]["default_hp_metric"] is False, path.name


# -- --technique ---------------------------------------------------------------------------------
def test_technique_replaces_the_configs_callbacks_and_names_the_run(tmp_path: Path) -> None:
    cli = MemcompCLI(args=["fit", "--config", str(CONFIGS / "digits_quant4.yaml"), _logs(tmp_path), *TINY,
                           "--technique", "csg+blpa:2", "--summary=false", "--test_after_fit=false"])
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert names.count("ActivationCompression") == 1 and "ConvSliceGeneration" in names and "MemoryMonitor" in names
    compressor = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ActivationCompression")
    assert compressor.codec == "blpa" and compressor.options == {"bits": 2}
    assert any(type(m).__name__.startswith("SliceConv") for m in cli.model.modules())
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.parent.name == "digits_csg_blpa2"
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["technique"] == "csg+blpa:2"
    assert [cb["class_path"].rsplit(".", 1)[-1] for cb in saved["trainer"]["callbacks"]] == [
        "ConvSliceGeneration", "ActivationCompression", "MemoryMonitor"]


def test_checkpoint_and_bf16_techniques_build_their_trainer(tmp_path: Path) -> None:
    cli = MemcompCLI(args=["--config", str(CONFIGS / "digits_dct.yaml"), _logs(tmp_path),
                           "--technique=checkpoint+bf16", "--trainer.accelerator=cpu"], run=False)
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert "ActivationCheckpointing" in names and "ActivationCompression" not in names
    assert cli.trainer.precision == "bf16-mixed"


def test_technique_with_the_compressing_strategy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--technique='quant:2' compresses activations and "
                                         r"--trainer.strategy=memcomp does too"):
        MemcompCLI(args=["--config", str(CONFIGS / "digits_baseline.yaml"), _logs(tmp_path),
                         "--trainer.strategy=memcomp", "--technique=quant:2"], run=False)


# -- short errors --------------------------------------------------------------------------------
ERROR_CASES = {
    # an option aimed at a callback that does not take it
    "option to the wrong callback": (
        ["fit", "--config", "digits_quant4", "--trainer.callbacks.bits=2"],
        ["--trainer.callbacks.bits=2 went to MemoryMonitor", "option of ActivationCompression", "--technique"]),
    # bad option values
    "bad technique": (["fit", "--config", "digits_baseline", "--technique", "quant:3"],
                      ["--technique='quant:3': bits=3 is not allowed; use one of 1, 2, 4, 8"]),
    "bad callback value": (["fit", "--config", "digits_baseline", "--trainer.callbacks+=ActivationCompression",
                            "--trainer.callbacks.codec=quant", "--trainer.callbacks.bits=3"],
                           ["bits=3 is not allowed; use one of 1, 2, 4, 8"]),
    "bad trainer value": (["fit", "--config", "digits_baseline", "--trainer.max_epochs=abc"],
                          ['"trainer.max_epochs": abc is not allowed; expected int']),
    "unknown network": (["fit", "--config", "digits_baseline", "--model.init_args.network=resnet9000"],
                        ["network='resnet9000' is not a known network; allowed: resnet18_cifar"]),
    "unknown config": (["fit", "--config", "digits_quant5"], ["--config='digits_quant5' is neither a file"]),
    # every refusal of check_combination, and --technique's own
    "two compressions": (["fit", "--config", "digits_quant4", "--trainer.callbacks+=ActivationCompression"],
                         ["2 ActivationCompression callbacks were given"]),
    "callback and strategy": (["fit", "--config", "digits_quant4", "--trainer.strategy=memcomp"],
                              ["ActivationCompression callback together with strategy memcomp"]),
    "bandlimit and csg": (["fit", "--config", "digits_csg", "--trainer.callbacks+=BandLimiting"],
                          ["BandLimiting and ConvSliceGeneration both convert"]),
    "technique combination": (["fit", "--config", "digits_baseline", "--technique", "csg+bandlimit:50"],
                              ["BandLimiting and ConvSliceGeneration both convert"]),
    "two codecs": (["fit", "--config", "digits_baseline", "--technique", "quant:4+dct:10"],
                   ["names 2 activation codecs"]),
}


def _run_main(args: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(args)
    out, err = capfd.readouterr()
    return code, [line for line in (out + err).splitlines() if line.strip()]


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_print_a_short_message_and_exit_2(
    case: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    args, expected = ERROR_CASES[case]
    code, lines = _run_main([*args, _logs(tmp_path)], capfd)
    assert code == 2
    assert len(lines) <= MAX_ERROR_LINES, "\n".join(lines)
    text = "\n".join(lines)
    assert "memcomp: error: " in text and "Traceback" not in text
    for fragment in expected:
        assert fragment in text
    assert "--debug" in lines[-1]


def test_missing_data_is_reported_before_the_trainer_is_built(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code, lines = _run_main(["fit", "--config", "spleen_baseline", _logs(tmp_path),
                             f"--data.init_args.root_dir={tmp_path}"], capfd)
    assert code == 2 and len(lines) <= MAX_ERROR_LINES, "\n".join(lines)
    assert any(f"no Task09_Spleen data at {tmp_path}" in line and "download=true" in line for line in lines)
    assert not any("GPU available" in line for line in lines)  # refused before the Trainer's banner


def test_a_missing_dependency_is_one_message(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_memcomp.compression import transforms

    monkeypatch.setitem(sys.modules, "pywt", None)  # PyWavelets "not installed"
    transforms.orthogonal_wavelets.cache_clear()  # what an earlier test may have read from it
    transforms._dwt_matrix_np.cache_clear()
    code, lines = _run_main(["fit", "--config", "digits_baseline", "--technique", "wavelet:10", _logs(tmp_path)],
                            capfd)
    assert code == 2 and len(lines) <= MAX_ERROR_LINES, "\n".join(lines)
    assert any("pywt" in line for line in lines)


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="bits=3 is not allowed"):
        main(["fit", "--config", "digits_baseline", "--technique", "quant:3", "--debug", _logs(tmp_path)])
    monkeypatch.setenv("MEMCOMP_DEBUG", "1")
    with pytest.raises(ValueError, match="bits=3 is not allowed"):
        main(["fit", "--config", "digits_baseline", "--technique", "quant:3", _logs(tmp_path)])


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: list[str]) -> int:
        raise RuntimeError("not a user's mistake")

    monkeypatch.setattr("lightning_memcomp.configs.main", broken)
    with pytest.raises(RuntimeError, match="not a user's mistake"):
        main(["configs"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["bench", "--methods", "quant:3"], "memcomp bench: error: method 'quant:3': bits=3 is not allowed"),
        (["bench", "--no-such-option"], "memcomp bench: error: unrecognized arguments: --no-such-option"),
        (["configs", "--dataset", "mnist"], "memcomp configs: error: --dataset='mnist' matches no shipped config"),
        (["compare", "/no/such/run"], "memcomp compare: error: RUN_DIR '/no/such/run' does not exist"),
    ],
)
def test_the_other_subcommands_errors_are_short_too(
    args: list[str], expected: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:  # argparse's exit, status 2
        code = main(args)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) <= 2 and lines[0].startswith(expected), lines


def test_help_names_the_other_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for command in ("memcomp configs", "memcomp compare", "memcomp plan", "memcomp bench", "--technique"):
        assert command in out
