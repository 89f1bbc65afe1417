"""A durable, resumable key-value store for every expensive step (LLM answers, expert cues, ...).

Each value is stored the moment it is computed, under a key made of model id + prompt/template
version + input content (:func:`make_key`). The store is one SQLite file in WAL mode with full
synchronous commits: a crash or ``kill -9`` loses at most the values not yet ``put``; a committed
value is never half-written; several processes may write to the same store at once. Values are
JSON (no pickle). Failures are recorded beside successes, so a report can count them, but
:meth:`Store.get` only ever returns successful values, and a failed key is retried on the next run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from . import paths
from .errors import DataError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    item TEXT NOT NULL,
    value TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    item TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_kind ON records(kind, model, version);
"""


def content_hash(content: Any) -> str:
    """SHA-256 of a JSON-serialisable value (or bytes), stable across runs and machines."""
    if isinstance(content, bytes):
        data = content
    else:
        data = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


def make_key(kind: str, model: str, version: str, content: Any) -> str:
    """The store key of one expensive computation: kind, model id, prompt version and input."""
    return content_hash({"kind": kind, "model": model, "version": version, "content": content})


def default_store_path(name: str) -> Path:
    """``$DIMKIT_CACHE/<name>.sqlite``."""
    return paths.cache_dir() / f"{name}.sqlite"


#: File systems on which SQLite's WAL mode (shared memory between processes of one machine) is not safe.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs",
                                 "lustre", "gpfs", "beegfs", "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs",
                                 "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs"})
_WARNED: set[str] = set()


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path`` (Linux /proc/mounts), or None where unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(Path(path).resolve())
    best, kind = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def _warn_network(path: Path) -> None:
    kind = filesystem_type(path.parent)
    if kind in NETWORK_FILESYSTEMS and str(path) not in _WARNED:
        _WARNED.add(str(path))
        print(f"WARNING: the store {path} is on a network file system ({kind}). SQLite's WAL mode, which "
              "dimkit's stores use so that several processes can write at once, is only safe for processes "
              "of one machine on a local disk: processes on several machines writing here can corrupt it. "
              "Keep DIMKIT_CACHE on a local disk (the feature parts under features/ are safe to share; "
              "the .sqlite stores are not).", file=sys.stderr, flush=True)


class StoreDamaged(DataError):
    """The SQLite file of a store cannot be read: not a database, or a damaged one."""


class StoreUnwritable(DataError):
    """The SQLite file of a store cannot be written or opened where it is (disk full, read-only, locked)."""


