"""``ddp_memcomp`` with two CPU processes (gloo) against plain DDP: same data, same seed, one step.

The fits run in a subprocess (Lightning's popen launcher starts the second rank), so pytest workers are
never forked into a process group. One launch fits plain DDP, ``ddp_memcomp`` with the identity codec and
``ddp_memcomp`` with 4-bit quantization one after the other in the same two processes, and each rank saves
the parameter gradients it holds after DDP's all-reduce.
"""

from __future__ import annotations

import importlib
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_ddp_script

from lightning_memcomp._lightning import reject_sharded

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_memcomp.strategies import DDPMemCompStrategy

    out = Path(sys.argv[1])


    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Conv2d(16, 16, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                                     nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                     nn.Flatten(), nn.Linear(64, 10))
            self.grads = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def on_after_backward(self):
            # DDP has all-reduced (averaged) the gradients by now
            self.grads = {n: p.grad.detach().clone() for n, p in self.named_parameters()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g))
    runs = {
        "ddp": "ddp",
        "identity": DDPMemCompStrategy(codec="identity", min_bytes=0),
        "quant4": DDPMemCompStrategy(codec="quant", bits=4, min_bytes=0),
    }
    for name, strategy in runs.items():
        pl.seed_everything(0, verbose=False)
        model = Net()
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, DataLoader(data, batch_size=8))
        engine = getattr(trainer.strategy, "_memcomp_engine", None)
        ledger = getattr(trainer.strategy, "memcomp_ledger", None)
        torch.save({
            "grads": model.grads,
            "rng_state": None if engine is None else engine.rng_state,
            "held": None if ledger is None else (ledger.raw_bytes, ledger.stored_bytes),
        }, out / f"{name}_rank{trainer.global_rank}.pt")
    """
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "ddp_grads.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = run_ddp_script([str(script), str(tmp)], cwd=tmp, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return {name: [torch.load(tmp / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]
            for name in ("ddp", "identity", "quant4")}


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


@pytest.mark.parametrize("name", ["ddp", "identity", "quant4"])
def test_both_ranks_hold_the_same_gradients(ranks, name):
    rank0, rank1 = ranks[name]
    assert rank0["grads"].keys() == rank1["grads"].keys()
    for key in rank0["grads"]:
        torch.testing.assert_close(rank0["grads"][key], rank1["grads"][key], rtol=0, atol=0, msg=key)


def test_identity_codec_gives_plain_ddp_gradients(ranks):
    # measured: bit-identical (the identity codec hands backward the very tensor it saved)
    plain, identity = ranks["ddp"][0]["grads"], ranks["identity"][0]["grads"]
    for key in plain:
        torch.testing.assert_close(identity[key], plain[key], rtol=0, atol=0, msg=key)


def test_quantized_gradients_are_close_to_plain_ddp(ranks):
    plain, quant = _flat(ranks["ddp"][0]["grads"]), _flat(ranks["quant4"][0]["grads"])
    # measured 0.9989, 0.9998, 0.9996 for data seeds 1, 2, 3 (4 bits, CPU, 2 ranks)
    assert torch.nn.functional.cosine_similarity(plain, quant, dim=0) > 0.995
    assert not torch.equal(plain, quant)  # 4 bits did change what backward read
    for rank in ranks["quant4"]:
        raw, stored = rank["held"]
        assert 0 < stored < raw / 4


def test_seed_policy_same_base_seed_rank_mixed_stream(ranks):
    (base0, step0), (base1, step1) = (rank["rng_state"] for rank in ranks["quant4"])
    assert base0 == base1 == 0  # seed_everything(0) on every rank
    assert step0 != step1  # independent rounding errors, averaged by the all-reduce


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_sharded_strategies_are_refused_with_the_reason(package):
    from lightning_memcomp import ActivationCompression

    strategies = importlib.import_module(f"{package}.strategies")
    with pytest.raises(RuntimeError, match=r"ActivationCompression does not support strategy=FSDPStrategy: the "
                                           r"weights it gathers .* use strategy='ddp_memcomp'"):
        ActivationCompression().setup(SimpleNamespace(strategy=strategies.FSDPStrategy(), callbacks=[]),
                                      torch.nn.Linear(4, 4), "fit")
    reject_sharded(SimpleNamespace(strategy=strategies.DDPStrategy()), "ActivationCompression")  # allowed
