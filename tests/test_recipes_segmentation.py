"""Segmentation recipe: MONAI networks by name, synthetic and Decathlon data, the Segmenter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from recipes.fabricate import write_decathlon
from recipes.segmentation import (
    DecathlonDataModule,
    Segmenter,
    SyntheticSegmentationDataModule,
    build_segmentation_network,
)


@pytest.mark.parametrize(
    "name,dims,size",
    [("unet", 2, 32), ("unet", 3, 16), ("segresnet", 2, 32), ("dynunet", 2, 32), ("dynunet", 3, 16)],
)
def test_networks_keep_the_spatial_size_and_give_one_channel_per_class(name: str, dims: int, size: int) -> None:
    net = build_segmentation_network(name, dims, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    out = net(torch.randn(1, 1, *(size,) * dims))
    assert out.shape == (1, 3, *(size,) * dims)


def test_unknown_segmentation_network_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unet, segresnet, dynunet"):
        build_segmentation_network("vnet9000", 2, 1, 2)


def test_synthetic_data_is_deterministic_with_binary_labels() -> None:
    a = SyntheticSegmentationDataModule(image_size=32, num_train=3, num_val=1, num_test=1, rad_max=6, seed=1)
    b = SyntheticSegmentationDataModule(image_size=32, num_train=3, num_val=1, num_test=1, rad_max=6, seed=1)
    a.setup(), b.setup()
    item = a._splits["train"][0]
    assert item["image"].shape == (1, 32, 32) and item["label"].shape == (1, 32, 32)
    assert set(item["label"].unique().tolist()) == {0, 1}
    torch.testing.assert_close(a._splits["val"][0]["image"], b._splits["val"][0]["image"])


def test_synthetic_volumes_in_3d() -> None:
    dm = SyntheticSegmentationDataModule(spatial_dims=3, image_size=16, num_train=1, num_val=1, num_test=1,
                                         rad_min=2, rad_max=4, num_objs=2)
    dm.setup()
    assert dm._splits["train"][0]["image"].shape == (1, 16, 16, 16)


def test_validation_uses_sliding_window_over_images_the_network_cannot_take_whole() -> None:
    model = Segmenter(channels=(8, 16, 32, 64), strides=(2, 2, 2), roi_size=(32, 32)).eval()
    x = torch.randn(1, 1, 36, 36)  # 36 -> 18 -> 9 -> 5: the UNet's skip connections do not line up
    with pytest.raises(RuntimeError):
        model(x)
    with torch.no_grad():
        assert model._infer(x).shape == (1, 2, 36, 36)


def test_model_and_data_with_different_dimensions_are_refused() -> None:
    model = Segmenter(spatial_dims=3, channels=(8, 16), strides=(2,), roi_size=(16, 16, 16))
    dm = SyntheticSegmentationDataModule(image_size=32, num_train=2, num_val=1, num_test=1, rad_max=6)
    trainer = Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="spatial_dims=3.*spatial_dims=2"):
        trainer.fit(model, dm)


def test_roi_size_must_have_one_entry_per_dimension() -> None:
    with pytest.raises(ValueError, match="roi_size"):
        Segmenter(spatial_dims=3, roi_size=(64, 64))


def test_decathlon_folder_loads_with_the_monai_transform_chain(tmp_path: Path) -> None:
    write_decathlon(tmp_path, "Task09_Spleen", num_training=5, num_test=1, shape=(24, 24, 16))
    dm = DecathlonDataModule(str(tmp_path), roi_size=(16, 16, 16), num_samples=2, batch_size=2, num_workers=0,
                             pixdim=(3.0, 3.0, 2.0))
    dm.setup()
    assert (dm.num_classes, dm.in_channels) == (2, 1)
    assert (len(dm._train), len(dm._val)) == (4, 1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16, 16)  # 2 volumes x 2 crops
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[2:4] <= (12, 12)  # resampled from 1.5 mm to 3 mm in-plane (foreground-cropped)
    assert 0.0 <= float(val["image"].min()) and float(val["image"].max()) <= 1.0  # intensity window scaled
    assert set(val["label"].unique().tolist()) == {0.0, 1.0}


def test_decathlon_missing_without_download_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    dm = DecathlonDataModule(str(tmp_path), "Task09_Spleen")
    with pytest.raises(FileNotFoundError, match=r"Task09_Spleen.*download=true"):
        dm.prepare_data()


def test_segmenter_checkpoint_loads_with_the_same_outputs(tmp_path: Path) -> None:
    model = Segmenter(channels=(8, 16), strides=(2,), roi_size=(32, 32))
    dm = SyntheticSegmentationDataModule(image_size=32, num_train=2, num_val=1, num_test=1, rad_max=6,
                                         batch_size=2)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(model, dm)
    path = tmp_path / "seg.ckpt"
    trainer.save_checkpoint(path)
    loaded = Segmenter.load_from_checkpoint(path, map_location="cpu").eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert "val/dice" in trainer.callback_metrics
