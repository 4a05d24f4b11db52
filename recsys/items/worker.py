"""New item and query text embedded in a process of its own, off the stream's path (``RECSYS_EMBED_WORKER``).

A catalog record that brings text the index has no vector for needs the sentence-transformer:
~12 ms of one core for one short text (compute-bound: the model's matrix products), ~20 ms with
the embedding cache's open and write, and ~3.4 s per 1,000 texts of a bulk import. In the
batch's path that time stalls every event of the batch and queues the ones behind it (in the
live latency benchmark each of its 20 new items held its batch 23-31 ms; a bulk import of 2,000
held the stream's events for 1-2 s at its p99). A thread cannot take it off the path:
the model's Python between its matrix products holds the interpreter, and a thread beside the
batch's own Python finished no sooner (measured: 26.8 ms against 28.9 ms for a batch of 16
events with one new text, more CPU). A process of its own can: it loads the model once, on the
other core, and answers each request with the vectors (the embedding cache is shared as before).

The engine (:class:`recsys.shard.step.Shard`) sends the texts at the batch that decodes their
catalog records and applies those records at the first batch that starts after the answer came
back; see its ``_defer_catalog``. It sends the new queries of a batch's searches the same way,
without the embedding cache (``cached=False``), and answers those searches at the first batch
after their vectors came back; see its ``_queries_off_path``. This module is only the process
and its pipe, in the order requests were sent (one process, so answers come back in that
order). Query requests queued behind one another are answered from one model call: a call costs
about the same for one short text as for several (on one thread it reads the model's ~42 MB of
weights, 6-9 ms), and a worker that fell behind a busy stream catches up instead of answering
each batch late (benchmarks/README.md, "new queries off the batch's path").

A worker that dies (killed, out of memory) is noticed at the next read: :class:`WorkerGone`,
and the engine embeds what was outstanding itself, as before the worker existed.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

import numpy as np


#: Seconds :meth:`EmbeddingWorker.close` waits for the process to finish before killing it.
_CLOSE_WAIT_S = 0.5


class WorkerGone(RuntimeError):
    """The embedding worker process is no longer there (it exited, or was killed)."""


def _serve(inbox: Connection, outbox: Connection, model_name: str, cache_dir: str | None, batch_size: int) -> None:
    """The worker process: one :class:`~recsys.items.embeddings.Embedder` on one thread, each
    request ``(job, texts, cached)`` answered with ``(job, vectors, None)`` or ``(job, None,
    error)``. ``cached`` False (search queries): the same model without the embedding cache, as
    :func:`recsys.search.semantic.query_embedder` calls it in the engine's process."""
    # Ctrl-C, or a SIGTERM to the process group, is for the engine: it stops in order and
    # closes this process (the engine's process gone, the next read here ends it as well)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from recsys.items.embeddings import Embedder

    try:
        embedder = Embedder(model_name, cache_dir, batch_size=batch_size, num_threads=1)
        embedder.warm()
        uncached = Embedder(model_name, None, batch_size=batch_size, num_threads=1)
        uncached._model = embedder._load()  # one model in memory
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        embedder, error = None, f"{type(exc).__name__}: {exc}"
    else:
        error = None
    try:
        outbox.send(("ready", None, error))
    except OSError:  # the engine's process is gone (stopped while this one loaded the model)
        error = error or "gone"
    if error is not None:
        if embedder is not None:
            embedder.close()
        return
    try:
        while True:
            try:
                messages = [inbox.recv()]
                # queries queued behind one another share a model call: a call costs about the same
                # for one short text as for several (reading the model's weights), and a worker that
                # fell behind a busy stream catches up instead of answering each batch late
                while messages[-1] is not None and messages[-1][2] is False and inbox.poll(0):
                    messages.append(inbox.recv())
            except (EOFError, OSError):  # the engine's process is gone
                return
            stop = messages[-1] is None
            if stop:
                messages.pop()
            # in order: the queries drained together in one call, an item's texts (the last one
            # drained, if any) in a call of its own, with the cache
            queries = [m for m in messages if m[2] is False]
            answers = _answer(uncached, queries) if queries else []
            if len(queries) < len(messages):
                answers += _answer(embedder, messages[len(queries):])
            for answer in answers:
                try:
                    outbox.send(answer)
                except OSError:  # the engine's process is gone
                    return
            if stop:
                return
    finally:
        embedder.close()


def _answer(embedder: Any, requests: list[tuple[int, list[str], bool]]) -> list[tuple[int, Any, str | None]]:
    """One model call for the requests' texts together; each request answered with its own rows
    (or every one with the error)."""
    texts = [t for _, request_texts, _ in requests for t in request_texts]
    try:
        vectors = embedder.embed(texts)
    except Exception as exc:  # noqa: BLE001 - the parent reports it and embeds itself
        return [(job, None, f"{type(exc).__name__}: {exc}") for job, _, _ in requests]
    out, at = [], 0
    for job, request_texts, _ in requests:
        out.append((job, vectors[at : at + len(request_texts)], None))
        at += len(request_texts)
    return out


