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
import lzma
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

#: First bytes of each compressed format read here, and of zstd (refused, with a hint).
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)

#: File name endings of compressed files (dropped to name a log after its file).
SUFFIXES = (".gz", ".gzip", ".bz2", ".xz", ".zst")

_OPENERS: dict[str, Any] = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}


class DamagedFileError(ValueError):
    """A compressed input file that cannot be read to its end."""


def compression_of(path: str | os.PathLike[str]) -> str | None:
    """``"gzip"``, ``"bzip2"``, ``"xz"`` or ``"zstd"`` by the file's first bytes; None: plain."""
    with open(path, "rb") as fh:
        head = fh.read(6)
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
    with ``text=True`` and the given ``encoding``, ``errors`` and ``newline``)."""
    kind = compression_of(path)
    if kind == "zstd":
        raise ValueError(f"{path}: a zstd-compressed file, which this reader cannot open; decompress it first "
                         f"(zstd -d {path}) or compress it with gzip instead")
    if kind is None:
        with open(path, "r" if text else "rb", **({"encoding": encoding, "errors": errors, "newline": newline} if text else {})) as fh:
            yield fh
        return
    opener = _OPENERS[kind]
    with opener(path, "rt" if text else "rb", **({"encoding": encoding, "errors": errors, "newline": newline} if text else {})) as fh:
        lines = _Counted(fh)
        try:
            yield lines
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile) and exc.errno is not None:
                raise  # a disk's error, not the stream's
            raise DamagedFileError(f"{path}: the {kind} file is damaged or cut short after {lines.read:,} line(s) "
                                   f"({exc})") from None


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