class Store:
    """SQLite-backed store of JSON values; safe for threads and for several processes of one machine."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        _warn_network(self.path)
        with self._guard():
            with self._conn() as con:
                con.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _guard(self):
        """Turn SQLite's "not a database" / "malformed" errors into one named error with what to do."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            msg = str(exc)
            self.close()
            if isinstance(exc, sqlite3.OperationalError) and not any(
                    w in msg for w in ("malformed", "not a database", "corrupt")):
                if not any(w in msg for w in ("readonly", "read-only", "disk is full", "unable to open",
                                              "locked", "disk I/O")):
                    raise  # not about the place: a bug to see as it is
                # a full disk, a read-only folder, a lock held too long: the file is fine, the place is not
                raise StoreUnwritable(
                    f"the store cannot be used here ({msg}); what it held before is kept. Free disk space, make "
                    f"its folder writable, or point DIMKIT_CACHE at another folder, and rerun", file=self.path) from None
            raise StoreDamaged(
                f"the store is damaged ({msg}): what it holds cannot be read. Move it aside "
                f"(`mv {self.path} {self.path}.damaged`) and rerun: the missing values are computed again "
                "(LLM answers are requested again)", file=self.path) from None

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None,
                                  check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con = con
        return con

    def close(self) -> None:
        """Close this thread's connection."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rows(self, query: str, args: Sequence = ()) -> list[tuple]:
        """Every row one query returns (a damaged file raises :class:`StoreDamaged`)."""
        with self._guard():
            return self._conn().execute(query, args).fetchall()

    # -- reading -------------------------------------------------------------------------------
    def get(self, key: str) -> Any | None:
        """The stored value of ``key``, or None if absent (failures are never returned)."""
        rows = self._rows("SELECT value FROM records WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def __contains__(self, key: str) -> bool:
        return bool(self._rows("SELECT 1 FROM records WHERE key=?", (key,)))

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Stored values of the given keys (absent keys are left out)."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, Any] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = f"SELECT key, value FROM records WHERE key IN ({','.join('?' * len(chunk))})"
            out.update((k, json.loads(v)) for k, v in self._rows(q, chunk))
        return out

    def failures(self, kind: str | None = None) -> list[dict]:
        """Recorded failures whose key has no successful value yet."""
        q = ("SELECT f.key, f.kind, f.model, f.version, f.item, f.reason, f.detail, f.attempts "
             "FROM failures f LEFT JOIN records r ON r.key = f.key WHERE r.key IS NULL")
        rows = self._rows(q, ()) if kind is None else self._rows(q + " AND f.kind=?", (kind,))
        cols = ("key", "kind", "model", "version", "item", "reason", "detail", "attempts")
        return [dict(zip(cols, row)) for row in rows]

    def items(self, kind: str | None = None) -> Iterator[dict]:
        """Every successful record, as dicts with key, kind, model, version, item and value."""
        q = "SELECT key, kind, model, version, item, value, created FROM records"
        q, args = (q, ()) if kind is None else (q + " WHERE kind=?", (kind,))
        with self._guard():
            for key, k, model, version, item, value, created in self._conn().execute(
                    q + " ORDER BY kind, model, version, item", args):
                yield {"key": key, "kind": k, "model": model, "version": version, "item": item,
                       "value": json.loads(value), "created": created}

    def count(self, kind: str | None = None) -> int:
        """Number of successful records (of one kind)."""
        if kind is None:
            return self._rows("SELECT COUNT(*) FROM records")[0][0]
        return self._rows("SELECT COUNT(*) FROM records WHERE kind=?", (kind,))[0][0]

    # -- writing -------------------------------------------------------------------------------
    def put(self, key: str, value: Any, *, kind: str, model: str, version: str, item: str) -> None:
        """Store one value durably (committed before this returns)."""
        self.put_many([(key, value, item)], kind=kind, model=model, version=version)

    def put_many(self, rows: Iterable[tuple[str, Any, str]], *, kind: str, model: str,
                 version: str) -> int:
        """Store several ``(key, value, item)`` rows in one transaction; returns how many."""
        now = time.time()
        data = [(k, kind, model, version, str(item), json.dumps(v, ensure_ascii=False), now)
                for k, v, item in rows]
        if not data:
            return 0
        with self._guard(), self._lock:
            con = self._conn()
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany(
                    "INSERT OR REPLACE INTO records(key, kind, model, version, item, value, created) "
                    "VALUES (?,?,?,?,?,?,?)", data)
                keys = [d[0] for d in data]
                for i in range(0, len(keys), 500):
                    chunk = keys[i:i + 500]
                    con.execute(f"DELETE FROM failures WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return len(data)

    def put_failure(self, key: str, *, kind: str, model: str, version: str, item: str, reason: str,
                    detail: str | None = None) -> None:
        """Record that computing ``key`` failed (reason is a short category, detail free text)."""
        with self._guard(), self._lock:
            self._conn().execute(
                "INSERT INTO failures(key, kind, model, version, item, reason, detail, attempts, updated) "
                "VALUES (?,?,?,?,?,?,?,1,?) ON CONFLICT(key) DO UPDATE SET reason=excluded.reason, "
                "detail=excluded.detail, attempts=failures.attempts+1, updated=excluded.updated",
                (key, kind, model, version, str(item), reason, detail, time.time()))

    # -- exchange ------------------------------------------------------------------------------
    def export_jsonl(self, path: str | Path, kind: str | None = None) -> int:
        """Write successful records as JSON lines (sorted, so the file diffs cleanly)."""
        n = 0
        path = Path(path)
        with open(path, "w", encoding="utf-8") as fh:
            for rec in self.items(kind):
                rec = {k: rec[k] for k in ("key", "kind", "model", "version", "item", "value")}
                fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
                n += 1
        return n

    def import_jsonl(self, path: str | Path) -> int:
        """Load records written by :meth:`export_jsonl` (existing keys are overwritten)."""
        groups: dict[tuple[str, str, str], list[tuple[str, Any, str]]] = {}
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    groups.setdefault((rec["kind"], rec["model"], rec["version"]), []).append(
                        (rec["key"], rec["value"], rec["item"]))
                except (json.JSONDecodeError, KeyError) as exc:
                    raise DataError(f"not a store record: {exc}", file=path, record=f"line {lineno}")
        n = 0
        for (kind, model, version), rows in groups.items():
            n += self.put_many(rows, kind=kind, model=model, version=version)
        return n
