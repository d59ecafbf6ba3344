"""Consistency checks between a recipe LightningModule and the DataModule it is trained on."""

from __future__ import annotations

from typing import Any


def check_matches_datamodule(module: Any, names: tuple[str, ...]) -> None:
    """Raise when the model and the trainer's datamodule disagree on ``names`` (e.g. ``num_classes``).

    A DataModule declares what its data looks like (``num_classes``, ``in_channels``, ``spatial_dims``);
    a model built for something else would fail later with a shape error deep inside a layer, or, worse,
    train silently with unused outputs.
    """
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return
    for name in names:
        want = getattr(datamodule, name, None)
        have = getattr(module.hparams, name, getattr(module, name, None))
        if want is not None and have is not None and want != have:
            raise ValueError(
                f"{type(module).__name__}({name}={have!r}) does not match {type(datamodule).__name__}, whose data "
                f"has {name}={want!r}; set --model.init_args.{name}={want!r} (or change the data options)"
            )
