"""Short error messages for the ``memcomp`` command: one message naming the option, the value and what is allowed.

A user's mistake (a bad option value, a refused combination, missing data, a missing optional
dependency, an option the parser does not accept) ends the command with at most a few lines and exit
status 2; a bug in the code (any other exception) keeps its traceback. ``--debug`` or ``MEMCOMP_DEBUG=1``
shows the traceback of everything.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import traceback
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEBUG_ENV", "MAX_MESSAGE_LINES", "ShortArgumentParser", "callback_option_hint", "debug_requested",
           "short_message"]

DEBUG_ENV = "MEMCOMP_DEBUG"
#: lines of a condensed message (the command adds one line pointing at --debug)
MAX_MESSAGE_LINES = 3
_USER_ERRORS = (ValueError, FileNotFoundError, ImportError)
_OUR_PACKAGES = ("lightning_memcomp", "recipes")
_DETAIL = re.compile(r"not accepted|Unrecognized|unrecognized|Expected|not allowed|invalid|does not|must|No action")


class ShortArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are the message and a pointer to ``--help``, not the usage block
    (the ``memcomp bench``/``compare``/``configs``/``kernels`` parsers; exit status 2 as argparse's)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists the options)\n")


def debug_requested(args: Sequence[str]) -> tuple[list[str], bool]:
    """``args`` without ``--debug``, and whether a traceback was asked for (the flag or ``MEMCOMP_DEBUG``)."""
    rest = [a for a in args if a != "--debug"]
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return rest, len(rest) != len(args) or env not in ("", "0", "false", "no")


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return seen


def _raised_in(err: BaseException, packages: Sequence[str]) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and any(p in Path(frames[-1].filename).parts for p in packages)


def _is_misconfiguration(err: BaseException) -> bool:
    return any(cls.__name__ == "MisconfigurationException" for cls in type(err).__mro__)


def _is_parser_error(err: BaseException) -> bool:
    return isinstance(err, argparse.ArgumentError) or type(err).__module__.startswith("jsonargparse")


def _condense(message: str) -> str:
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if len(lines) <= MAX_MESSAGE_LINES:
        return "\n".join(lines)
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
    expected = [re.sub(r"<class '([\w.]+)'>", r"\1", line.split("Expected a", 1)[1]).strip()
                for line in lines if "Expected a" in line]
    if given is not None and expected:  # a value of the wrong type: say which value and which types
        return f"{lines[0].rstrip(':')}: {given} is not allowed; expected {' or '.join(dict.fromkeys(expected))}"
    details = [line.lstrip("- ") for line in lines[1:] if _DETAIL.search(line)]
    kept = [lines[0], *dict.fromkeys(details)]
    return "\n".join(kept[:MAX_MESSAGE_LINES])


def _accepting(option: str) -> list[str]:
    """Our callbacks that take ``option`` (ActivationCompression also takes its codecs' options)."""
    import lightning_memcomp

    names = ["ActivationCompression", "MemoryMonitor", "BandLimiting", "ConvSliceGeneration", "ActivationCheckpointing"]
    found = []
    for name in names:
        params = set(inspect.signature(getattr(lightning_memcomp, name)).parameters)
        if name == "ActivationCompression":
            import importlib

            from lightning_memcomp.compression.registry import CODECS

            for target in CODECS.values():
                module, _, cls = target.partition(":")
                params |= set(inspect.signature(getattr(importlib.import_module(module), cls)).parameters)
        if option in params:
            found.append(name)
    return found


def callback_option_hint(message: str, args: Sequence[str]) -> str | None:
    """The message for an option that reached a callback which does not take it, or ``None``.

    ``--trainer.callbacks.NAME=VALUE`` always goes to the last callback in the list; when that one does
    not take ``NAME``, say which callback received it, which take it, and how to address the one meant.
    """
    match = re.search(r"class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if match is None:
        return None
    receiver, option = match.group(1).rsplit(".", 1)[-1], match.group(2)
    given = next((a for a in args if re.match(rf"--trainer\.callbacks\.(init_args\.|dict_kwargs\.)?{option}(=|$)", a)),
                 f"--trainer.callbacks.{option}")
    takers = [t for t in _accepting(option) if t != receiver]
    where = f"`{option}` is an option of {' and '.join(takers)}" if takers else f"no callback of ours takes `{option}`"
    fix = ("; to change the technique use --technique (e.g. --technique quant:2), or add the callback right before "
           f"its options: --trainer.callbacks+={takers[0]} {given}") if takers else ""
    return (f"{given} went to {receiver}, the last callback in the list (options given as --trainer.callbacks.NAME "
            f"always go to the last one), and {receiver} takes no `{option}`.\n{where}{fix}")


def short_message(err: BaseException, args: Sequence[str] = ()) -> str | None:
    """The short message for ``err`` when it is a user's mistake, else ``None`` (keep the traceback)."""
    chain = _chain(err)
    parser_errors = [e for e in chain if _is_parser_error(e)]
    for outer in parser_errors:
        hint = callback_option_hint(str(outer), args)
        if hint:
            return hint
    for inner in reversed(chain):  # the innermost cause says what is wrong; wrappers repeat it
        if _raised_in(inner, ("jsonargparse",)):
            continue  # the parser's own attempts; its final error (below) says what failed
        if isinstance(inner, _USER_ERRORS) or _is_misconfiguration(inner) or (
            isinstance(inner, TypeError) and _raised_in(inner, _OUR_PACKAGES)
        ):
            return _condense(str(inner) or type(inner).__name__)
    return _condense(str(parser_errors[0])) if parser_errors else None
