"""The shipped recipe configs: found by name from anywhere (they are package data), and listed.

``memcomp fit --config digits_quant4`` resolves a shipped name (with or without ``.yaml``, or the
repository path ``recipes/configs/digits_quant4.yaml`` from another directory); a path that exists always
wins. ``memcomp configs`` lists them with dataset, network, technique and a one-line description.
"""

from __future__ import annotations

import difflib
import importlib.resources
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from lightning_memcomp.short_errors import ShortArgumentParser
from lightning_memcomp.techniques import technique_of

__all__ = ["ConfigInfo", "list_configs", "main", "resolve_config", "resolve_config_args", "shipped_configs"]

_CONFIG_FLAGS = ("--config", "-c")


def shipped_configs() -> dict[str, Path]:
    """``{name: path}`` of the configs installed with the recipes (``recipes/configs/*.yaml``), sorted by name."""
    root = importlib.resources.files("recipes") / "configs"
    found = {entry.name[: -len(".yaml")]: Path(str(entry)) for entry in root.iterdir() if entry.name.endswith(".yaml")}
    return dict(sorted(found.items()))


def resolve_config(value: str) -> str:
    """The file ``--config value`` means: the path when it exists, else the shipped config of that name.

    Raises:
        ValueError: neither a file nor a shipped name (the message suggests close names).
    """
    path = Path(value).expanduser()
    if path.is_file():
        return value
    shipped = shipped_configs()
    name = path.name
    for suffix in (".yaml", ".yml"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    parent = path.parent.as_posix()
    if name in shipped and (parent in ("", ".") or parent.endswith("recipes/configs")):
        return str(shipped[name])
    close = difflib.get_close_matches(name, list(shipped), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(
        f"--config={value!r} is neither a file nor a shipped config; {hint}shipped configs are named "
        "<dataset>_<technique> (e.g. digits_quant4); `memcomp configs` lists them"
    )


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config``/``-c`` value resolved by :func:`resolve_config`."""
    out: list[str] = []
    take_next = False
    for arg in args:
        if take_next:
            out.append(resolve_config(arg))
            take_next = False
        elif arg in _CONFIG_FLAGS:
            out.append(arg)
            take_next = True
        elif arg.startswith(tuple(f + "=" for f in _CONFIG_FLAGS)):
            flag, _, value = arg.partition("=")
            out.append(f"{flag}={resolve_config(value)}")
        else:
            out.append(arg)
    return out


@dataclass(frozen=True)
class ConfigInfo:
    """One shipped config, as ``memcomp configs`` lists it."""

    name: str
    dataset: str
    network: str
    technique: str
    description: str
    path: Path


def _describe(name: str, path: Path) -> ConfigInfo:
    text = path.read_text()
    spec = yaml.safe_load(text) or {}
    header = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    technique_line = next((h for h in header if h.startswith("Technique:")), "")
    description = technique_line[len("Technique:"):].strip() or (header[0] if header else "")
    model_args = (spec.get("model") or {}).get("init_args") or {}
    network = str(model_args.get("network", "-"))
    if "spatial_dims" in model_args:
        network = f"{network} {model_args['spatial_dims']}-D"
    dataset = name.rsplit("_", 1)[0]  # shipped configs are named <dataset>_<technique>
    return ConfigInfo(name, dataset, network, technique_of(spec), description.rstrip("."), path)


def list_configs() -> list[ConfigInfo]:
    """Every shipped config, described from its YAML (dataset, network, technique) and header comment."""
    return [_describe(name, path) for name, path in shipped_configs().items()]


def format_configs(rows: Sequence[ConfigInfo], width: int | None = None) -> str:
    """The table ``memcomp configs`` prints; descriptions are cut to fit ``width`` characters (no cut: None)."""
    heads = ("config", "dataset", "network", "technique")
    cols = [[getattr(r, f) for r in rows] for f in ("name", "dataset", "network", "technique")]
    widths = [max(len(h), *(len(v) for v in col)) if col else len(h) for h, col in zip(heads, cols)]
    lead = sum(widths) + 2 * len(widths)
    room = max(20, width - lead) if width else 10_000
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)) + "  description"]
    for row in rows:
        desc = row.description if len(row.description) <= room else row.description[: room - 3] + "..."
        cells = (row.name, row.dataset, row.network, row.technique)
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + desc)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``memcomp configs [--dataset NAME] [--paths]``: list the shipped configs; returns the exit status."""
    parser = ShortArgumentParser(
        prog="memcomp configs",
        description="List the shipped recipe configs. Run one by name from any directory: "
                    "memcomp fit --config NAME [--technique SPEC].",
    )
    parser.add_argument("--dataset", default=None, help="only the configs of this dataset (e.g. digits, cifar10)")
    parser.add_argument("--paths", action="store_true", help="print each config's file path instead of the table")
    args = parser.parse_args(list(argv or []))
    rows = list_configs()
    if args.dataset:
        rows = [r for r in rows if r.name.startswith(args.dataset + "_")]
        if not rows:
            parser.error(f"--dataset={args.dataset!r} matches no shipped config; allowed: "
                         + ", ".join(sorted({r.name.rsplit("_", 1)[0] for r in list_configs()})))
    if args.paths:
        print("\n".join(str(r.path) for r in rows))
    else:
        print(format_configs(rows, shutil.get_terminal_size().columns if sys.stdout.isatty() else None))
        print(f"\n{len(rows)} configs. Run one: memcomp fit --config NAME; switch technique with --technique "
              "(e.g. --technique csg+quant:4); see memcomp fit --help.")
    return 0
