"""``memcomp bench``: method parsing, checkpointing over blocks, a worker, and a small end-to-end run."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch

from lightning_memcomp import bench, track_saved_tensors
from lightning_memcomp.bench import (
    BenchConfig,
    Checkpointed,
    Method,
    MethodResult,
    add_ratios,
    build_parser,
    checkpoint_blocks,
    default_methods,
    parse_method,
    parse_methods,
    resolve_network,
    run_worker,
)

SMALL = ["--network", "tiny_cnn", "--batch-size", "8", "--input-size", "32", "--threads", "1"]


# -- methods -------------------------------------------------------------------------------------------------


def test_parse_method_reads_kind_and_value() -> None:
    method = parse_method("quant:4")
    assert (method.kind, method.value, method.name) == ("quant", 4.0, "quant:4")
    assert parse_method(" Bandlimit:50 ").name == "bandlimit:50"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quant:3", "use one of 1, 2, 4, 8"),
        ("wavelet:0.5", "compression ratio >= 1"),
        ("bandlimit:100", "[0, 100)"),
        ("quant", "needs its bits"),
        ("checkpoint:2", "takes no value"),
        ("fp8", "allowed: baseline, bf16, checkpoint"),
    ],
)
def test_parse_method_names_the_allowed_values_when_rejecting(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_method(spec)
    assert message in str(err.value)


def test_default_methods_cover_techniques_and_alternatives() -> None:
    names = {m.name for m in default_methods(lambdas=(4, 10), rates=(50, 85))}
    expected = {"baseline", "bf16", "checkpoint", "quant:8", "quant:4", "quant:2", "blpa:4", "wavelet:4", "dct:10",
                "threshold:4", "threshold:10", "bandlimit:50", "bandlimit:85", "csg"}
    assert expected <= names


def test_parse_methods_drops_duplicates_and_keeps_order() -> None:
    assert [m.name for m in parse_methods("quant:4,baseline,quant:4")] == ["quant:4", "baseline"]


def test_help_documents_every_option() -> None:
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        assert action.option_strings[0] in text


def test_resolve_network_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="--network='no_such_net' is not known"):
        resolve_network(BenchConfig(network="no_such_net"))


# -- activation checkpointing, the alternative ------------------------------------------------------------


def test_checkpoint_blocks_wraps_each_residual_block_once() -> None:
    from recipes.classification.networks_cifar import resnet18_cifar

    model = resnet18_cifar(num_classes=10)
    wrapped = checkpoint_blocks(model)
    assert len(wrapped) == 8  # 4 stages x 2 BasicBlocks
    assert all(isinstance(model.get_submodule(name), Checkpointed) for name in wrapped)
    assert not any(isinstance(m.block, Checkpointed) for m in model.modules() if isinstance(m, Checkpointed))


def test_checkpointed_blocks_give_the_same_gradients_and_hold_less() -> None:
    from recipes.classification.networks_cifar import resnet18_cifar

    plain = resnet18_cifar(num_classes=10)
    ckpt = copy.deepcopy(plain)
    checkpoint_blocks(ckpt)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    held = {}
    for key, model in (("plain", plain), ("ckpt", ckpt)):
        with track_saved_tensors(model) as ledger:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        held[key] = ledger.raw_bytes
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert held["ckpt"] < 0.5 * held["plain"]


def test_checkpoint_blocks_rejects_a_selection_that_matches_nothing() -> None:
    with pytest.raises(ValueError, match="--checkpoint-modules=\\['NoSuchBlock'\\] matched no block"):
        checkpoint_blocks(bench.TinyCNN(), ["NoSuchBlock"])


# -- ratios ------------------------------------------------------------------------------------------------------


def test_add_ratios_divides_by_the_baseline_and_marks_the_pareto_front() -> None:
    rows = [
        MethodResult("baseline", held_bytes=100, step_time_s=1.0, trainable_params=10, after_forward_bytes=50),
        MethodResult("fast_small", held_bytes=20, step_time_s=1.2, trainable_params=10, after_forward_bytes=10),
        MethodResult("slow_big", held_bytes=40, step_time_s=1.5, trainable_params=5, after_forward_bytes=30),
        MethodResult("broken", status="failed", error="boom"),
    ]
    add_ratios(rows, timing="isolated")
    base, good, dominated, broken = rows
    assert (base.held_ratio, base.time_ratio, base.params_ratio) == (1.0, 1.0, 1.0)
    assert good.held_ratio == pytest.approx(0.2) and good.time_ratio == pytest.approx(1.2)
    assert dominated.params_ratio == pytest.approx(0.5)
    assert base.pareto and good.pareto and not dominated.pareto
    assert broken.held_ratio is None


# -- the worker --------------------------------------------------------------------------------------------------


def test_worker_prints_one_json_result_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([*SMALL, "--steps", "1", "--warmup", "1", "--worker", "quant:4"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(bench.RESULT_MARKER)]
    assert len(lines) == 1
    result = json.loads(lines[0][len(bench.RESULT_MARKER):])
    assert result["method"] == "quant:4" and result["status"] == "ok"
    assert 0 < result["held_bytes"] < result["held_raw_bytes"]
    assert result["time_ratio"] > 0


@pytest.mark.parametrize("fft_size", ["power2", "minimal"])
def test_bandlimit_rows_use_the_requested_fft_grid(fft_size: str) -> None:
    cfg = BenchConfig(network="tiny_cnn", batch_size=2, input_size=12, steps=1, warmup=1, timing="isolated",
                      threads=1, band_fft_size=fft_size)
    result = run_worker(cfg, Method("bandlimit", 50))
    assert result.status == "ok" and f"fft_size={fft_size}" in result.notes
    assert result.held_bytes > 0
    assert "--band-fft-size" in bench._config_argv(cfg) and fft_size in bench._config_argv(cfg)


def test_an_unknown_band_fft_size_is_refused_with_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"--band-fft-size='pow2' is not allowed; use one of power2, linear, minimal"):
        BenchConfig(band_fft_size="pow2").validate()


def test_worker_trains_to_above_chance_on_the_digits() -> None:
    cfg = BenchConfig(network="tiny_cnn", batch_size=64, steps=1, warmup=0, timing="isolated", accuracy_epochs=2,
                      threads=1)
    result = run_worker(cfg, Method("baseline"))
    assert result.accuracy_metric.startswith("top-1")
    assert result.accuracy > 40.0  # ten classes: chance is 10 %


def test_a_failing_method_becomes_a_failed_row_with_its_reason() -> None:
    cfg = BenchConfig(network="tiny_cnn", batch_size=8, input_size=16, steps=1, warmup=0, threads=1,
                      checkpoint_modules=("NoSuchBlock",), timeout=300)
    result = bench._spawn(cfg, Method("checkpoint"))
    assert result.status == "failed"
    assert "matched no block" in result.error


# -- a small end-to-end run ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    from lightning_memcomp.cli import main as memcomp

    out = tmp_path_factory.mktemp("bench")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = memcomp(["bench", *SMALL, "--methods", "baseline,quant:4", "--steps", "3", "--warmup", "1",
                          "--out", str(out), "--no-progress"])
    return status, out, buffer.getvalue()


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "bench_tiny_cnn_cpu.csv", newline="") as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def test_small_run_succeeds_and_prints_the_table(small_run: tuple[int, Path, str]) -> None:
    status, _, printed = small_run
    assert status == 0
    assert "x base" in printed and "quant:4" in printed and "baseline" in printed


def test_small_run_baseline_row_has_ratios_of_one(small_run: tuple[int, Path, str]) -> None:
    base = _rows(small_run[1])["baseline"]
    for column in ("held_ratio", "after_forward_ratio", "step_peak_ratio", "time_ratio", "params_ratio"):
        assert float(base[column]) == pytest.approx(1.0), column


def test_small_run_quant_holds_fewer_bytes_than_the_baseline(small_run: tuple[int, Path, str]) -> None:
    rows = _rows(small_run[1])
    quant, base = rows["quant:4"], rows["baseline"]
    assert quant["status"] == "ok"
    assert int(quant["held_bytes"]) < 0.5 * int(base["held_bytes"])
    assert int(quant["held_raw_bytes"]) == int(base["held_bytes"])  # the same activations, before encoding
    assert float(quant["held_ratio"]) == pytest.approx(int(quant["held_bytes"]) / int(base["held_bytes"]))
    assert float(quant["step_time_s"]) > 0 and int(quant["trainable_params"]) == int(base["trainable_params"])


def test_small_run_writes_markdown_with_the_machine_and_a_png(small_run: tuple[int, Path, str]) -> None:
    out = small_run[1]
    text = (out / "bench_tiny_cnn_cpu.md").read_text()
    assert "machine:" in text and f"torch {torch.__version__}" in text
    assert "| quant:4 |" in text and "| baseline |" in text
    png = (out / "bench_tiny_cnn_cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_peak_per_sample_at_two_batch_sizes_and_the_batch_multiplier(tmp_path: Path) -> None:
    from lightning_memcomp.cli import main as memcomp

    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = memcomp(["bench", *SMALL, "--methods", "baseline,quant:2", "--steps", "1", "--warmup", "1",
                          "--peak-batch", "64", "--timing", "isolated", "--out", str(tmp_path), "--no-progress"])
    assert status == 0
    rows = _rows(tmp_path)
    base, quant = rows["baseline"], rows["quant:2"]
    base_ps, quant_ps = float(base["peak_per_sample_bytes"]), float(quant["peak_per_sample_bytes"])
    # per sample: at least the input (3x32x32 fp32) and more than the activations quant keeps at 2 bits
    assert 3 * 32 * 32 * 4 < quant_ps < base_ps
    assert float(base["batch_multiplier"]) == pytest.approx(1.0)
    assert float(quant["batch_multiplier"]) == pytest.approx(base_ps / quant_ps)
    assert "peak/sample MiB" in buffer.getvalue()
    text = (tmp_path / "bench_tiny_cnn_cpu.md").read_text()
    assert "batch x" in text and "(step peak at batch 64 - step peak at batch 8) / 56" in text


@pytest.mark.parametrize("value", [1, 8, 4])
def test_peak_batch_must_exceed_the_batch_size(value: int) -> None:
    with pytest.raises(ValueError, match="--peak-batch"):
        BenchConfig(network="tiny_cnn", batch_size=8, peak_batch=value).validate()


def test_csv_round_trip_keeps_numbers_and_missing_cells(tmp_path: Path) -> None:
    rows = [MethodResult("baseline", held_bytes=100, step_time_s=1.5, pareto=True),
            MethodResult("quant:4", status="failed", error="boom, with a comma")]
    bench.write_csv(rows, tmp_path / "r.csv")
    back = bench.read_csv(tmp_path / "r.csv")
    assert back == rows


# -- the memory floor stand-in -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_floor_holds_what_quant_holds_and_decodes_to_zeros(bits: int) -> None:
    """``floor:B`` is only useful if it holds exactly a quant payload: compare the ledgers on one network."""
    from lightning_memcomp import compress_activations
    from lightning_memcomp.bench.floor import FloorCodec

    torch.manual_seed(0)
    model = bench.TinyCNN()
    x = torch.randn(4, 1, 32, 32)
    with compress_activations(model, codec="quant", bits=bits) as quant_ledger:
        model(x).sum().backward()
    seen: list[torch.Tensor] = []
    codec = FloorCodec(bits=bits)
    original = codec.decode

    def decode(payload):  # type: ignore[no-untyped-def]
        out = original(payload)
        seen.append(out)
        return out

    codec.decode = decode  # type: ignore[method-assign]
    with compress_activations(model, codec=codec) as floor_ledger:
        model(x).sum().backward()
    assert floor_ledger.raw_bytes == quant_ledger.raw_bytes
    assert floor_ledger.stored_bytes == quant_ledger.stored_bytes
    floats = [t for t in seen if t.is_floating_point()]
    assert floats and all(not t.any() for t in floats)


def test_floor_is_a_method_with_bits() -> None:
    method = parse_method("floor:2")
    assert (method.kind, method.value) == ("floor", 2.0)
    assert "no real gradients" in method.description
    with pytest.raises(ValueError, match="bits=3"):
        parse_method("floor:3")
