"""A wheel built from the repository runs the new user's first hour from an empty directory.

The wheel is built from a copy of the source tree (``pip wheel --no-build-isolation``: no network), installed
with ``pip install --target`` and put first on ``PYTHONPATH``, so the installed copy of ``lightning_memcomp``
and ``recipes`` is the one that runs (the test checks that), with the configs as package data. Then, in an
empty directory: ``memcomp configs``, a baseline and a ``--technique quant:4`` run of one epoch each, and
``memcomp compare`` on the two runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_NOT_SOURCE = shutil.ignore_patterns(".git", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache",
                                     ".hypothesis", "memcomp_logs", "lightning_logs", "bench_out", "data", "*.so",
                                     ".venv", "venv", "tests", "benchmarks")


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_installed_wheel_runs_configs_fit_with_a_technique_and_compare_from_an_empty_directory(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    env = {**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
          str(tmp_path / "dist"), str(source)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("lightning_memcomp-*.whl")
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site),
          str(wheel)], tmp_path, env)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**env, "PYTHONPATH": str(site)}
    where = _run([sys.executable, "-c", "import lightning_memcomp, recipes; print(lightning_memcomp.__file__); "
                  "print(recipes.__file__)"], empty, env).split()
    assert all(Path(p).is_relative_to(site) for p in where), where  # the wheel's copy, not the repository
    memcomp = [str(site / "bin" / "memcomp")]
    assert Path(memcomp[0]).is_file()

    listing = _run(memcomp + ["configs"], empty, env)
    assert "digits_baseline" in listing and "spleen_combined" in listing
    _run(memcomp + ["fit", "--config", "digits_baseline", "--trainer.max_epochs=1"], empty, env)
    out = _run(memcomp + ["fit", "--config", "digits_baseline", "--technique", "quant:4", "--trainer.max_epochs=1"],
               empty, env)
    assert "memcomp_logs/digits_quant4/version_0" in out
    runs = ["memcomp_logs/digits_baseline/version_0", "memcomp_logs/digits_quant4/version_0"]
    table = _run(memcomp + ["compare", *runs], empty, env)
    rows = [line for line in table.splitlines() if "digits_" in line]
    assert any("baseline" in r for r in rows) and any("quant:4" in r for r in rows), table
    assert (empty / "memcomp_compare.png").is_file() and (empty / "memcomp_compare.csv").is_file()
