"""The measurement modules of ``lightning_memcomp.bench`` that the scripts in ``benchmarks/`` share: fresh
processes, memory probes, timing, codec and gradient fidelity, tables and the machine line."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from torch import nn

from lightning_memcomp import track_saved_tensors
from lightning_memcomp.bench import TinyCNN
from lightning_memcomp.bench.fidelity import CheckedCodec, codec_roundtrip, flat_gradients, gradient_agreement
from lightning_memcomp.bench.machine import machine_info, machine_summary
from lightning_memcomp.bench.probes import live_tensors, resident_bytes
from lightning_memcomp.bench.process import RESULT_MARKER, WorkerFailed, emit, fresh_env, run_fresh
from lightning_memcomp.bench.report import format_ratio, markdown_table
from lightning_memcomp.bench.results import ratio
from lightning_memcomp.bench.timing import interleaved, median, train_step
from lightning_memcomp.compression import compress_activations, make_codec
from lightning_memcomp.memory.engine import Codec
from lightning_memcomp.memory.ledger import Ledger

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

MiB = 1024 * 1024


# -- fresh processes -------------------------------------------------------------------------------------------


def test_emit_prints_one_marked_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    emit({"a": [1, 2.5], "b": None})
    assert capsys.readouterr().out == RESULT_MARKER + '{"a": [1, 2.5], "b": null}\n'


def test_fresh_env_sets_or_removes_the_mmap_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1")
    assert fresh_env()["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert "MALLOC_MMAP_THRESHOLD_" not in fresh_env(None)
    assert fresh_env()["PYTHONUNBUFFERED"] == "1"


def test_run_fresh_returns_the_last_result_line_of_a_fresh_interpreter() -> None:
    code = ("import os, sys; from lightning_memcomp.bench.process import emit; print('noise'); emit(1); "
            "emit({'pid': os.getpid(), 'mmap': os.environ.get('MALLOC_MMAP_THRESHOLD_')})")
    import os

    got = run_fresh(["-c", code])
    assert got["mmap"] == "65536" and got["pid"] != os.getpid()
    assert run_fresh(["-c", code], mmap_threshold=None)["mmap"] is None


def test_run_fresh_says_why_a_process_gave_no_result() -> None:
    with pytest.raises(WorkerFailed) as err:
        run_fresh(["-c", "import sys; print('partial'); sys.exit('it broke here')"])
    assert err.value.returncode == 1 and err.value.last_line == "it broke here" and not err.value.timed_out
    with pytest.raises(WorkerFailed) as err:
        run_fresh(["-c", "import time; time.sleep(30)"], timeout=1)
    assert err.value.timed_out


# -- memory probes -----------------------------------------------------------------------------------------------


_PROBE_CHILD = """
import torch
from torch import nn
from lightning_memcomp import track_saved_tensors
from lightning_memcomp.bench.probes import MemoryProbe, forward_memory, rss
from lightning_memcomp.bench.process import emit

MiB = 1024 * 1024


class Hold(nn.Module):  # exp saves its output for backward: 8 MiB; the output itself is 4 bytes
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2 * MiB))

    def forward(self, x):
        return torch.exp(self.w * x).sum().reshape(1, 1)


model, x = Hold(), torch.ones(())
mem = forward_memory(model, x, lambda: track_saved_tensors(model), warmup=x)
plain = forward_memory(model, x)
probe = MemoryProbe(torch.device("cpu"))
probe.settle()
start = probe.current()
probe.reset_peak()
big = torch.ones(8 * MiB)  # 32 MiB, touched, then freed
del big
emit({"raw": mem.ledger.raw_bytes, "growth": mem.growth, "output": mem.output_bytes,
      "less_output": mem.growth_less_output, "forward_s": mem.forward_s, "plain_growth": plain.growth,
      "plain_ledger": plain.ledger, "start": start, "rss": rss(), "after": probe.current(),
      "peak": probe.peak(start, resident=1000) if probe.peak_available else None})
