"""Fresh processes: each measurement runs in its own interpreter and hands back one marked JSON line.

A fresh process per measured configuration keeps the allocations of one configuration out of the next;
``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc return large freed buffers to the system, so that the
resident set measures what is alive. The child prints its result with :func:`emit`; the parent reads
it with :func:`run_fresh`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["MMAP_THRESHOLD", "RESULT_MARKER", "WorkerFailed", "emit", "fresh_env", "run_fresh"]

RESULT_MARKER = "MEMCOMP_BENCH_RESULT "
MMAP_THRESHOLD = "65536"


class WorkerFailed(RuntimeError):
    """A fresh process gave no result: it timed out, or exited without printing a result line."""

    def __init__(self, message: str, *, returncode: int | None = None, timed_out: bool = False,
                 stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.timed_out = timed_out
        self.stderr = stderr

    @property
    def last_line(self) -> str:
        """The last non-blank line the process wrote to stderr (usually the exception), or ``"no output"``."""
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"


def fresh_env(mmap_threshold: str | None = MMAP_THRESHOLD) -> dict[str, str]:
    """This process's environment with ``MALLOC_MMAP_THRESHOLD_`` set (or removed, for ``None``) and
    unbuffered Python output."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def emit(payload: Any) -> None:
    """Print ``payload`` as the one JSON result line that :func:`run_fresh` reads (in the child)."""
    print(RESULT_MARKER + json.dumps(payload), flush=True)


def run_fresh(args: Sequence[str], *, timeout: float | None = None,
              mmap_threshold: str | None = MMAP_THRESHOLD) -> Any:
    """Run ``python *args`` in a fresh interpreter (see :func:`fresh_env`); return the payload of the last
    result line it printed with :func:`emit`.

    Raises:
        WorkerFailed: no result line (the process failed: ``returncode`` and the end of its ``stderr`` say
            why), or none within ``timeout`` seconds (``timed_out``).
    """
    cmd = [sys.executable, *args]
    try:
        proc = subprocess.run(cmd, env=fresh_env(mmap_threshold), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"no result within {timeout:g} s: {' '.join(cmd)}", timed_out=True) from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise WorkerFailed(f"{' '.join(cmd)} exited with status {proc.returncode} and no result:\n{proc.stderr[-4000:]}",
                       returncode=proc.returncode, stderr=proc.stderr)
