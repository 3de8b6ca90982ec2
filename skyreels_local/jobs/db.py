"""The job database: one SQLite file (WAL), its bounded connection pool, write transactions and
schema migrations, with one table object per table (`db.predictions`, `db.workers`, ...).

One database file under the data directory is shared by the HTTP process (submit, poll, cancel,
webhook delivery) and the worker processes (claim, progress, finish). WAL mode lets polls read
while a worker commits, so the API answers in milliseconds however busy the GPU is. Every state
change is one conditional UPDATE (or one short `BEGIN IMMEDIATE` transaction), so two processes
can never both move the same job. An operation that spans tables (a finished job and its webhook)
runs in one transaction: the table that owns it passes its connection to the others' helpers.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import DiskFullError, is_disk_full
from .counters import CountersTable
from .migrations import MIGRATIONS, Migration
from .predictions import PredictionsTable
from .secrets import SecretsTable
from .uploads import UploadsTable
from .webhooks import WebhooksTable
from .workers import WorkersTable

log = logging.getLogger(__name__)


class _ClosingConnection:
    """Holds a thread's own connection in its threading.local: when the thread ends, CPython
    drops this holder at once (it is in no reference cycle) and the connection is closed, instead
    of waiting for the garbage collector (sqlite3 connections sit in cycles)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


# Connections one database opens at most (about 2 file descriptors each in WAL mode, plus one
# shared -shm). Polls take well under a millisecond of database time, so a burst of 40 threads
# queues for a few milliseconds at most. A hard cap, not just a cap on idle ones: SQLite keeps
# the descriptor of a connection closed while another one holds a lock on the file open for
# later reuse, so opening extra connections during bursts would leave their descriptors behind.
POOL_SIZE = 8
# Longer than this waiting for a pooled connection (only if something holds them all, e.g. the
# table is locked by a stuck writer): open an extra one rather than fail the request.
POOL_WAIT_S = 30.0


class Database:
    """All access to the SQLite file. A small pool of connections shared by threads; safe across
    processes. Opening it upgrades an older file to the latest schema (see migrations.py)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._slots = threading.BoundedSemaphore(POOL_SIZE)
        self._closed = False
        self.migrate()
        self.predictions = PredictionsTable(self)
        self.workers = WorkersTable(self)
        self.webhooks = WebhooksTable(self)
        self.uploads = UploadsTable(self)
        self.secrets = SecretsTable(self)
        self.counters = CountersTable(self)

    # --- schema ------------------------------------------------------------------------------

    def migrate(self, migrations: Sequence[Migration] | None = None) -> int:
        """Apply the pending migrations (migrations.MIGRATIONS), each in its own write transaction
        with the version it reaches; returns the file's version. The version is read again inside
        each transaction, so two processes opening an old file at once apply each one once."""
        migrations = MIGRATIONS if migrations is None else migrations
        latest = migrations[-1].version
        while True:
            with self.write() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > latest:
                    raise RuntimeError(
                        f"{self.path} was written by a newer skyreels-local (schema {version} > {latest})"
                    )
                pending = [m for m in migrations if m.version > version]
                if not pending:
                    return version
                migration = pending[0]
                log.info(
                    "job table %s: migration %d (%s)", self.path, migration.version, migration.description
                )
                migration.apply(conn)
                conn.execute(f"PRAGMA user_version = {int(migration.version)}")

    def schema_version(self) -> int:
        return self.row("PRAGMA user_version")[0]

    # --- connections -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves; timeout is SQLite's busy wait.
        # check_same_thread=False: a pooled connection serves one thread at a time, any thread.
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: an accepted job survives a power cut, not only a crash; the cost is one fsync
        # per commit, negligible next to a generation.
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for one operation, borrowed from a small pool and given back after it.

        Why a pool and not one connection per thread: the HTTP process runs sync routes on a
        threadpool of up to 40 threads that come and go; a connection per thread held its file
        descriptors (db, -wal, -shm) until the garbage collector found it, so polling bursts
        piled up ~120 descriptors. Here at most POOL_SIZE connections exist; a thread that finds
        them all busy waits for one. Nested use on one thread (a read inside a write) gets the
        same connection, so nesting never waits on itself."""
        held = getattr(self._local, "borrowed", None)
        if held is not None:
            yield held
            return
        pooled = self._slots.acquire(timeout=POOL_WAIT_S)
        if not pooled:
            log.warning(
                "job table: all %d connections busy for %gs; opening an extra one", POOL_SIZE, POOL_WAIT_S
            )
        try:
            conn = self._take_idle() if pooled else None
            conn = conn or self._open()
        except BaseException:
            if pooled:
                self._slots.release()
            raise
        self._local.borrowed = conn
        try:
            yield conn
        finally:
            self._local.borrowed = None
            self._give_back(conn, pooled)

    def _take_idle(self) -> sqlite3.Connection | None:
        with self._pool_lock:
            return self._idle.pop() if self._idle else None

    def _give_back(self, conn: sqlite3.Connection, pooled: bool) -> None:
        if conn.in_transaction:  # never hand on a connection stuck in a transaction
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        with self._pool_lock:
            keep = pooled and not self._closed
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        if pooled:
            self._slots.release()

    def row(self, sql: str, args: tuple | list = ()) -> sqlite3.Row | None:
        with self.connection() as conn:
            return conn.execute(sql, args).fetchone()

    def rows(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        with self.connection() as conn:
            return conn.execute(sql, args).fetchall()

    def execute(self, sql: str, args: tuple | list = ()) -> None:
        """One statement in autocommit mode (a single-row UPDATE needs no BEGIN IMMEDIATE)."""
        with self.connection() as conn:
            conn.execute(sql, args)

    def _conn(self) -> sqlite3.Connection:
        """A connection owned by the calling thread until it ends (then closed at once, not by
        the garbage collector). For tests and one-off scripts; the tables use `connection()`,
        which keeps the number of open connections bounded."""
        held = getattr(self._local, "borrowed", None)
        if held is not None:
            return held
        owned = getattr(self._local, "owned", None)
        if owned is None:
            owned = self._local.owned = _ClosingConnection(self._open())
        return owned.conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no deadlock on upgrade).

        A failed statement or COMMIT leaves the table as it was: SQLite rolls back by itself on
        some errors (SQLITE_FULL, IOERR), so ROLLBACK is sent only while a transaction is still
        open; otherwise this thread's connection would be stuck inside a dead transaction. A full
        disk is raised as DiskFullError (a clear 503 / failed job, not an internal error)."""
        with self.connection() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                if is_disk_full(exc):
                    log.error("job table %s: %s", self.path, exc)
                    raise DiskFullError(
                        "the server's disk is full, so the job table cannot be written; retry once space is freed"
                    ) from exc
                raise

    def close(self) -> None:
        """Close the pooled connections (and this thread's own one, if it made one)."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        owned = getattr(self._local, "owned", None)
        if owned is not None:
            owned.conn.close()
            self._local.owned = None
