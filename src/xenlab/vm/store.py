"""The toolstack's state, domains and snapshots in SQLite with per-domain locks: :class:`Store`.

One database file, ``<state_dir>/xenlab.db``, in WAL mode with
``synchronous=FULL``: every write is one ``BEGIN IMMEDIATE`` transaction, so
a process killed mid-write leaves the database as it was before that write.

Design:
    - Domain ids are the smallest free id >= 1 (as ``xl`` hands them out),
      picked and inserted in one transaction, under the global lock.
    - Locks are ``flock`` on files in ``<state_dir>/locks/``: the kernel drops
      them when a holder dies, so a killed command never leaves a domain
      locked.  They are re-entrant within one :class:`Store` (a verb that
      holds a domain's lock may call another that takes it).  Lock files are
      never deleted: unlinking a lock file lets two holders lock different
      inodes.
    - The schema is versioned (table ``schema_version``); :data:`_MIGRATIONS`
      lists the steps from each version to the next, applied on open (a
      database of a newer xenlab is refused).  Version 2 records which
      backend runs each domain; tests/vm/data/store-v1.db, written by the
      release before it, must keep reading.
    - A record can outlive its QEMU (killed, host rebooted): :func:`is_alive`
      checks the pid *and* that the process is QEMU running that domain, so
      a recycled pid is not mistaken for it.
    - State is private: the state directory is 0700 (an existing one is
      tightened; one owned by another user is refused), the database and
      lock files 0600.  Lock files are opened without following symlinks.
    - Writers change only what they mean to: :meth:`Store.patch` rewrites
      the named fields and ``extra`` keys of the row as it is *now*, inside
      one transaction, so two verbs never undo each other's fields.
    - SQLite's own failures (a full disk, an I/O error, a locked or corrupt
      file) are :class:`StoreError`, a StateError naming the database.

Defaults (with reasons):
    - State dir: ``$XENLAB_STATE_DIR``, else ``$XDG_STATE_HOME/xenlab``, else
      ``~/.local/state/xenlab`` (XDG's place for state that survives reboots).
    - Lock timeout 10 s: long enough to wait out another quick verb, short
      enough that a stuck one is reported instead of hanging the shell.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from xenlab import files
from xenlab.errors import ConflictError, NotFoundError, StateError, UsageError

__all__ = [
    "DomainRecord",
    "SnapshotKind",
    "SnapshotNode",
    "SnapshotRecord",
    "SnapshotState",
    "Store",
    "StoreError",
    "default_state_dir",
    "effective_state",
    "is_alive",
    "is_domain_qemu",
    "private_dir",
    "qemu_opts",
]

DB_NAME = "xenlab.db"
LOCK_TIMEOUT = 10.0
STALE = "stale (QEMU gone)"



def _owner() -> object:
    """Who holds a lock: the running asyncio task, else this thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return task if task is not None else threading.get_ident()

