"""The LMDB environment of one store: opening, transactions, map growth.

Any number of processes may open a store for writing: LMDB serializes write transactions
across processes with its own robust mutex (a writer killed mid-transaction releases it and
its transaction is simply never committed), and readers never wait. A process opens one
store path once (LMDB's file locks are per process); threads share that ChunkStore.

Transactions run through :meth:`Env.write` / :meth:`Env.read`, which count the ones in
flight: LMDB allows changing the map size only while no transaction of this process is
open, so growing the map (writer) or adopting the writer's bigger map (reader) waits for
in-flight transactions of other threads and holds new ones back meanwhile. That makes a
ChunkStore safe to share between threads of one process (e.g. a prefetch thread reading
while the scheduler writes).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import lmdb

from .errors import StoreError, StoreFull

logger = logging.getLogger(__name__)

DB_NAMES = ("meta", "headers", "kv", "summaries", "lru", "children", "contexts", "used",
            "packs", "pack_of")
_MIN_MAP = 1 << 20


class Env:
    def __init__(self, path: str, readonly: bool, initial_map_size: int) -> None:
        self.path = path
        self.readonly = readonly
        self.max_map_size = 0  # set by the store once the capacity is known
        self._pid = os.getpid()
        self._cv = threading.Condition()
        self._active = 0  # transactions in flight in this process
        self._resizing = False
        data_file = os.path.join(path, "data.mdb")
        exists = os.path.exists(data_file)
        if readonly and not exists:
            raise StoreError(f"no chunk store at {path}")
        if not readonly:
            os.makedirs(path, exist_ok=True)
        file_size = os.path.getsize(data_file) if exists else 0
        # A reader maps what exists and follows the writer's growth (MapResizedError). A
        # writer maps twice what exists (address space only: the file grows as pages are
        # written). Mapped at the file's size, a reopened store's first write that needed
        # a new page grew the map, and the resize waits for every transaction in flight
        # and holds new ones back: a read beside that write stalled 44 ms (median of 5,
        # against 2.4 ms now; 430 MiB store, CI machine, bench_reopen_write.py). Growth
        # past that doubles the map again (`_grow`).
        size = max(_MIN_MAP, file_size if readonly else max(initial_map_size, 2 * file_size))
        try:
            self.env = lmdb.open(
                path, map_size=size, max_dbs=len(DB_NAMES), readonly=readonly, lock=True,
                readahead=False, max_readers=512, subdir=True,
            )
            # Reader slots of processes that died (SIGKILL) pin old pages; free them.
            self.env.reader_check()
            self.dbs = self._open_dbs()
        except lmdb.Error as e:
            self.close()
            if "already open in this process" in str(e):
                raise StoreError(
                    f"chunk store at {path} is already open in this process; share that "
                    "ChunkStore between threads instead of opening it twice"
                ) from None
            raise
        except BaseException:
            self.close()
            raise

    def _open_dbs(self) -> list:
        # open_db runs its own transaction, which another process growing the map
        # between our open and this call turns into MapResizedError: adopt, retry.
        for _ in range(8):
            try:
                return [self._open_db(n) for n in DB_NAMES]
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # no transaction of ours is open yet
        raise StoreError(f"map of {self.path} keeps changing size while opening it")

    def _open_db(self, name: str):
        try:
            return self.env.open_db(name.encode(), create=not self.readonly)
        except lmdb.NotFoundError:  # readonly, a store of another format: its version says
            return None

    def check(self, write: bool) -> None:
        if getattr(self, "env", None) is None:
            raise StoreError("chunk store is closed")
        if os.getpid() != self._pid:
            raise StoreError("ChunkStore used in a forked child; open the store after fork")
        if write and self.readonly:
            raise StoreError("chunk store opened readonly")

    def _run(self, fn: Callable[[Any], Any], write: bool) -> Any:
        with self._cv:
            while self._resizing:
                self._cv.wait()
            self._active += 1
        try:
            with self.env.begin(write=write, buffers=not write) as txn:
                return fn(txn)
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()

    def _set_mapsize(self, size: int) -> None:
        with self._cv:
            if self._resizing:  # another thread is at it already: wait for it, done
                while self._resizing:
                    self._cv.wait()
                return
            self._resizing = True
            try:
                while self._active:
                    self._cv.wait()
                self.env.set_mapsize(size)
            finally:
                self._resizing = False
                self._cv.notify_all()

    def write(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(txn) in one write transaction (committed unless fn raises); on
        MapFullError the transaction is aborted, the map doubled and fn run again; when
        another process grew the map past ours (MapResizedError), ours adopts its size."""
        self.check(write=True)
        resized = 0
        while True:
            try:
                return self._run(fn, write=True)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                resized += 1
                if resized > 8:
                    raise StoreError(
                        f"map of {self.path} keeps changing size under the writer") from None
                self._set_mapsize(0)

    def read(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(txn) in one short read transaction; buffers must not escape fn."""
        self.check(write=False)
        for _ in range(8):
            try:
                return self._run(fn, write=False)
            except lmdb.MapResizedError:
                self._set_mapsize(0)  # the writer grew the map: adopt its size
        raise StoreError(f"map of {self.path} keeps changing size under the reader")

    def _grow(self) -> None:
        self.env.reader_check()  # a dead process's stale read slot may be what pins pages
        cur = self.env.info()["map_size"]
        if cur >= self.max_map_size:
            raise StoreFull(
                f"LMDB map of {self.path} is at its ceiling ({cur} bytes = 2 x capacity + "
                "headroom); raise capacity_bytes or evict"
            )
        new = min(self.max_map_size, cur * 2)
        logger.info("growing LMDB map of %s from %d to %d bytes", self.path, cur, new)
        self._set_mapsize(new)

    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def close(self) -> None:
        env = getattr(self, "env", None)
        if env is not None and os.getpid() == self._pid:
            env.close()
        self.env = None