"""


def test_forward_memory_and_the_step_peak_in_a_fresh_process() -> None:
    got = run_fresh(["-c", _PROBE_CHILD])
    assert got["raw"] >= 8 * MiB  # exp's output, held for backward
    # the resident set grew by what is held: the 8 MiB saved (the product w * x was freed), not 16 MiB
    assert 7 * MiB < got["growth"] < 10 * MiB and 7 * MiB < got["plain_growth"] < 10 * MiB
    assert got["plain_ledger"] is None  # without an engine there is no ledger
    assert got["output"] == 4 and got["less_output"] == got["growth"] - 4 and got["forward_s"] > 0
    assert got["start"] > 0 and abs(got["rss"] - got["after"]) < MiB  # current() is the resident set on CPU
    if got["peak"] is not None:  # VmHWM: the freed 32 MiB still count at the peak
        assert got["peak"] >= 31 * MiB + 1000 and got["after"] < got["start"] + 4 * MiB


def test_resident_bytes_counts_each_storage_once() -> None:
    model = nn.Linear(10, 10)  # 110 floats
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.ones(4, 10)
    assert resident_bytes(model) == 110 * 4
    assert resident_bytes(model, opt, x, x[:2]) == 110 * 4 + 40 * 4  # a view shares x's storage
    model(x).sum().backward()
    opt.step()  # momentum buffers
    assert resident_bytes(model, opt) == 2 * 110 * 4


def test_live_tensors_sees_a_tensor_come_and_go() -> None:
    before = live_tensors()
    kept = [torch.zeros(1) for _ in range(5)]
    assert live_tensors() == before + 5
    del kept
    assert live_tensors() == before


# -- timing -----------------------------------------------------------------------------------------------------


def test_interleaved_turns_the_order_each_round_and_drops_the_warmup() -> None:
    calls: list[str] = []

    def step(name: str, seconds: float):
        return lambda: calls.append(name) or seconds

    times = interleaved({"a": step("a", 1.0), "b": step("b", 2.0), "c": step("c", 3.0)}, 3, warmup=1)
    assert calls == list("abc" "abc" "bca" "cab")
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}
    calls.clear()
    interleaved({"baseline": step("baseline", 0), "method": step("method", 0)}, 2)
    assert calls == ["baseline", "method", "method", "baseline"]
    assert median([3.0, 1.0, 2.0, 10.0]) == 2.5


def test_train_step_zeroes_steps_and_leaves_out_the_after_forward_pause() -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model.weight.grad = torch.full_like(model.weight, 100.0)  # stale: must be zeroed, not accumulated
    order: list[str] = []
    w0 = model.weight.detach().clone()
    seen = []
    seconds = train_step(model, x, y, opt, lambda: track_saved_tensors(model),
                         before=lambda: order.append("before"),
                         after_forward=lambda led: (seen.append(led), time.sleep(0.3)))
    assert seconds < 0.3  # the pause is not counted
    assert isinstance(seen[0], Ledger)  # what the context yielded is handed to after_forward
    expected = nn.Linear(4, 3)
    expected.load_state_dict({"weight": w0, "bias": model.bias.detach() + 0.1 * model.bias.grad})
    nn.functional.cross_entropy(expected(x), y).backward()
    torch.testing.assert_close(model.weight.grad, expected.weight.grad)
    torch.testing.assert_close(model.weight.detach(), w0 - 0.1 * expected.weight.grad)
    assert order == ["before"]


# -- fidelity ---------------------------------------------------------------------------------------------------


def test_codec_roundtrip_of_identity_and_a_lossy_codec() -> None:
    x = torch.randn(2, 4, 32, 32)
    exact = codec_roundtrip(make_codec("identity"), x)
    assert exact.rel_error == 0.0 and exact.stored_ratio == pytest.approx(1.0) and exact.exact_shape_dtype
    lossy = codec_roundtrip(make_codec("dct", compression_ratio=10, block=16), x)
    assert 0.0 < lossy.rel_error < 1.0 and lossy.stored_ratio < 0.5 and lossy.exact_shape_dtype


def test_checked_codec_counts_exact_decodes_and_keeps_the_inner_figures() -> None:
    model = TinyCNN(3, 10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    codec = CheckedCodec(make_codec("quant", bits=4))
    with compress_activations(model, codec=codec) as ledger:
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    quant = ledger.by_codec()["quant"]
    assert codec.decodes >= quant.count > 0 and codec.exact == codec.decodes
    assert quant.stored_bytes < quant.raw_bytes / 4

    class Shrinks(Codec):  # a broken codec: decodes to a smaller tensor
        name = "shrinks"

        def encode(self, tensor, ctx):
            return tensor.clone()

        def decode(self, payload):
            return payload.flatten()[:-1].clone()

    broken = CheckedCodec(Shrinks())
    with pytest.raises(RuntimeError):
        with compress_activations(model, codec=broken):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    assert broken.decodes >= 1 and broken.exact == 0


def test_gradient_agreement_of_identical_and_perturbed_gradients() -> None:
    model = TinyCNN(3, 10)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    base = flat_gradients(model, x, y)
    assert base.dtype == torch.float64 and base.numel() == sum(p.numel() for p in model.parameters())
    cosine, same = gradient_agreement(flat_gradients(model, x, y, track_saved_tensors(model)), base)
    assert cosine == pytest.approx(1.0, abs=1e-12) and same
    cosine, same = gradient_agreement(flat_gradients(model, x, y, compress_activations(model, "quant", bits=2)),
                                      base)
    assert 0.5 < cosine < 1.0 and not same


# -- tables and the machine -----------------------------------------------------------------------------------


def test_markdown_table_aligns_and_checks_its_columns() -> None:
    assert markdown_table(["a", "b", "c"], [[1, "x", ""]]) == "| a | b | c |\n|---|---:|---:|\n| 1 | x |  |"
    assert markdown_table(["a", "b"], [], "lc").splitlines()[1] == "|---|:-:|"
    with pytest.raises(ValueError, match="one of l, r, c for each of the 2 columns"):
        markdown_table(["a", "b"], [], "l")


def test_ratio_and_its_format_leave_missing_figures_out() -> None:
    assert ratio(3, 4) == 0.75 and ratio(None, 4) is None and ratio(3, 0) is None
    assert format_ratio(ratio(3, 4)) == "0.75x" and format_ratio(ratio(3, None)) == "-"


def test_machine_summary_names_cpu_cores_torch_and_gpu() -> None:
    info = machine_info()
    text = machine_summary(info, load=True)
    assert text.startswith(f"{info['cpu']}, {info['cores']} cores, torch {torch.__version__}")
    assert f"GPU: {info['gpu']}" in text and "load average" in text
    assert "load average" not in machine_summary(info)


def test_step_timer_times_every_training_batch_of_a_fit(tmp_path) -> None:
    import lightning.pytorch as pl

    from lightning_memcomp.bench.callbacks import StepTimer

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            time.sleep(0.02)
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randint(0, 2, (12,)))
    timer = StepTimer()
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, callbacks=[timer], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=2))
    assert len(timer.times) == 5 and all(0.02 <= t < 5 for t in timer.times)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