class StoreError(StateError):
    """SQLite could not read or write the state store (full disk, I/O error, corrupt file).

    ``path`` is the database; ``detail`` SQLite's own words.
    """

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        hint = ""
        low = detail.lower()
        if "full" in low or "i/o" in low or "readonly" in low or "read-only" in low:
            hint = " (is the file system full or read-only?)"
        super().__init__(f"state store {path}: {detail}{hint}")


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _sql_errors(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Turn SQLite's exceptions raised by a Store method into :class:`StoreError`."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except sqlite3.Error as err:
            store = args[0]
            assert isinstance(store, Store)
            raise StoreError(store.path, str(err)) from err
        except UnicodeEncodeError as err:
            # SQLite keeps text as UTF-8: a name or path holding bytes that are
            # not (kept as lone surrogates) cannot be stored or looked up.
            near = err.object[max(0, err.start - 30):err.end + 30]
            shown = near.encode("utf-8", "surrogateescape")
            raise UsageError(f"not UTF-8 text, at {shown!r}: names, paths and configs the "
                             "toolstack keeps must be UTF-8") from None

    return wrapper


def private_dir(path: Path, *, create: bool = True) -> Path:
    """:func:`xenlab.files.private_dir`, refusing with :class:`StateError`."""
    return files.private_dir(path, create=create, error=StateError)


def default_state_dir() -> Path:
    """``$XENLAB_STATE_DIR``, else ``$XDG_STATE_HOME/xenlab``, else ``~/.local/state/xenlab``."""
    env = os.environ.get("XENLAB_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "xenlab"
    return Path.home() / ".local" / "state" / "xenlab"


@dataclass(frozen=True, slots=True)
class DomainRecord:
    """One domain as the store knows it; ``domid`` 0 means "not stored yet"."""

    domid: int
    name: str
    uuid: str
    config_path: str
    config_text: str
    rundir: str
    pid: int | None
    state: str
    created: float
    accel: str
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # The vm.backend.Backend that runs the domain ("qemu", "xen"); fixed for the
    # record's life.  Records from before schema version 2 are QEMU's.
    backend: str = "qemu"


class SnapshotKind(Enum):
    """Where a snapshot's data lives."""

    INTERNAL = "internal"  # inside the qcow2 images (savevm)
    EXTERNAL = "external"  # overlay files plus a memory file
    DISK_ONLY = "disk-only"  # overlay files, no memory


class SnapshotState(Enum):
    """A snapshot's life: being made, usable, being removed, or left half-done."""

    CREATING = "creating"
    READY = "ready"
    DELETING = "deleting"
    BROKEN = "broken"


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """One snapshot; ``id`` 0 means "not stored yet"; ``parent`` is a snapshot id.

    ``disks`` is one JSON-ready mapping per disk (device, file, format...),
    as the snapshot code records them.
    """

    id: int
    domid: int
    name: str
    parent: int | None
    created: float
    kind: SnapshotKind
    description: str = ""
    disks: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)
    memory_path: str | None = None
    state: SnapshotState = SnapshotState.CREATING


@dataclass(frozen=True, slots=True)
class SnapshotNode:
    """A snapshot and the snapshots taken from it, oldest first."""

    snapshot: SnapshotRecord
    children: tuple[SnapshotNode, ...]


# Each entry takes the schema from version i to i+1.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE domains (
            domid INTEGER PRIMARY KEY CHECK (domid >= 1),
            name TEXT NOT NULL UNIQUE,
            uuid TEXT NOT NULL,
            config_path TEXT NOT NULL,
            config_text TEXT NOT NULL,
            rundir TEXT NOT NULL,
            pid INTEGER,
            state TEXT NOT NULL,
            created REAL NOT NULL,
            accel TEXT NOT NULL,
            extra TEXT NOT NULL DEFAULT '{}'
        )""",
        """CREATE TABLE snapshots (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            domid INTEGER NOT NULL REFERENCES domains(domid) ON DELETE CASCADE,
            name TEXT NOT NULL,
            parent INTEGER REFERENCES snapshots(id),
            created REAL NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('internal', 'external', 'disk-only')),
            description TEXT NOT NULL DEFAULT '',
            disks TEXT NOT NULL DEFAULT '[]',
            memory_path TEXT,
            state TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'deleting', 'broken')),
            UNIQUE (domid, name)
        )""",
        "CREATE INDEX snapshots_parent ON snapshots(parent)",
    ),
    # 2: which backend runs each domain (vm.backend); every earlier record is QEMU's.
    ("ALTER TABLE domains ADD COLUMN backend TEXT NOT NULL DEFAULT 'qemu'",),
)
SCHEMA_VERSION = len(_MIGRATIONS)
# DomainRecord fields Store.patch may change (not domid; extra through its own arguments).
_PATCHABLE = frozenset({"name", "uuid", "config_path", "config_text", "rundir", "pid",
                        "state", "created", "accel"})


class Store:
    """The state store at ``state_dir`` (see :func:`default_state_dir`).

    :raise StateError: when the database was written by a newer xenlab.
    """

    def __init__(self, state_dir: Path | None = None, *, lock_timeout: float = LOCK_TIMEOUT):
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.lock_timeout = lock_timeout
        private_dir(self.state_dir)
        private_dir(self.state_dir / "locks")
        self.path = self.state_dir / DB_NAME
        # (lock name, owner) -> (fd, depth); the owner is the asyncio task, or the thread
        # outside a loop: re-entrant for its owner only (two tasks of one process are two
        # holders, and flock on two descriptors keeps them apart).
        self._held: dict[tuple[str, object], tuple[int, int]] = {}
        # The database and its -wal/-shm files are made by SQLite with the
        # process umask: make them 0600 from the start, and tighten old ones.
        old = os.umask(0o077)
        try:
            # isolation_level=None: no implicit transactions; _tx() says BEGIN.
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as err:
            raise StoreError(self.path, str(err)) from err
        finally:
            os.umask(old)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                f = Path(f"{self.path}{suffix}")
                if f.stat().st_mode & 0o077:
                    f.chmod(0o600)

    # --- plumbing ---

    def close(self) -> None:
        """Close the database; held locks are released."""
        self._db.close()
        for fd, _ in self._held.values():
            os.close(fd)
        self._held.clear()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so two writers never both
        # read and then collide on upgrade.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (disk full) leaves the transaction open; a
            # ROLLBACK that fails too must not hide the first error.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (0)")
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path}: schema version {version} is newer than this xenlab "
                    f"knows ({SCHEMA_VERSION}); upgrade xenlab"
                )
            for steps in _MIGRATIONS[version:]:
                for sql in steps:
                    db.execute(sql)
            db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @property
    @_sql_errors
    def schema_version(self) -> int:
        """The schema version of the open database."""
        return int(self._db.execute("SELECT version FROM schema_version").fetchone()[0])

    @_sql_errors
    def check(self) -> list[str]:
        """SQLite's integrity and foreign-key checks; an empty list when all is well."""
        problems = [
            str(r[0]) for r in self._db.execute("PRAGMA integrity_check") if r[0] != "ok"
        ]
        problems += [
            f"{r[0]} row {r[1]} refers to missing {r[2]}"
            for r in self._db.execute("PRAGMA foreign_key_check")
        ]
        return problems

    # --- locks ---

    def _open_lock(self, name: str) -> int:
        try:
            return os.open(self.state_dir / "locks" / f"{name}.lock",
                           os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StateError(f"{self.state_dir / 'locks' / name}.lock: cannot open: "
                             f"{err.strerror or err}") from err

    @staticmethod
    def _try(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _waits(self, fd: int, what: str, bound: float) -> Iterator[float]:
        """The pauses between tries for the flock on ``fd`` (the caller sleeps them, on
        the loop or not), ending when it is taken; StateError after ``bound`` seconds."""
        deadline = time.monotonic() + bound
        delay = 0.005
        while not self._try(fd):
            if time.monotonic() >= deadline:
                raise StateError(f"{what} is busy: another xenlab command holds its lock "
                                 f"(waited {bound:g}s)")
            yield min(delay, max(0.0, deadline - time.monotonic()))
            delay = min(delay * 2, 0.1)

    @contextlib.contextmanager
    def _holding(self, key: tuple[str, object], fd: int) -> Iterator[None]:
        self._held[key] = (fd, 1)
        try:
            yield
        finally:
            # nested holders have exited by now; closing drops the flock
            os.close(self._held.pop(key)[0])

    @contextlib.contextmanager
    def _again(self, key: tuple[str, object]) -> Iterator[None]:
        fd, depth = self._held[key]
        self._held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = self._held[key]
            self._held[key] = (fd, depth - 1)

    @contextlib.contextmanager
    def _flock(self, name: str, what: str, timeout: float | None) -> Iterator[None]:
        key = (name, _owner())
        if key in self._held:
            with self._again(key):
                yield
            return
        bound = self.lock_timeout if timeout is None else timeout
        fd = self._open_lock(name)
        try:
            for pause in self._waits(fd, what, bound):
                time.sleep(pause)
        except BaseException:
            os.close(fd)
            raise
        with self._holding(key, fd):
            yield

    @contextlib.asynccontextmanager
    async def _aflock(self, name: str, what: str, timeout: float | None) -> AsyncIterator[None]:
        """:meth:`_flock` for async verbs: the wait yields to the loop, so a Ctrl-C (a
        cancel) ends it at once instead of after the lock is taken."""
        key = (name, _owner())
        if key in self._held:
            with self._again(key):
                yield
            return
        bound = self.lock_timeout if timeout is None else timeout
        fd = self._open_lock(name)
        try:
            for pause in self._waits(fd, what, bound):
                await asyncio.sleep(pause)
        except BaseException:
            os.close(fd)
            raise
        with self._holding(key, fd):
            yield

    def lock(
        self, domid: int, timeout: float | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Hold domain ``domid``'s lock for a ``with`` block (re-entrant in this Store).

        :raise StateError: "domain X is busy: ..." when another process holds
            it for longer than ``timeout`` (default :attr:`lock_timeout`).
        """
        return self._flock(str(int(domid)), f"domain {int(domid)}", timeout)

    def alock(self, domid: int, timeout: float | None = None
              ) -> contextlib.AbstractAsyncContextManager[None]:
        """:meth:`lock` for async verbs (``async with``): its wait is cancellable."""
        return self._aflock(str(int(domid)), f"domain {int(domid)}", timeout)

    def aglobal_lock(self, timeout: float | None = None
                     ) -> contextlib.AbstractAsyncContextManager[None]:
        """:meth:`global_lock` for async verbs (``async with``): its wait is cancellable."""
        return self._aflock("global", "the domain table", timeout)

    def global_lock(self, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold the lock that serialises id and name allocation (re-entrant in this Store).

        :raise StateError: when another process holds it beyond ``timeout``.
        """
        return self._flock("global", "the domain table", timeout)

    # --- domains ---

    @_sql_errors
    def add_domain(self, rec: DomainRecord) -> DomainRecord:
        """Store ``rec`` under the smallest free domid >= 1; the stored record.

        :raise XenlabError: when a domain named ``rec.name`` exists.
        """
        with self.global_lock(), self._tx() as db:
            clash = db.execute("SELECT domid FROM domains WHERE name = ?", (rec.name,)).fetchone()
            if clash is not None:
                raise ConflictError("domain", rec.name,
                                    f"a domain named {rec.name!r} already exists (id {clash[0]})")
            domid = int(
                db.execute(
                    "SELECT MIN(c.domid + 1) FROM (SELECT 0 AS domid UNION ALL "
                    "SELECT domid FROM domains) AS c "
                    "WHERE c.domid + 1 NOT IN (SELECT domid FROM domains)"
                ).fetchone()[0]
            )
            stored = replace(rec, domid=domid)
            db.execute(
                "INSERT INTO domains (domid, name, uuid, config_path, config_text, rundir, pid,"
                " state, created, accel, extra, backend) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                _domain_row(stored),
            )
        return stored

    @_sql_errors
    def get(self, name_or_id: str | int) -> DomainRecord:
        """The domain with this id (an int or all digits) or name.

        As with xl, all digits is an id first (domain names are never all
        digits: see ``vm.domain.check_domain_name``); an older record whose
        name is all digits is still found by name when no id matches.

        :raise XenlabError: when there is none.
        """
        if isinstance(name_or_id, int):
            row = self._db.execute("SELECT * FROM domains WHERE domid = ?", (name_or_id,))
            found = row.fetchone()
            if found is None:
                raise NotFoundError("domain", str(name_or_id), f"no domain with id {name_or_id}")
            return _domain(found)
        found = None
        if name_or_id.isdigit() and name_or_id.isascii() and len(name_or_id) < 10:
            found = self._db.execute(
                "SELECT * FROM domains WHERE domid = ?", (int(name_or_id),)
            ).fetchone()
        if found is None:
            found = self._db.execute(
                "SELECT * FROM domains WHERE name = ?", (name_or_id,)).fetchone()
        if found is None:
            raise NotFoundError("domain", str(name_or_id), f"no domain named {name_or_id!r}")
        return _domain(found)

    @_sql_errors
    def list(self) -> list[DomainRecord]:
        """Every stored domain, by id."""
        return [_domain(r) for r in self._db.execute("SELECT * FROM domains ORDER BY domid")]

    @_sql_errors
    def update(self, rec: DomainRecord) -> DomainRecord:
        """Replace the stored record with id ``rec.domid`` by ``rec``.

        :raise XenlabError: when there is no such domain, or another has ``rec.name``.
        """
        with self._tx() as db:
            clash = db.execute(
                "SELECT domid FROM domains WHERE name = ? AND domid != ?", (rec.name, rec.domid)
            ).fetchone()
            if clash is not None:
                raise ConflictError("domain", rec.name,
                                    f"a domain named {rec.name!r} already exists (id {clash[0]})")
            row = _domain_row(rec)
            cur = db.execute(
                "UPDATE domains SET name=?, uuid=?, config_path=?, config_text=?, rundir=?,"
                " pid=?, state=?, created=?, accel=?, extra=?, backend=? WHERE domid=?",
                (*row[1:], rec.domid),
            )
            if cur.rowcount != 1:
                raise NotFoundError("domain", str(rec.domid), f"no domain with id {rec.domid}")
        return rec

    @_sql_errors
    def patch(self, domid: int, *, expect_uuid: str | None = None,
              extra_set: Mapping[str, Any] | None = None, extra_drop: Sequence[str] = (),
              **fields: Any) -> DomainRecord:
        """Change only the named ``fields`` and ``extra`` keys of domain ``domid``; the result.

        The row is read and written in one transaction, so what other verbs
        wrote meanwhile (other fields, other ``extra`` keys) is kept.
        ``expect_uuid``, when given, must still be the domain's: a record that
        was replaced by another domain under the same id is not touched.

        :raise StateError: the domain is gone, or its uuid changed.
        :raise XenlabError: an unknown field, or another domain has the new name.
        """
        unknown = set(fields) - _PATCHABLE
        if unknown:
            raise UsageError(f"cannot patch domain fields {sorted(unknown)}")
        with self._tx() as db:
            row = db.execute("SELECT * FROM domains WHERE domid = ?", (domid,)).fetchone()
            if row is None:
                raise StateError(f"domain {domid} is gone from the store")
            rec = _domain(row)
            if expect_uuid is not None and rec.uuid != expect_uuid:
                raise StateError(f"domain {domid} is another domain now ({rec.name!r})")
            extra = dict(rec.extra)
            extra.update(extra_set or {})
            for key in extra_drop:
                extra.pop(key, None)
            new = replace(rec, extra=extra, **fields)
            if new.name != rec.name:
                clash = db.execute("SELECT domid FROM domains WHERE name = ? AND domid != ?",
                                   (new.name, domid)).fetchone()
                if clash is not None:
                    raise ConflictError(
                        "domain", new.name,
                        f"a domain named {new.name!r} already exists (id {clash[0]})")
            db.execute(
                "UPDATE domains SET name=?, uuid=?, config_path=?, config_text=?, rundir=?,"
                " pid=?, state=?, created=?, accel=?, extra=?, backend=? WHERE domid=?",
                (*_domain_row(new)[1:], domid),
            )
        return new

    @_sql_errors
    def remove(self, domid: int) -> None:
        """Forget domain ``domid`` and its snapshots (a missing domain is not an error)."""
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE domid = ?", (domid,))
            db.execute("DELETE FROM domains WHERE domid = ?", (domid,))

    # --- snapshots ---

    @_sql_errors
    def add_snapshot(self, snap: SnapshotRecord) -> SnapshotRecord:
        """Store ``snap`` with a new id; the stored record.

        :raise XenlabError: unknown domain, a name taken in that domain, or a
            parent that is not a snapshot of the same domain.
        """
        with self._tx() as db:
            known = db.execute("SELECT 1 FROM domains WHERE domid = ?", (snap.domid,))
            if known.fetchone() is None:
                raise NotFoundError("domain", str(snap.domid), f"no domain with id {snap.domid}")
            clash = db.execute(
                "SELECT id FROM snapshots WHERE domid = ? AND name = ?", (snap.domid, snap.name)
            ).fetchone()
            if clash is not None:
                raise ConflictError(
                    "snapshot", snap.name,
                    f"domain {snap.domid} already has a snapshot named {snap.name!r}"
                )
            if snap.parent is not None:
                parent = db.execute(
                    "SELECT domid FROM snapshots WHERE id = ?", (snap.parent,)
                ).fetchone()
                if parent is None or int(parent[0]) != snap.domid:
                    raise StateError(
                        f"snapshot parent {snap.parent} is not a snapshot of domain {snap.domid}"
                    )
            cur = db.execute(
                "INSERT INTO snapshots (domid, name, parent, created, kind, description, disks,"
                " memory_path, state) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    snap.domid, snap.name, snap.parent, snap.created, snap.kind.value,
                    snap.description, json.dumps([dict(d) for d in snap.disks]),
                    snap.memory_path, snap.state.value,
                ),
            )
            assert cur.lastrowid is not None
            return replace(snap, id=int(cur.lastrowid))

    @_sql_errors
    def get_snapshot(self, domid: int, name: str) -> SnapshotRecord:
        """Domain ``domid``'s snapshot ``name``.

        :raise XenlabError: when there is none.
        """
        row = self._db.execute(
            "SELECT * FROM snapshots WHERE domid = ? AND name = ?", (domid, name)
        ).fetchone()
        if row is None:
            raise NotFoundError("snapshot", name, f"domain {domid} has no snapshot named {name!r}")
        return _snapshot(row)

    @_sql_errors
    def snapshot_by_id(self, snap_id: int) -> SnapshotRecord:
        """The snapshot with id ``snap_id``.

        :raise XenlabError: when there is none.
        """
        row = self._db.execute("SELECT * FROM snapshots WHERE id = ?", (snap_id,)).fetchone()
        if row is None:
            raise NotFoundError("snapshot", str(snap_id), f"no snapshot with id {snap_id}")
        return _snapshot(row)

    @_sql_errors
    def list_snapshots(self, domid: int) -> builtins.list[SnapshotRecord]:
        """Domain ``domid``'s snapshots, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM snapshots WHERE domid = ? ORDER BY created, id", (domid,)
        )
        return [_snapshot(r) for r in rows]

    @_sql_errors
    def snapshot_tree(self, domid: int) -> tuple[SnapshotNode, ...]:
        """Domain ``domid``'s snapshots as a forest: the roots, each with its descendants."""
        snaps = self.list_snapshots(domid)
        kids: dict[int | None, builtins.list[SnapshotRecord]] = {}
        for s in snaps:
            kids.setdefault(s.parent, []).append(s)

        def node(s: SnapshotRecord) -> SnapshotNode:
            return SnapshotNode(s, tuple(node(c) for c in kids.get(s.id, ())))

        return tuple(node(s) for s in kids.get(None, ()))

    @_sql_errors
    def set_snapshot_state(self, snap_id: int, state: SnapshotState) -> SnapshotRecord:
        """Move snapshot ``snap_id`` to ``state``; the updated record.

        :raise XenlabError: when there is no such snapshot.
        """
        with self._tx() as db:
            cur = db.execute(
                "UPDATE snapshots SET state = ? WHERE id = ?", (state.value, snap_id)
            )
            if cur.rowcount != 1:
                raise NotFoundError("snapshot", str(snap_id), f"no snapshot with id {snap_id}")
        return self.snapshot_by_id(snap_id)

    @_sql_errors
    def update_snapshot(self, snap_id: int, *, kind: SnapshotKind | None = None,
                        drop_memory: bool = False,
                        state: SnapshotState | None = None) -> SnapshotRecord:
        """Change snapshot ``snap_id``'s kind or state, or forget its memory file; the result.

        :raise XenlabError: when there is no such snapshot.
        """
        with self._tx() as db:
            old = _snapshot_in(db, snap_id)
            new = replace(old, kind=kind or old.kind, state=state or old.state,
                          memory_path=None if drop_memory else old.memory_path)
            db.execute("UPDATE snapshots SET kind = ?, memory_path = ?, state = ? WHERE id = ?",
                       (new.kind.value, new.memory_path, new.state.value, snap_id))
        return new

    @_sql_errors
    def remove_snapshot(
        self, snap_id: int, *, children: bool = False
    ) -> builtins.list[SnapshotRecord]:
        """Forget snapshot ``snap_id``; with ``children``, its descendants too.

        Returns the records removed, descendants before their parents.

        :raise StateError: when it has children and ``children`` is False.
        :raise XenlabError: when there is no such snapshot.
        """
        with self._tx() as db:
            top = _snapshot_in(db, snap_id)
            rows = db.execute(
                "SELECT * FROM snapshots WHERE domid = ? ORDER BY created, id", (top.domid,)
            ).fetchall()
            order = descendants_first(top, [_snapshot(r) for r in rows])
            if len(order) > 1 and not children:
                names = ", ".join(repr(s.name) for s in order[:-1])
                raise StateError(
                    f"snapshot {top.name!r} has children ({names}): remove them first "
                    "or remove with children"
                )
            for s in order:
                db.execute("DELETE FROM snapshots WHERE id = ?", (s.id,))
        return order


def descendants_first(top: SnapshotRecord, snaps: Sequence[SnapshotRecord]
                      ) -> builtins.list[SnapshotRecord]:
    """``top`` and its descendants among ``snaps``, each after its own children.

    Children come in the order of ``snaps`` (oldest first from the store):
    the order in which a subtree can be deleted.
    """
    kids: dict[int | None, builtins.list[SnapshotRecord]] = {}
    for s in snaps:
        kids.setdefault(s.parent, []).append(s)
    order: builtins.list[SnapshotRecord] = []

    def collect(s: SnapshotRecord) -> None:
        for c in kids.get(s.id, ()):
            collect(c)
        order.append(s)

    collect(top)
    return order


def _domain_row(rec: DomainRecord) -> tuple[object, ...]:
    return (
        rec.domid, rec.name, rec.uuid, rec.config_path, rec.config_text, rec.rundir,
        rec.pid, rec.state, rec.created, rec.accel, json.dumps(dict(rec.extra), sort_keys=True),
        rec.backend,
    )


def _domain(row: sqlite3.Row) -> DomainRecord:
    return DomainRecord(
        domid=int(row["domid"]), name=row["name"], uuid=row["uuid"],
        config_path=row["config_path"], config_text=row["config_text"], rundir=row["rundir"],
        pid=None if row["pid"] is None else int(row["pid"]), state=row["state"],
        created=float(row["created"]), accel=row["accel"], extra=json.loads(row["extra"]),
        backend=row["backend"],
    )


def _snapshot_in(db: sqlite3.Connection, snap_id: int) -> SnapshotRecord:
    """Snapshot ``snap_id`` read in transaction ``db``; XenlabError when there is none."""
    row = db.execute("SELECT * FROM snapshots WHERE id = ?", (snap_id,)).fetchone()
    if row is None:
        raise NotFoundError("snapshot", str(snap_id), f"no snapshot with id {snap_id}")
    return _snapshot(row)


def _snapshot(row: sqlite3.Row) -> SnapshotRecord:
    return SnapshotRecord(
        id=int(row["id"]), domid=int(row["domid"]), name=row["name"],
        parent=None if row["parent"] is None else int(row["parent"]),
        created=float(row["created"]), kind=SnapshotKind(row["kind"]),
        description=row["description"], disks=tuple(json.loads(row["disks"])),
        memory_path=row["memory_path"], state=SnapshotState(row["state"]),
    )


def qemu_opts(value: str) -> list[str]:
    """A QEMU ``key=value,...`` option string split into its parts, ``,,`` read as a comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if value.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _qemu_name(argv: Sequence[str]) -> str | None:
    """The guest name in a QEMU argv: ``-name NAME`` or ``-name guest=NAME,...`` (``,,`` undone)."""
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            parts = qemu_opts(argv[i + 1])
            for part in parts:
                if part.startswith("guest="):
                    return part[len("guest="):]
            # The implied key of -name is guest: a first part without '='.
            return parts[0] if "=" not in parts[0] else None
    return None


def _arg_after(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg in (flag, "-" + flag):
            return argv[i + 1]
    return None


def _qemu_argv(pid: int) -> list[str] | None:
    """The argv of process ``pid`` if it is a QEMU of this user, else None."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
            return None  # another user's process, whatever its command line says
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0") if a]
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return None
    return argv


def is_domain_qemu(pid: int | None, rec: DomainRecord) -> bool:
    """True when ``pid`` is this user's QEMU running domain ``rec``.

    A QEMU started by xenlab names its pidfile in the domain's run directory
    (``-pidfile RUNDIR/qemu.pid``), which no other domain shares; QEMUs of
    records without a run directory are matched by ``-name`` (as the
    record's name, or ``extra["qemu_name"]`` after a rename while running).
    A zombie has an empty command line, a recycled pid another one.
    """
    if pid is None or pid <= 0:
        return False
    argv = _qemu_argv(pid)
    if argv is None:
        return False
    pidfile = _arg_after(argv, "-pidfile")
    if rec.rundir and pidfile is not None:
        return os.path.normpath(pidfile) == os.path.normpath(
            os.path.join(rec.rundir, "qemu.pid"))
    # "qemu_name": vm.runtime.QEMU_NAME (the store sits below that module).
    return _qemu_name(argv) in (rec.name, rec.extra.get("qemu_name"))


def is_alive(rec: DomainRecord) -> bool:
    """True when ``rec.pid`` is a QEMU running the domain ``rec`` (see :func:`is_domain_qemu`)."""
    return is_domain_qemu(rec.pid, rec)


def effective_state(rec: DomainRecord) -> str:
    """``rec.state``, or ``"stale (QEMU gone)"`` when the record has a pid that is not its QEMU."""
    if rec.pid is not None and not is_alive(rec):
        return STALE
    return rec.state
