"""Every shipped config in recipes/configs runs one training, validation and test batch on CPU.

The configs run in-process through ``MemcompCLI`` with ``fast_dev_run``; CIFAR and the Decathlon are
swapped for small files written in their real formats, and sizes are shrunk on the command line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_memcomp.cli import MemcompCLI
from recipes.fabricate import write_cifar, write_decathlon

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))
DATASETS = ("digits", "cifar10", "cifar100", "synthetic_seg", "spleen")
TECHNIQUES = ("baseline", "bandlimit", "csg", "blpa4", "quant2", "wavelet", "dct", "threshold", "combined")
COMPRESSING = ("blpa4", "quant2", "wavelet", "dct", "threshold", "combined", "quant4")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    write_cifar(root, "cifar10", per_batch=4, test=2)
    write_cifar(root, "cifar100", per_batch=4, test=2)
    write_decathlon(root, "Task09_Spleen", num_training=5, num_test=0, shape=(20, 20, 16))
    return root


def _overrides(dataset: str, root: Path) -> list[str]:
    if dataset == "digits":
        return ["--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=2", "--data.init_args.size=16"]
    if dataset.startswith("cifar"):
        return [f"--data.init_args.data_dir={root}", "--data.init_args.batch_size=2",
                "--data.init_args.eval_batch_size=2", "--data.init_args.num_workers=0"]
    if dataset == "synthetic_seg":
        return ["--data.init_args.image_size=32", "--data.init_args.num_train=2", "--data.init_args.num_val=1",
                "--data.init_args.num_test=1", "--data.init_args.rad_min=2", "--data.init_args.rad_max=6",
                "--data.init_args.batch_size=2", "--model.init_args.roi_size=[32, 32]"]
    # 32^3: the 3-D UNet halves four times, and instance norm needs more than one voxel at the bottom
    return [f"--data.init_args.root_dir={root}", "--data.init_args.roi_size=[32, 32, 32]",
            "--data.init_args.num_samples=1", "--data.init_args.batch_size=1", "--data.init_args.num_workers=0",
            "--data.init_args.cache_rate=0", "--model.init_args.roi_size=[32, 32, 32]"]


def _split_name(path: Path) -> tuple[str, str]:
    stem = path.stem
    dataset = next(d for d in sorted(DATASETS, key=len, reverse=True) if stem.startswith(d + "_"))
    return dataset, stem[len(dataset) + 1 :]


def test_every_dataset_has_a_baseline_each_technique_and_a_combined_config() -> None:
    names = {p.stem for p in CONFIGS}
    expected = {f"{d}_{t}" for d in DATASETS for t in TECHNIQUES} | {"digits_quant4"}
    assert expected <= names, f"missing configs: {sorted(expected - names)}"


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_fast_dev_run_on_cpu(
    config: Path, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["memcomp"])
    dataset, technique = _split_name(config)
    spec = yaml.safe_load(config.read_text())
    callbacks = [cb["class_path"] for cb in spec["trainer"]["callbacks"]]
    assert "MemoryMonitor" in callbacks, "every config logs memory"
    assert spec["trainer"]["logger"]["class_path"] == "TensorBoardLogger"

    extra = []
    if config.stem == "cifar10_bandlimit":
        # band-limited ResNet-18 takes minutes per CPU step even at batch 2; the config's callback, data and
        # module still run, on the small CIFAR ResNet
        extra = ["--model.init_args.network=resnet20_cifar"]
    cli = MemcompCLI(args=[
        "fit", "--config", str(config), "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
        "--summary=false", *_overrides(dataset, data_root), *extra,
    ])
    trainer = cli.trainer
    assert trainer.state.finished
    assert [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ in callbacks] == callbacks
    metric = "test/acc" if spec["model"]["class_path"] == "ImageClassifier" else "test/dice"
    assert cli.test_results and metric in cli.test_results[0]
    monitor = next(cb for cb in trainer.callbacks if type(cb).__name__ == "MemoryMonitor")
    held = [row for row in monitor.history if "memory/held_raw_mib" in row]
    assert held, "MemoryMonitor logged no held-for-backward bytes"
    raw, stored = held[0]["memory/held_raw_mib"], held[0]["memory/held_stored_mib"]
    if technique in COMPRESSING:
        assert stored < raw, f"{config.stem}: stored {stored:.3f} MiB is not below raw {raw:.3f} MiB"
    elif technique == "baseline":
        assert stored == raw
    layer_types = {type(m).__name__ for m in cli.model.modules()}
    if technique == "bandlimit":
        assert any(name.startswith("BandLimited") for name in layer_types), sorted(layer_types)
    if technique in ("csg", "combined"):
        assert any(name.startswith("SliceConv") for name in layer_types), sorted(layer_types)
    assert "held for backward" in cli.summary_text
