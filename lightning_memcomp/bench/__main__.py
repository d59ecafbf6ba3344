"""``python -m lightning_memcomp.bench``: the same as ``memcomp bench`` (and how the workers are started)."""

import sys

from lightning_memcomp.bench.cli import main

sys.exit(main())
