"""Trainable parameters of He et al.'s CIFAR ResNet-56 with slice generators (Omidvar et al., 2021, Table 1).

Run: ``python benchmarks/csg_params.py`` (writes ``benchmarks/results/csg_params.md``).

For each configuration: the measured trainable parameter count after ``slice_generate``, the count
from the paper's formula computed on the unconverted network (codes ``ceil(out/s0) * ceil(in/s1) *
code_size`` for every 3x3 convolution but the first, plus the generator when it is trained, plus the
parameters left ordinary), the figure printed in the paper's Table 1, and the ratio. Also the CPU
time of a training step (forward + backward, batch 32) relative to the unconverted network,
interleaved in one process (generating the filters costs time; the convolutions are unchanged).
"""

from __future__ import annotations

import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_memcomp import slice_generate  # noqa: E402
from lightning_memcomp.surgery import count_parameters  # noqa: E402
from recipes.classification.networks_cifar import resnet56_cifar, resnet_cifar_he  # noqa: E402

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


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
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
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up
        step_time(model, x, y)
    for _ in range(5):  # interleaved: the machine is shared, only ratios in one process are meaningful
        for name, model in models.items():
            times[name].append(step_time(model, x, y))
    base = sorted(times["baseline"])[2]
    header = "| configuration | trainable params (measured) | formula | paper Table 1 | ratio | step time vs baseline |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for name, measured, expected, paper, ratio in rows:
        rel = sorted(times[name])[2] / base
        lines.append(f"| {name} | {measured:,} | {expected:,} | {paper:,} | {ratio:.2f}x | {rel:.2f} |")
    table = "\n".join(lines)
    print(table)
    assert all(r[1] == r[2] == r[3] for r in rows), "a measured count differs from the formula or the paper"

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    text = f"""# CSG/BCSG parameter counts: CIFAR ResNet-56 (He et al., option-A shortcuts)

Command: `python benchmarks/csg_params.py`

- Machine: {cpu}, {torch.get_num_threads()} torch threads ({len(__import__('os').sched_getaffinity(0))} cores
  visible), shared with other jobs; no GPU was lent to this task (CPU only).
- torch {torch.__version__}, Python {platform.python_version()}; date {datetime.date.today().isoformat()}.
- Counted: parameters with `requires_grad` (the generator counts when it is trained; a binary or
  pre-trained frozen generator does not). Formula: sum over converted convolutions (every 3x3 one
  but the first) of `ceil(out/s0) * ceil(in/s1) * code_size`, plus `prod(slice_shape) * code_size`
  for a trained generator, plus every parameter left ordinary; computed on the unconverted network,
  independently of the implementation. The paper's figures are Omidvar et al. (AISTATS 2021), Table 1.
- Step time: forward + backward of a batch of 32 at 32x32 on CPU, median of 5 runs interleaved with
  the baseline in one process; noisy on a shared machine, and not a GPU figure.

{table}
"""
    out = ROOT / "benchmarks" / "results" / "csg_params.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
