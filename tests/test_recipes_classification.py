"""Classification recipe: networks by name, the digits and CIFAR DataModules, ImageClassifier options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from recipes.classification import (
    CIFARDataModule,
    DigitsDataModule,
    ImageClassifier,
    available_networks,
    build_network,
    densenet_bc,
)
from recipes.fabricate import write_cifar


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_resnet18_cifar_has_a_3x3_stem_and_no_max_pool() -> None:
    model = build_network("resnet18_cifar", 10, 3)
    assert _convs(model)[0].kernel_size == (3, 3) and _convs(model)[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet56_cifar_is_three_stages_of_nine_blocks_with_parameter_free_shortcuts() -> None:
    model = build_network("resnet56_cifar", 10, 3)
    convs = _convs(model)
    assert len(convs) == 1 + 3 * 9 * 2  # stem + two 3x3 convs per block, no 1x1 shortcut convs
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]


def test_densenet_bc_follows_depth_growth_and_compression() -> None:
    depth, growth = 40, 12
    model = densenet_bc(num_classes=10, in_channels=3, depth=depth, growth_rate=growth)
    n = (depth - 4) // 6
    assert len(model.block1) == len(model.block2) == len(model.block3) == n
    after_block1 = 2 * growth + n * growth
    assert model.trans1.conv.out_channels == after_block1 // 2
    assert model.block1.layer1.conv1.out_channels == 4 * growth  # bottleneck width
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_densenet_bc_refuses_a_depth_that_is_not_6n_plus_4() -> None:
    with pytest.raises(ValueError, match="depth=41"):
        densenet_bc(depth=41)


def test_torchvision_model_by_name_takes_one_channel_inputs() -> None:
    model = build_network("resnet18", 7, in_channels=1)
    assert _convs(model)[0].in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_unknown_network_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet18_cifar.*densenet_bc.*mobilenet_v2"):
        build_network("resnet9000", 10)
    assert {"resnet20_cifar", "densenet_bc", "resnet50"} <= set(available_networks())


def test_options_a_network_does_not_take_are_refused() -> None:
    with pytest.raises(TypeError, match="growth_rate"):
        build_network("resnet56_cifar", 10, growth_rate=12)


def test_digits_split_is_deterministic_and_disjoint() -> None:
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=0)
    a.setup(), b.setup()
    sizes = {k: len(v) for k, v in a._splits.items()}
    assert sizes == {"train": 1257, "val": 179, "test": 361}
    torch.testing.assert_close(a._splits["test"].tensors[0], b._splits["test"].tensors[0])
    # the 1,797 digits are distinct images, so no test image may appear among the training images
    train = {x.numpy().tobytes() for x in a._splits["train"].tensors[0]}
    assert not any(x.numpy().tobytes() in train for x in a._splits["test"].tensors[0])


def test_digits_with_three_channels() -> None:
    dm = DigitsDataModule(channels=3, batch_size=4)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and dm.in_channels == 3


@pytest.mark.parametrize("dataset,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loads_files_in_the_real_format(tmp_path: Path, dataset: str, classes: int) -> None:
    write_cifar(tmp_path, dataset, per_batch=6, test=4)
    dm = CIFARDataModule(str(tmp_path), dataset, batch_size=5, val_fraction=0.2, num_workers=0)
    dm.setup()
    assert (len(dm._train), len(dm._val), len(dm._test)) == (24, 6, 4)
    assert dm.num_classes == classes
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert 0 <= int(y.min()) and int(y.max()) < classes
    assert x.mean().abs() < 1.0  # normalized, not raw 0..255 bytes


def test_cifar_training_split_is_augmented_and_validation_is_not(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10", per_batch=4, test=2)
    dm = CIFARDataModule(str(tmp_path), "cifar10", val_fraction=0.25, num_workers=0)
    dm.setup()
    torch.manual_seed(0)
    train_views = [dm._train[0][0] for _ in range(4)]
    assert any(not torch.equal(train_views[0], v) for v in train_views[1:])
    torch.testing.assert_close(dm._val[0][0], dm._val[0][0])


def test_cifar_missing_without_download_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    dm = CIFARDataModule(str(tmp_path / "nowhere"), "cifar100")
    with pytest.raises(FileNotFoundError, match=r"nowhere/cifar-100-python.*download=true"):
        dm.prepare_data()


def test_top5_accuracy_only_where_there_are_more_than_five_classes() -> None:
    assert ImageClassifier("resnet20_cifar", num_classes=10).top5
    assert not ImageClassifier("resnet20_cifar", num_classes=4).top5


@pytest.mark.parametrize("option,value", [("optimizer", "lbfgs"), ("scheduler", "plateau"), ("lr", -1.0)])
def test_bad_optimizer_options_are_refused_at_construction(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        ImageClassifier(**{option: value})


@pytest.mark.parametrize("optimizer,scheduler", [("sgd", "multistep"), ("adam", "onecycle"), ("adamw", "step")])
def test_optimizer_and_schedule_combinations_step(optimizer: str, scheduler: str) -> None:
    from lightning.pytorch import Trainer

    model = ImageClassifier("resnet20_cifar", 10, 1, optimizer=optimizer, scheduler=scheduler, lr=0.01)
    dm = DigitsDataModule(batch_size=16, size=16)
    trainer = Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, dm)
    assert trainer.global_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert type(trainer.optimizers[0]).__name__.lower() == optimizer
