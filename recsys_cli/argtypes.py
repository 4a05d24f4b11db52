"""Argument types and the parser class of the ``recsys`` command line.

Validation happens here, at parse time, before any command imports torch or Bytewax or
reads data: a wrong argument is refused in a fraction of a second, in one line that names
the argument, what it got and what it expects.

>>> positive_int("3")
3
>>> positive_int("0")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: expected a whole number >= 1, got '0'
>>> positive_float("0.5")
0.5
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn


class DefaultsHelp(argparse.HelpFormatter):
    """Help that shows each option's default where its text does not already say it (until
    2026-12-07 only the settings' flags did: ``recsys demo --help`` gave no defaults), and not
    for a default of None or False (an option off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False)
                or action.default is argparse.SUPPRESS):
            return action.help
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose refusals are one line (no usage block), exit status 2:
    ``recsys replay: argument --k: expected ... (see recsys replay --help)``; its help shows the
    options' defaults (:class:`DefaultsHelp`), its subcommands' too."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - ArgumentParser's own
        kwargs.setdefault("formatter_class", DefaultsHelp)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _checked(text: str, parse, ok, expected: str):  # noqa: ANN001 - a parser and a predicate
    """``parse(text)`` if it parses and ``ok`` holds, else one ``expected ..., got ...`` refusal."""
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, partitions, shards, ports of a list)."""
    return _checked(text, int, lambda v: v >= 1, "a whole number >= 1")


def int_from(low: int, high: int):  # noqa: ANN201 - an argparse type
    """A whole number from ``low`` to ``high``: ``type=int_from(1, 64)``.

    >>> int_from(1, 64)("65")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a whole number from 1 to 64, got '65'
    """
    def parse(text: str) -> int:
        return _checked(text, int, lambda v: low <= v <= high, f"a whole number from {low} to {high}")

    return parse


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    return _checked(text, int, lambda v: v >= 0, "a whole number >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (rates, intervals)."""
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0, "a number > 0")


#: The slowest pace a ``--rate`` takes: one record a ~12 days. Slower, the wait before the second
#: record (1 / rate seconds) is longer than ``time.sleep`` can wait (OverflowError at ~1e-9).
SLOWEST_RATE = 1e-6


def per_second(text: str) -> float:
    """Records (or events) per second: a finite number >= :data:`SLOWEST_RATE`.

    >>> per_second("1e-300")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected records per second >= 1e-06 (one a ~12 days), got '1e-300'
    """
    return _checked(text, float, lambda v: math.isfinite(v) and v >= SLOWEST_RATE,
                    f"records per second >= {SLOWEST_RATE:g} (one a ~12 days)")


def share(text: str) -> float:
    """A fraction from 0 to 1."""
    return _checked(text, float, lambda v: 0 <= v <= 1, "a number from 0 to 1")


def tcp_port(text: str) -> int:
    """A TCP port, 1-65535."""
    return _checked(text, int, lambda v: 1 <= v <= 65535, "a port number 1-65535")


def fail(command: str, message: str, status: int = 1) -> NoReturn:
    """Print ``recsys <command>: <message>`` on stderr and exit: the one line an operator reads."""
    print(f"recsys {command}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def check_topic_flag(command: str, topic: str | None) -> None:
    """``--topic`` of ``produce`` and ``tail``: absent (None, the settings' topic) or a name Kafka
    takes; an empty one (an unset shell variable) or another one refused in one line, status 2."""
    from recsys.settings import topic_name_error

    if topic == "":
        fail(command, "--topic is empty (an unset shell variable?); name the topic, or leave the flag out", 2)
    if topic is not None and (wrong := topic_name_error(topic)) is not None:
        fail(command, f"--topic {wrong}", 2)


def settings_or_fail(command: str, args: argparse.Namespace | None = None):  # noqa: ANN201 - Settings, imported here to keep this module light
    """The settings the environment (``RECSYS_*``) and, when given, the parsed setting flags
    give, or one line naming the bad variable or flag."""
    from recsys.settings import Settings, SettingsError, settings_from_args

    try:
        return Settings.from_env(os.environ) if args is None else settings_from_args(args, os.environ)
    except SettingsError as exc:
        fail(command, f"bad setting: {exc}", 2)


def unwritable(path: str) -> str | None:
    """Why this process cannot keep files in directory ``path`` (creating it if missing), or
    None when it can: checked by writing (and removing) a small file there, which is what a
    read-only volume or a directory owned by another user refuses.

    >>> import tempfile; unwritable(tempfile.mkdtemp()) is None
    True
    >>> with tempfile.NamedTemporaryFile() as a_file: unwritable(a_file.name)
    'it is a file, not a directory'
    """
    where = Path(path)
    if where.exists() and not where.is_dir():
        return "it is a file, not a directory"
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".recsys-write-check-"):
            pass
    except OSError as exc:
        elsewhere = exc.filename and Path(exc.filename) != where and not str(exc.filename).startswith(str(where / ".recsys"))
        return f"cannot write there: {exc.strerror or exc}" + (f" ({exc.filename})" if elsewhere else "")
    return None


def require_writable(command: str, dirs: Mapping[str, str | None]) -> None:
    """Refuse in one line, before anything loads, a directory the command would fail to write
    into later (after loading the model, or after a whole backtest): ``dirs`` maps how the
    operator names it (``"--state-dir / RECSYS_STATE_DIR"``) to its path; a None or empty path
    is not used and not checked."""
    for name, path in dirs.items():
        if path and (why := unwritable(path)) is not None:
            user = f" (user id {os.getuid()})" if hasattr(os, "getuid") else ""
            hint = " Is the volume read-only, or owned by another user?" if why.startswith("cannot write") else ""
            fail(command, f"{name} {path}: {why}; give a directory this process{user} can write.{hint}")
