"""Opening the files a shop hands over (event logs, catalogs, query logs): plain, or
compressed as exported logs usually are.

:func:`open_input` reads gzip, bzip2 and xz files as if they were plain, told apart by their
first bytes rather than by their names (a ``.csv`` that is gzip inside, or a ``.gz`` that is
not, reads as what it is), so every reader sees the same lines with the same line numbers. A
compressed file that is damaged or cut short (an interrupted download or copy) raises
:class:`DamagedFileError` naming the file and the line it had reached; a zstd file, which the
standard library cannot read, is refused with how to convert it.

>>> import gzip, os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "events.jsonl.gz")
>>> with gzip.open(path, "wb") as fh:
...     _ = fh.write(b'{"a": 1}\\n{"a": 2}\\n')
>>> compression_of(path)
'gzip'
>>> with open_input(path) as fh:
...     [line.strip() for line in fh]
[b'{"a": 1}', b'{"a": 2}']
>>> with open(path, "r+b") as fh:  # cut short, as an interrupted copy leaves it
...     _ = fh.truncate(20)
>>> with open_input(path) as fh:
...     lines = list(fh)
Traceback (most recent call last):
recsys.files.DamagedFileError: ...events.jsonl.gz: the gzip file is damaged or cut short ... (Compressed file ended before the end-of-stream marker was reached)
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import IO, Any

#: First bytes of each compressed format read here, and of zstd (refused, with a hint).
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)

#: The UTF-8 byte order mark.
BOM = b"\xef\xbb\xbf"

#: File name endings of compressed files (dropped to name a log after its file).
SUFFIXES = (".gz", ".gzip", ".bz2", ".xz", ".zst")

_DECOMPRESSORS: dict[str, Any] = {"gzip": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
                                   "bzip2": lambda raw: bz2.BZ2File(raw, "rb"),
                                   "xz": lambda raw: lzma.LZMAFile(raw, "rb")}


class DamagedFileError(ValueError):
    """A compressed input file that cannot be read to its end."""


def compression_of(path: str | os.PathLike[str]) -> str | None:
    """``"gzip"``, ``"bzip2"``, ``"xz"`` or ``"zstd"`` by the file's first bytes; None: plain."""
    with open(path, "rb") as fh:
        return _kind(fh.read(6))


def _kind(head: bytes) -> str | None:
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), None)


def plain_name(path: str | os.PathLike[str]) -> str:
    """The file's name without a compression suffix: ``events.jsonl.gz`` -> ``events.jsonl``."""
    name = os.path.basename(os.fspath(path))
    return next((name[: -len(s)] for s in SUFFIXES if name.endswith(s) and len(name) > len(s)), name)


def find_file(directory: str | os.PathLike[str], name: str) -> str | None:
    """The path of ``name`` in ``directory``, or of it compressed (``name.gz``, ``.bz2``, ...);
    None when neither is there."""
    for candidate in (name, *(name + suffix for suffix in SUFFIXES)):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


@contextmanager
def open_input(path: str | os.PathLike[str], *, text: bool = False, encoding: str = "utf-8",
               errors: str = "strict", newline: str | None = None) -> Iterator[IO[Any]]:
    """``path`` opened for reading, decompressed if it is gzip, bzip2 or xz (bytes, or text
    with ``text=True`` and the given ``encoding``, ``errors`` and ``newline``). The file is
    opened once and its first bytes looked at without being read, so a pipe (``/dev/stdin``,
    ``<(zcat ...)``) loses nothing. A UTF-8 byte order mark (what Excel and Notepad write first)
    is skipped, so the first line reads as the others."""
    with ExitStack() as stack:
        raw = stack.enter_context(open(path, "rb"))
        kind = _kind(raw.peek(6)[:6])
        if kind == "zstd":
            raise ValueError(f"{path}: a zstd-compressed file, which this reader cannot open; decompress it first "
                             f"(zstd -d {path}) or compress it with gzip instead")
        binary = raw if kind is None else stack.enter_context(_DECOMPRESSORS[kind](raw))
        counted = None
        try:
            if binary.peek(3)[:3] == BOM:
                binary.read(3)
            fh = (stack.enter_context(io.TextIOWrapper(binary, encoding=encoding, errors=errors, newline=newline))
                  if text else binary)
            if kind is not None:
                fh = counted = _Counted(fh)
            yield fh
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            if kind is None or (isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile) and exc.errno is not None):
                raise  # a plain file's, or a disk's error: not the stream's
            raise DamagedFileError(f"{path}: the {kind} file is damaged or cut short after "
                                   f"{counted.read if counted else 0:,} line(s) ({exc})") from None


class _Counted:
    """A decompressing file that counts the lines read from it (for the damage message)."""

    def __init__(self, fh: IO[Any]) -> None:
        self._fh = fh
        self.read = 0

    def __iter__(self) -> Iterator[Any]:
        for line in self._fh:
            self.read += 1
            yield line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)
