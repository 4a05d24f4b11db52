"""The storage contract and its backends: bytes in, bytes out, atomic multi-key writes, ordered
prefix scans.

- :class:`KVStore`: the contract; :class:`MemoryKV` (tests, backtests) and :class:`RocksKV`
  (rocksdict, live) pass one shared test suite.

>>> kv = MemoryKV()
>>> kv.write({b"a:1": b"x", b"a:2": b"y", b"b:1": b"z"})
>>> [k for k, _ in kv.iter_prefix(b"a:")]
[b'a:1', b'a:2']
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Protocol, runtime_checkable


class StoreClosedError(RuntimeError):
    """An operation on a store after ``close()``."""


class StoreOpenError(RuntimeError):
    """The store could not be opened (path unusable, or locked by another process)."""


@runtime_checkable
class KVStore(Protocol):
    """Byte-string key-value store with atomic batched writes and ordered prefix scans.

    ``write`` applies all ``puts`` and then all ``deletes`` atomically: after a crash
    either all of them are visible or none. ``iter_prefix`` yields ``(key, value)`` in
    bytewise key order from a snapshot taken when iteration starts.
    """

    def get(self, key: bytes) -> bytes | None: ...

    def multi_get(self, keys: list[bytes]) -> list[bytes | None]: ...

    def write(self, puts: dict[bytes, bytes], deletes: Iterable[bytes] = ()) -> None: ...

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...

    def iter_from(self, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...

    def close(self) -> None: ...


def _check_bytes(puts: dict[bytes, bytes], deletes: list[bytes]) -> None:
    # Validate the whole batch before touching anything, so a bad entry cannot half-apply it.
    for k, v in puts.items():
        if type(k) is not bytes or type(v) is not bytes:
            raise TypeError(f"KVStore.write: keys and values must be bytes, got {type(k).__name__} -> {type(v).__name__}")
    for k in deletes:
        if type(k) is not bytes:
            raise TypeError(f"KVStore.write: delete keys must be bytes, got {type(k).__name__}")


class MemoryKV:
    """In-memory :class:`KVStore` (tests, benchmarks, replays that need no durability).

    >>> kv = MemoryKV()
    >>> kv.write({b"a:1": b"x", b"b:1": b"y"})
    >>> list(kv.iter_prefix(b"a:")), kv.multi_get([b"b:1", b"zz"])
    ([(b'a:1', b'x')], [b'y', None])
    """

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] | None = {}

    def _live(self) -> dict[bytes, bytes]:
        if self._data is None:
            raise StoreClosedError("MemoryKV is closed")
        return self._data

    def get(self, key: bytes) -> bytes | None:
        return self._live().get(key)

    def multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        data = self._live()
        return [data.get(k) for k in keys]

    def write(self, puts: dict[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        data = self._live()
        deletes = list(deletes)
        _check_bytes(puts, deletes)
        # Right-sized copies: orjson (3.12 on) returns bytes whose buffer is over-allocated to at
        # least 4 KiB and never shrunk, and a store keeps what it is given, so a replay holding
        # every user record, catalog item and signal list in memory used ~4 KiB per record
        # (62 MiB of DIGINETICA's catalog items per shard engine; the 64-shard replay ran out of
        # memory). RocksKV copies into RocksDB anyway. ``bytes(memoryview(v))`` is one exact copy.
        data.update({k: bytes(memoryview(v)) for k, v in puts.items()})
        for k in deletes:
            data.pop(k, None)

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        data = self._live()
        snapshot = sorted((k, v) for k, v in data.items() if k.startswith(prefix))
        return iter(snapshot)

    def iter_from(self, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Like ``iter_prefix(prefix)``, from the first key >= ``start`` (a resumable scan)."""
        data = self._live()
        snapshot = sorted((k, v) for k, v in data.items() if k.startswith(prefix) and k >= start)
        return iter(snapshot)

    def close(self) -> None:
        self._data = None


class StoreWriteError(RuntimeError):
    """RocksDB could not write (a full disk, a read-only or failing device); the message is
    RocksDB's, which names the file, after the store's path. Nothing of that write is applied."""


class StoreCorruptionError(RuntimeError):
    """RocksDB found damaged data (a block checksum mismatch, a truncated file); the message
    is RocksDB's, which names the file (e.g. ``.../000009.sst offset 426874``)."""