class EmbeddingWorker:
    """A process that embeds texts for the engine, one request at a time, in order.

    ``submit`` sends a request and returns its job number; ``take`` returns one job's answer
    if it has come back (the vectors, or the worker's error as a string), without waiting;
    ``result`` waits for it. Raises :class:`WorkerGone` once the process is gone.
    """

    def __init__(self, model_name: str, cache_dir: str | os.PathLike[str] | None, batch_size: int = 64) -> None:
        # A fresh interpreter (``python -m recsys.items.worker``), not multiprocessing's fork (of
        # a process holding RocksDB handles and threads) or spawn (which imports the caller's
        # main module again: Bytewax's runner, a script). Two pipes carry pickled messages.
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        args = [sys.executable, "-m", "recsys.items.worker", str(to_child_r), str(from_child_w),
                model_name, "" if cache_dir is None else str(cache_dir), str(batch_size)]
        self._process = subprocess.Popen(args, pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._send_conn = Connection(to_child_w, readable=False)
        self._conn = Connection(from_child_r, writable=False)
        # Requests go out through a thread: a send blocks while the pipe is full, and the worker
        # empties it only after writing its last answer, which this process reads between
        # batches. A batch that sent while the worker was writing would wait for ever (found by
        # a bulk import: 32 requests of 64 texts queued faster than the worker embedded them).
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="recsys-embedding-sender", daemon=True)
        self._sender.start()
        self._started = False  # the worker's "ready" answer read
        self._next_job = 0
        self._sent: deque[int] = deque()  # jobs sent, answers not read yet, in order
        self._answers: dict[int, np.ndarray | str] = {}

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def started(self) -> bool:
        """Whether the process has its model loaded (not waited for: a few seconds after start)."""
        if not self._started and self._poll(0):
            self._read()
        return self._started

    @property
    def outstanding(self) -> int:
        """Requests sent whose answers have not been handed out yet."""
        return len(self._sent) + len(self._answers)

    def submit(self, texts: list[str], *, cached: bool = True) -> int:
        """Send ``texts`` to be embedded; returns the job number. ``cached`` False: without the
        embedding cache (search queries: arbitrary text, which must not grow the item cache)."""
        if self._process.poll() is not None:
            raise WorkerGone(f"the embedding worker (pid {self.pid}) is gone: exit code {self._process.returncode}")
        job = self._next_job
        self._next_job += 1
        self._outgoing.put((job, list(texts), cached))
        self._sent.append(job)
        return job

    def _send_loop(self) -> None:
        while True:
            message = self._outgoing.get()
            try:
                self._send_conn.send(message)
            except (OSError, ValueError):  # the worker is gone: the next read says so
                return
            if message is None:
                return

    def take(self, job: int) -> np.ndarray | str | None:
        """Job ``job``'s answer if it is back, else None (every answer already written is read)."""
        while (self._sent or not self._started) and self._poll(0):
            self._read()
        return self._answers.pop(job, None)

    def result(self, job: int, timeout_s: float | None = None) -> np.ndarray | str:
        """Job ``job``'s answer, waiting for it (``TimeoutError`` after ``timeout_s``)."""
        while job not in self._answers:
            if job not in self._sent:
                raise KeyError(f"no embedding job {job} outstanding")
            if not self._poll(timeout_s):
                raise TimeoutError(f"embedding job {job} not answered within {timeout_s} s")
            self._read()
        return self._answers.pop(job)

    def _poll(self, timeout_s: float | None) -> bool:
        try:
            return self._conn.poll(timeout_s)
        except (EOFError, OSError) as exc:
            raise WorkerGone(f"the embedding worker (pid {self.pid}) is gone: {exc}") from exc

    def _read(self) -> None:
        try:
            job, vectors, error = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerGone(f"the embedding worker (pid {self.pid}, exit code {self._process.poll()}) "
                             f"is gone: {type(exc).__name__}") from exc
        if job == "ready":
            self._started = True
            if error is not None:
                raise WorkerGone(f"the embedding worker could not load its model: {error}")
            return
        expected = self._sent.popleft()
        if job != expected:  # one process answering in order: never
            raise WorkerGone(f"the embedding worker answered job {job}, expected {expected}")
        self._answers[job] = vectors if error is None else error

    def close(self) -> None:
        """Stop the process: asked first (it is idle, most of the time), killed if it has not
        finished within half a second (what it was still asked to embed is in the engine's
        state, and the next start embeds it: a bulk import's queue is not worth waiting for;
        the embedding cache is RocksDB, which a kill leaves consistent)."""
        self._outgoing.put(None)
        try:
            self._process.wait(_CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._sender.join(5.0)
        self._send_conn.close()
        self._conn.close()

    def __repr__(self) -> str:
        return f"EmbeddingWorker(pid={self.pid}, outstanding={self.outstanding})"


def main(argv: list[str]) -> None:
    """``python -m recsys.items.worker IN_FD OUT_FD MODEL CACHE_DIR BATCH_SIZE`` (started by
    :class:`EmbeddingWorker`; an empty ``CACHE_DIR``: no cache)."""
    in_fd, out_fd, model_name, cache_dir, batch_size = argv
    _serve(Connection(int(in_fd), writable=False), Connection(int(out_fd), readable=False),
           model_name, cache_dir or None, int(batch_size))


if __name__ == "__main__":
    main(sys.argv[1:])
