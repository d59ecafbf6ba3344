"""Trainable parameters of He et al.'s CIFAR ResNet-56 with slice generators (Omidvar et al., 2021, Table 1).

Run: ``python benchmarks/csg_params.py`` (writes ``benchmarks/results/csg_params.md``, or ``--out PATH``).

For each configuration: the measured trainable parameter count after ``slice_generate``, the count
from the paper's formula computed on the unconverted network (codes ``ceil(out/s0) * ceil(in/s1) *
code_size`` for every 3x3 convolution but the first, plus the generator when it is trained, plus the
parameters left ordinary), the figure printed in the paper's Table 1, and the ratio. Also the CPU
time of a training step (forward + backward, batch 32) relative to the unconverted network,
interleaved in one process (generating the filters costs time; the convolutions are unchanged), timed with
``lightning_memcomp.bench.timing`` (``train_step``, ``interleaved``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from lightning_memcomp import slice_generate
from lightning_memcomp.bench.machine import machine_summary
from lightning_memcomp.bench.report import format_ratio, markdown_table
from lightning_memcomp.bench.timing import interleaved, median, train_step
from lightning_memcomp.surgery import count_parameters
from recipes.classification.networks_cifar import resnet56_cifar, resnet_cifar_he

ROOT = Path(__file__).resolve().parents[1]

PAPER = {"baseline": 853_018, "CSG-[16,16,3,3]-128": 347_162, "CSG-[12,12,3,3]-72": 160_450,
         "BCSG-[16,16,3,3]-1024": 381_978, "CSG-[16,16,3,3]-128, pre-trained on ResNet-20, frozen": 52_250}


def formula(model: nn.Module, slice_shape: tuple[int, ...] | None, code_size: int, generator_trained: bool) -> int:
    total = sum(p.numel() for p in model.parameters())
    if slice_shape is None:
        return total
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    converted = [m for m in convs[1:] if m.kernel_size == tuple(slice_shape[2:])]
    s0, s1 = slice_shape[:2]
    codes = sum(math.ceil(m.out_channels / s0) * math.ceil(m.in_channels / s1) * code_size for m in converted)
    gen = math.prod(slice_shape) * code_size if generator_trained else 0
    return total - sum(m.weight.numel() for m in converted) + codes + gen


def configurations() -> list[tuple[str, dict, tuple[int, ...] | None, int, bool]]:
    donor = resnet_cifar_he(20)
    slice_generate(donor, slice_shape=(16, 16, 3, 3), code_size=128)
    return [
        ("baseline", {}, None, 0, False),
        ("CSG-[16,16,3,3]-128", dict(slice_shape=(16, 16, 3, 3), code_size=128), (16, 16, 3, 3), 128, True),
        ("CSG-[12,12,3,3]-72", dict(slice_shape=(12, 12, 3, 3), code_size=72), (12, 12, 3, 3), 72, True),
        ("BCSG-[16,16,3,3]-1024", dict(slice_shape=(16, 16, 3, 3), code_size=1024, binary=True), (16, 16, 3, 3),
         1024, False),
        ("CSG-[16,16,3,3]-128, pre-trained on ResNet-20, frozen", dict(generator=donor), (16, 16, 3, 3), 128, False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "csg_params.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, models = [], {}
    for name, options, shape, code_size, trained in configurations():
        model = resnet56_cifar()
        expected = formula(model, shape, code_size, trained)
        if options:
            slice_generate(model, **options)
        measured = count_parameters(model)
        rows.append((name, measured, expected, PAPER[name], PAPER["baseline"] / measured))
        models[name] = model.train()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    # interleaved, after a warm-up round: the machine is shared, only ratios in one process are meaningful
    times = interleaved({name: (lambda m=model: train_step(m, x, y)) for name, model in models.items()}, 5, warmup=1)
    base = median(times["baseline"])
    table = markdown_table(
        ["configuration", "trainable params (measured)", "formula", "paper Table 1", "ratio", "step time vs baseline"],
        [[name, f"{measured:,}", f"{expected:,}", f"{paper:,}", format_ratio(ratio),
          f"{median(times[name]) / base:.2f}"] for name, measured, expected, paper, ratio in rows])
    print(table)
    assert all(r[1] == r[2] == r[3] for r in rows), "a measured count differs from the formula or the paper"

    text = f"""# CSG/BCSG parameter counts: CIFAR ResNet-56 (He et al., option-A shortcuts)

Command: `python benchmarks/csg_params.py`

- Machine: {machine_summary(load=True)}; {torch.get_num_threads()} torch threads.
- Counted: parameters with `requires_grad` (the generator counts when it is trained; a binary or
  pre-trained frozen generator does not). Formula: sum over converted convolutions (every 3x3 one
  but the first) of `ceil(out/s0) * ceil(in/s1) * code_size`, plus `prod(slice_shape) * code_size`
  for a trained generator, plus every parameter left ordinary; computed on the unconverted network,
  independently of the implementation. The paper's figures are Omidvar et al. (AISTATS 2021), Table 1.
- Step time: forward + backward of a batch of 32 at 32x32 on CPU, median of 5 runs interleaved with
  the baseline in one process; noisy on a shared machine, and not a GPU figure.

{table}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