class RocksKV:
    """:class:`KVStore` on RocksDB through rocksdict, in raw-bytes mode.

    Every ``write`` is one ``WriteBatch`` through the write-ahead log, so once it returns
    the data survives the process being killed (SIGKILL). ``sync=True`` also fsyncs the
    log on each write, for durability across power loss, at a large cost per write.

    Corruption is never read past silently: the database is opened with paranoid checks,
    every read verifies block checksums, a scan checks the iterator's status when it ends
    (rocksdict's own ``items()`` just stops at a bad block), and ``verify=True`` (the
    default) reads every block once at open, so a damaged file stops the process at start-up
    with :class:`StoreCorruptionError` naming the file (cost: one sequential read of the
    database, ~1 s per few hundred MB).

    >>> import tempfile
    >>> kv = RocksKV(tempfile.mkdtemp() + "/db")
    >>> kv.write({b"k": b"v"}); kv.get(b"k")
    b'v'
    >>> kv.close()
    """

    def __init__(self, path: str | os.PathLike[str], *, sync: bool = False, verify: bool = True) -> None:
        from rocksdict import Options, Rdict, ReadOptions, WriteOptions  # noqa: PLC0415 - keep import cost off MemoryKV users

        self.path = os.fspath(path)
        self._write_failed = False  # a write raised StoreWriteError (close then expects RocksDB to refuse too)
        options = Options(raw_mode=True)
        options.set_paranoid_checks(True)  # refuse to open on a damaged MANIFEST / WAL / file list
        options.set_keep_log_file_num(5)  # RocksDB's info logs (one more per open): not for ever
        try:
            self._db: Rdict | None = Rdict(self.path, options=options)
        except Exception as exc:  # rocksdict raises bare Exception for IO/lock errors
            if "orruption" in str(exc):
                raise StoreCorruptionError(f"RocksDB at {self.path!r} is corrupted: {exc}") from exc
            raise StoreOpenError(f"cannot open RocksDB at {self.path!r}: {exc}") from exc
        self._read_opts = ReadOptions()
        self._read_opts.set_verify_checksums(True)
        self._db.set_read_options(self._read_opts)
        self._write_opts = WriteOptions()
        self._write_opts.sync = sync
        self._write_opts.disable_wal = False  # the WAL is what makes a returned write survive a kill
        if verify:
            try:
                self.verify()
            except BaseException:
                self.close()
                raise

    def _live(self):  # noqa: ANN202 - rocksdict.Rdict
        if self._db is None:
            raise StoreClosedError(f"RocksKV at {self.path!r} is closed")
        return self._db

    def _reraise(self, exc: Exception) -> None:
        if "orruption" in str(exc) or "hecksum" in str(exc):
            raise StoreCorruptionError(f"RocksDB at {self.path!r} is corrupted: {exc}") from exc
        raise exc

    def size_report(self) -> dict[str, int]:
        """RocksDB's own size figures, in bytes: ``live_data`` (its estimate of the data a full
        compaction would keep) and ``sst_files`` (what the table files hold now, obsolete
        versions and tombstones included). Disk above the first is space RocksDB reclaims as it
        compacts; the long-run benchmark prints both to tell growth from compaction lag."""
        db = self._live()
        return {"live_data": int(db.property_int_value("rocksdb.estimate-live-data-size") or 0),
                "sst_files": int(db.property_int_value("rocksdb.total-sst-files-size") or 0)}

    def compact(self) -> None:
        """Compact the whole key range now (RocksDB does this gradually on its own)."""
        self._live().compact_range(None, None)

    def verify(self) -> int:
        """Read every key and value once, checking block checksums; returns the key count.
        Raises :class:`StoreCorruptionError` naming the damaged file."""
        return sum(1 for _ in self.iter_prefix(b""))

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._live().get(key)
        except Exception as exc:  # noqa: BLE001 - rocksdict raises bare Exception
            self._reraise(exc)
            raise

    def multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            return self._live().get(list(keys))
        except Exception as exc:  # noqa: BLE001
            self._reraise(exc)
            raise

    def write(self, puts: dict[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        from rocksdict import WriteBatch  # noqa: PLC0415

        db = self._live()
        deletes = list(deletes)
        _check_bytes(puts, deletes)
        if not puts and not deletes:
            return
        batch = WriteBatch(raw_mode=True)
        for k, v in puts.items():
            batch.put(k, v)
        for k in deletes:
            batch.delete(k)
        try:
            db.write(batch, self._write_opts)
        except Exception as exc:  # noqa: BLE001 - rocksdict raises bare Exception
            self._write_failed = True
            raise StoreWriteError(f"cannot write the state store at {self.path!r}: {exc}") from exc

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        it = self._live().iter(self._read_opts)
        it.seek(prefix)
        return self._scan(it, prefix)

    def _scan(self, it, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:  # noqa: ANN001 - rocksdict.RdictIter
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                return
            yield key, it.value()
            it.next()
        # an iterator also becomes invalid on an error: only status() tells a bad block from the end
        try:
            it.status()
        except Exception as exc:  # noqa: BLE001
            self._reraise(exc)

    def iter_from(self, start: bytes, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Like ``iter_prefix(prefix)``, from the first key >= ``start`` (a resumable scan)."""
        it = self._live().iter(self._read_opts)
        it.seek(max(start, prefix))
        return self._scan(it, prefix)  # checked like iter_prefix: a bad block is an error, not the end

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.close()  # flushes memtables; dropping the last reference releases the lock
            except Exception as exc:  # noqa: BLE001 - rocksdict raises bare Exception
                if not self._write_failed:
                    raise StoreWriteError(f"cannot close the state store at {self.path!r}: {exc}") from exc
                # a write failed already (reported): RocksDB refuses the flush for the same cause
                # ("Writer has previous error"); every committed write is in its log
            finally:
                del db
