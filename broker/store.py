"""What a broker restart must not lose, in SQLite (WAL) under the broker's state dir.

Detached jobs live here from their submission: definition, inputs not yet done, every outcome and log line, their
end. An attached job is written here only when its client is away or far behind (its outbox spills), never while
its client keeps up: the hot path does not touch the disk. Writes are grouped into one transaction per turn of the
broker's loop (commit()); WAL with synchronous=NORMAL survives the process being killed at any point.

Payload frames are kept as one msgpack list per message; what is stored is counted (bytes) against the spool
limit, and a write past it (or a full disk) raises Full instead of filling the disk.
"""

import fcntl
import os
import pathlib
import shutil
import sqlite3
import time

import msgpack

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id BLOB PRIMARY KEY, owner TEXT, detached INTEGER, state TEXT, reason TEXT, created REAL, finished REAL,
    total INTEGER, sealed INTEGER, header BLOB, function BLOB);
CREATE TABLE IF NOT EXISTS inputs (job BLOB, start INTEGER, header BLOB, frames BLOB, PRIMARY KEY (job, start));
CREATE TABLE IF NOT EXISTS outbox (job BLOB, seq INTEGER, command BLOB, header BLOB, frames BLOB,
    PRIMARY KEY (job, seq));
"""
BLOB_MAX = 900 << 20  # SQLite's own limit is 1e9 bytes per value
RESERVE = 64 << 20  # free disk kept (or 5% of a smaller disk): a write that would go below it is refused


class StoreError(Exception):
    """The state dir cannot be used (locked by another broker, corrupt, not writable): said on start."""


class Full(Exception):
    """The spool limit (--spool-gb) or the disk is reached: the write did not happen."""


def pack_frames(frames):
    return msgpack.packb([bytes(f) for f in frames])


class Store:
    def __init__(self, folder, spool_bytes):
        self.folder = pathlib.Path(folder).expanduser()
        self.path = self.folder / "jobs.sqlite3"
        self.spool_bytes = spool_bytes
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.lock = open(self.folder / "jobs.lock", "a")
        except OSError as e:
            raise StoreError(f"cannot use the state dir {self.folder}: {e}") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError(f"another broker is using the state dir {self.folder}") from None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            check = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            self.db.executescript(SCHEMA)
            for path in self.folder.iterdir():  # (private like the keys beside it: inputs and results are users')
                os.chmod(path, 0o600)
            self.bytes = self.count()
        except sqlite3.OperationalError as e:
            raise StoreError(f"cannot open the broker's state {self.path}: {e}") from None
        except sqlite3.DatabaseError as e:
            raise StoreError(f"the broker's state {self.path} is corrupt ({e}): move it (and its -wal file) "
                             "away to start with no jobs, or restore it from a copy") from None
        self.open = False  # a transaction is open
        self.touched = set()  # ids of the jobs this turn's transaction wrote for
        self.rolled_back = False
        self.free, self.free_checked = None, 0.0

    # ------------------------------------------------------------------ writing
    def write(self, sql, args, size=0, job=None):
        """One statement inside this turn's transaction; Full (nothing written) past the spool limit or when the
        disk is (nearly) full."""
        if size and (self.bytes + size > self.spool_bytes or size > BLOB_MAX):
            raise Full(f"the head's spool is full ({self.bytes >> 20} MB of at most {self.spool_bytes >> 20} MB, "
                       "--spool-gb)" if size <= BLOB_MAX else
                       f"a message of {size >> 20} MB is larger than the head keeps on disk ({BLOB_MAX >> 20} MB)")
        if size:
            self.check_disk(size)
        if not self.open:
            self.db.execute("BEGIN")
            self.open = True
        try:
            self.db.execute(sql, args)
        except sqlite3.OperationalError as e:
            if "full" not in str(e):
                raise
            if not self.db.in_transaction:  # SQLite rolled the whole turn back: commit() says so
                self.open, self.rolled_back = False, True
            raise Full(f"the head's disk is full ({e})") from None
        self.bytes += size
        self.touched.add(args[0] if job is None else job)
        if self.free is not None:
            self.free -= size

    def check_disk(self, size):
        """Refuse a write that would leave the disk nearly full (looked at again every second), so that a commit
        seldom meets a full disk."""
        now = time.monotonic()
        if self.free is None or now - self.free_checked > 1.0:
            usage = shutil.disk_usage(self.folder)
            try:  # (SQLite writes over its write-ahead log once it is checkpointed: count it as room)
                wal = os.path.getsize(f"{self.path}-wal")
            except OSError:
                wal = 0
            self.free, self.free_checked = usage.free + wal, now
            self.reserve = min(RESERVE, usage.total // 20)
        if self.free - size < self.reserve:
            raise Full(f"the head's disk is nearly full ({self.free >> 20} MB free in {self.folder})")

    def commit(self):
        """End this turn's transaction; Full if the disk refused it (then the jobs in self.touched lost what this
        turn wrote for them: the caller must end them, never carry on as if it had been kept)."""
        if self.rolled_back:
            self.rolled_back = False
            self.bytes = self.count()
            raise Full("the head's disk is full: what this turn wrote was rolled back")
        if self.open and self.db.in_transaction:
            self.open = False
            try:
                self.db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                if "full" not in str(e):
                    raise
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                self.bytes = self.count()
                raise Full(f"the head's disk is full ({e})") from None
            finally:
                self.free = None

    def checkpoint(self):
        """Fold the write-ahead log into the database and truncate it: after a full disk, or deletions, this is
        what gives the space back."""
        if not self.db.in_transaction:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass
        self.free = None

    def put_job(self, job_id, owner, detached, header, function, created):
        data = pack_frames(function)
        self.write("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, 'running', NULL, ?, NULL, NULL, 0, ?, ?)",
                   (job_id, owner, int(detached), created, msgpack.packb(header), data), len(data))

    def update_job(self, job_id, **fields):
        names = ", ".join(f"{k} = ?" for k in fields)
        self.write(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id), job=job_id)

    def put_input(self, job_id, start, header, frames):
        data = pack_frames(frames)
        self.write("INSERT OR REPLACE INTO inputs VALUES (?, ?, ?, ?)", (job_id, start, msgpack.packb(header), data),
                   len(data))

    def drop_input(self, job_id, start):
        self.forget("inputs", "job = ? AND start = ?", (job_id, start))

    def put_entry(self, job_id, seq, command, header, frames):
        data = pack_frames(frames)
        self.write("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?)",
                   (job_id, seq, command, msgpack.packb(header), data), len(data))

    def drop_entries(self, job_id, upto):
        self.forget("outbox", "job = ? AND seq <= ?", (job_id, upto))

    def drop_job(self, job_id):
        for table, key in (("inputs", "job"), ("outbox", "job"), ("jobs", "id")):
            self.forget(table, f"{key} = ?", (job_id,))

    def forget(self, table, where, args):
        col = "function" if table == "jobs" else "frames"
        freed = self.db.execute(f"SELECT COALESCE(SUM(LENGTH({col})), 0) FROM {table} WHERE {where}", args)
        self.bytes -= freed.fetchone()[0]
        self.write(f"DELETE FROM {table} WHERE {where}", args)

    # ------------------------------------------------------------------ reading
    def count(self):
        return sum(self.db.execute(f"SELECT COALESCE(SUM(LENGTH({col})), 0) FROM {table}").fetchone()[0]
                   for table, col in (("inputs", "frames"), ("outbox", "frames"), ("jobs", "function")))

    def jobs(self):
        rows = self.db.execute("SELECT id, owner, detached, state, reason, created, finished, total, sealed, header "
                               "FROM jobs ORDER BY created")
        for row in rows.fetchall():
            yield dict(zip(("id", "owner", "detached", "state", "reason", "created", "finished", "total", "sealed"),
                           row[:9]), header=msgpack.unpackb(row[9]))

    def function(self, job_id):
        row = self.db.execute("SELECT function FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return msgpack.unpackb(row[0]) if row else []

    def inputs(self, job_id):
        """(start, header) of the job's stored batches, in order; their frames come with input()."""
        rows = self.db.execute("SELECT start, header FROM inputs WHERE job = ? ORDER BY start", (job_id,))
        return [(start, msgpack.unpackb(header)) for start, header in rows.fetchall()]

    def input(self, job_id, start):
        row = self.db.execute("SELECT frames FROM inputs WHERE job = ? AND start = ?", (job_id, start)).fetchone()
        return msgpack.unpackb(row[0]) if row else None

    def entries(self, job_id, first, last, limit=64):
        """Outbox entries first..last (at most limit of them) as (seq, command, header, frames)."""
        rows = self.db.execute("SELECT seq, command, header, frames FROM outbox WHERE job = ? AND seq BETWEEN ? AND ? "
                               "ORDER BY seq LIMIT ?", (job_id, first, last, limit))
        return [(seq, bytes(command), msgpack.unpackb(header, raw=False), msgpack.unpackb(frames))
                for seq, command, header, frames in rows.fetchall()]

    def entry_headers(self, job_id):
        """(seq, command, header) of every entry of the job: what a restarted broker rebuilds its counts from."""
        rows = self.db.execute("SELECT seq, command, header FROM outbox WHERE job = ? ORDER BY seq", (job_id,))
        return [(seq, bytes(command), msgpack.unpackb(header, raw=False)) for seq, command, header in rows]

    def close(self):
        try:
            self.commit()
        finally:
            self.db.close()
            self.lock.close()
