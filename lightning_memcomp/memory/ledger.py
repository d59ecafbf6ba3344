"""The ledger: what autograd saved for backward during a forward pass, raw and as stored."""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1024 * 1024


@dataclass
class ModuleMemory:
    """Bytes held for backward that were saved while one module was running."""

    raw_bytes: int = 0
    stored_bytes: int = 0
    count: int = 0
    passthrough_bytes: int = 0
    passthrough_count: int = 0

    @property
    def ratio(self) -> float:
        """Raw over stored bytes (``inf`` when nothing is stored)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else float("inf")


@dataclass
class Ledger:
    """Accounting of the tensors saved for backward inside one engine context.

    ``raw_bytes`` counts every distinct saved activation once, at its dense size; ``stored_bytes`` the
    bytes actually kept after encoding. Tensors the engine passes through untouched (below the size
    threshold, non-floating, not requiring grad, or refused by the codec) are included in both and
    also reported as ``passthrough_bytes``. Parameters and buffers are never counted.
    """

    raw_bytes: int = 0
    stored_bytes: int = 0
    count: int = 0
    passthrough_bytes: int = 0
    passthrough_count: int = 0
    #: saves that found their storage already packed (e.g. a ReLU output the next conv saves too)
    shared_saves: int = 0
    #: saves of parameters or buffers, which are never encoded nor counted
    parameter_saves: int = 0
    _modules: dict[str, ModuleMemory] = field(default_factory=dict, repr=False)
    _codecs: dict[str, ModuleMemory] = field(default_factory=dict, repr=False)
    _reasons: dict[str, int] = field(default_factory=dict, repr=False)

    def record(self, module_name: str, codec_name: str, raw: int, stored: int, passthrough: bool,
               reason: str | None = None) -> None:
        """Count one saved tensor; a passthrough one is counted under ``reason`` (``"small"``, ``"not floating"``,
        ``"not selected"``, ``"declined by codec"``; ``None``: ``"other"``)."""
        if passthrough:
            key = reason or "other"
            self._reasons[key] = self._reasons.get(key, 0) + raw
        self.raw_bytes += raw
        self.stored_bytes += stored
        self.count += 1
        for table, key in ((self._modules, module_name), (self._codecs, codec_name)):
            entry = table.setdefault(key, ModuleMemory())
            entry.raw_bytes += raw
            entry.stored_bytes += stored
            entry.count += 1
            if passthrough:
                entry.passthrough_bytes += raw
                entry.passthrough_count += 1
        if passthrough:
            self.passthrough_bytes += raw
            self.passthrough_count += 1

    def by_module(self) -> dict[str, ModuleMemory]:
        """Qualified module name (``""`` for the root) to its bytes and tensor count."""
        return dict(self._modules)

    def left_as_is(self) -> dict[str, int]:
        """Bytes kept as they were (passthrough), by reason: ``"small"`` (under the engine's ``min_bytes``),
        ``"not floating"`` (integer or bool tensors the codec does not take), ``"declined by codec"`` (0-/1-D
        statistics, non-finite values, a payload that would not be smaller, ...), ``"not selected"`` (saved by a
        module outside the ``modules=`` selection). They sum to ``passthrough_bytes``."""
        return dict(self._reasons)

    def by_codec(self) -> dict[str, ModuleMemory]:
        """Codec name (``"passthrough"`` for untouched tensors) to its bytes and tensor count."""
        return dict(self._codecs)

    @property
    def ratio(self) -> float:
        """Compression ratio raw / stored (1.0 for the identity codec)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def reset(self) -> None:
        self.raw_bytes = self.stored_bytes = self.count = 0
        self.passthrough_bytes = self.passthrough_count = 0
        self.shared_saves = self.parameter_saves = 0
        self._modules.clear()
        self._codecs.clear()
        self._reasons.clear()

    def merge(self, other: Ledger) -> None:
        """Add another ledger's figures to this one (e.g. several forward passes of one step)."""
        self.raw_bytes += other.raw_bytes
        self.stored_bytes += other.stored_bytes
        self.count += other.count
        self.passthrough_bytes += other.passthrough_bytes
        self.passthrough_count += other.passthrough_count
        self.shared_saves += other.shared_saves
        self.parameter_saves += other.parameter_saves
        for key, value in other._reasons.items():
            self._reasons[key] = self._reasons.get(key, 0) + value
        for mine, theirs in ((self._modules, other._modules), (self._codecs, other._codecs)):
            for key, value in theirs.items():
                entry = mine.setdefault(key, ModuleMemory())
                entry.raw_bytes += value.raw_bytes
                entry.stored_bytes += value.stored_bytes
                entry.count += value.count
                entry.passthrough_bytes += value.passthrough_bytes
                entry.passthrough_count += value.passthrough_count

    def table(self, top: int | None = None) -> str:
        """A markdown table of the modules, most raw bytes first."""
        rows = sorted(self._modules.items(), key=lambda kv: kv[1].raw_bytes, reverse=True)
        if top is not None:
            rows = rows[:top]
        lines = [
            "| module | tensors | raw MiB | stored MiB | ratio |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, m in rows:
            lines.append(
                f"| {name or '(root)'} | {m.count} | {m.raw_bytes / MiB:.2f} | {m.stored_bytes / MiB:.2f} "
                f"| {m.ratio:.2f} |"
            )
        lines.append(
            f"| **total** | {self.count} | {self.raw_bytes / MiB:.2f} | {self.stored_bytes / MiB:.2f} "
            f"| {self.ratio:.2f} |"
        )
        stored_by = [(k, m) for k, m in sorted(self._codecs.items(), key=lambda kv: -kv[1].raw_bytes)
                     if k != "passthrough"]
        if stored_by:  # which codec stored what: the precision policy's derivative codes, a transform's fallback
            lines.append("\nBy codec: " + ", ".join(
                f"{k} {m.raw_bytes / MiB:.2f} -> {m.stored_bytes / MiB:.2f} MiB" for k, m in stored_by))
        if self.passthrough_bytes:
            reasons = ", ".join(f"{k} {v / MiB:.2f}" for k, v in sorted(self._reasons.items(), key=lambda kv: -kv[1]))
            lines.append(f"Left as it is: {self.passthrough_bytes / MiB:.2f} MiB "
                         f"({self.passthrough_bytes / max(self.raw_bytes, 1):.1%} of raw): {reasons} MiB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"Ledger(tensors={self.count}, raw={self.raw_bytes / MiB:.2f} MiB, "
            f"stored={self.stored_bytes / MiB:.2f} MiB, ratio={self.ratio:.2f}x)"
        )
