"""The durable feedback log, the prediction records and the champion pointer, behind one
small interface with two backends.

    FeedbackLog
      append(stream, [(event_id, payload)])  idempotent by event id; durable before it returns
      read(stream, after, limit, block_s)    entries with offset > after, oldest first
      commit(stream, upto)                   the consumer saved a model that learned <= upto
      rewind(stream)                         a read's entries were not kept: deliver them again
      tail(stream, upto, n)                  the last n entries <= upto (to rebuild a window)
      backlog(stream)                        appended but not yet committed
      put_records / get_record               prediction id -> features, version, time (TTL)
      champion / set_champion / champion_history   the durable pointer every replica reads

- ``sqlite:///path.db`` (embedded default): one file in WAL mode, one table per stream whose
  integer row id is the offset. Appends use ``synchronous=FULL``, so an acknowledged event
  survives a crash of the process and of the machine; prediction records use ``NORMAL``
  (losing the last few on a power cut only turns their feedback into a 404).
- ``redis://host:port/db`` (for a cluster): one Redis Stream per stream, read by the trainer
  through a consumer group. A Lua script makes "seen this event id? else XADD" atomic. Run
  Redis with ``appendonly yes`` and ``appendfsync always`` for the same durability as SQLite.

Exactly-once effect, whichever backend: the consumer stores the offset it has learned up to
*inside the model version it saves*, and reads from that offset after a restart; ``commit``
afterwards only lets the log forget (SQLite) or acknowledge (Redis ``XACK``) what is already
inside a saved version. A crash between the save and the commit re-delivers entries at or
below the saved offset, and the consumer skips them.

Kafka would plug in the same way: ``append`` = a producer with ``enable.idempotence=true`` and
``acks=all`` (event id as the key; a compacted topic or a small table for the duplicate check);
``read`` = a consumer with ``enable.auto.commit=false`` that seeks to the saved offset on start;
``commit`` = ``commit_offsets`` after the model version is saved (or Kafka transactions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

START = "0"  # the offset before the first entry, in both backends
# How long an SQLite call waits for another process's write lock before it fails (a 503).
BUSY_TIMEOUT_S = 10.0
_STREAM_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def offset_key(offset: str) -> tuple[int, int]:
    """Order offsets of either backend: SQLite row ids ("17") and Redis ids ("1700-3")."""
    ms, _, seq = str(offset).partition("-")
    return int(ms), int(seq or 0)


def payload_digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Appended:
    """What ``append`` returns for one event: its offset, when it was first acknowledged, and
    whether it had been appended before (then ``same_payload`` says if the content matches)."""

    event_id: str
    offset: str
    acked_at: float
    duplicate: bool
    same_payload: bool = True


@dataclass(frozen=True)
class Entry:
    offset: str
    event_id: str
    payload: dict[str, Any]


class FeedbackLog(Protocol):
    def append(
        self, stream: str, items: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[Appended]: ...

    def read(self, stream: str, after: str, limit: int, block_s: float = 0.0) -> list[Entry]: ...

    def commit(self, stream: str, upto: str) -> None: ...

    def rewind(self, stream: str) -> None: ...

    def tail(self, stream: str, upto: str, n: int) -> list[Entry]: ...

    def backlog(self, stream: str) -> int: ...

    def put_records(self, items: Sequence[tuple[str, dict[str, Any]]], keep_s: float) -> None: ...

    def get_record(self, record_id: str) -> tuple[dict[str, Any], float] | None: ...

    def champion(self) -> dict[str, Any] | None: ...

    def set_champion(self, version: str, reason: str) -> dict[str, Any]: ...

    def champion_history(self, n: int = 20) -> list[dict[str, Any]]: ...

    def log_id(self) -> str: ...

    def close(self) -> None: ...


def _check_stream(stream: str) -> str:
    if not _STREAM_RE.fullmatch(stream):
        raise ValueError(f"stream name {stream!r} must match {_STREAM_RE.pattern}")
    return stream


def open_log(url: str, *, retain_events: int = 200_000) -> FeedbackLog:
    """The backend for ``sqlite:///abs/path.db`` or ``redis://host:port/db``."""
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        return SqliteLog(url.removeprefix("sqlite:///"), retain_events=retain_events)
    if scheme in ("redis", "rediss"):
        return RedisLog(url, retain_events=retain_events)
    raise ValueError(f"feedback log URL {url!r}: use sqlite:///path.db or redis://host:port/db")


# ------------------------------------------------------------------------------ SQLite
class SqliteLog:
    """Embedded backend: one SQLite file in WAL mode, shared by every process on the host."""

    def __init__(self, path: str | Path, *, retain_events: int = 200_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retain_events = retain_events
        self._lock = threading.Lock()  # one sqlite3 connection per process, shared by threads
        self._events = self._connect("FULL")  # an ack means the event is on disk
        self._records = self._connect("NORMAL")
        self._streams: set[str] = set()
        with self._locked(), self._events:
            self._events.executescript(
                """
                CREATE TABLE IF NOT EXISTS consumers (
                    stream TEXT PRIMARY KEY, committed INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS records (
                    id TEXT PRIMARY KEY, payload TEXT NOT NULL, created_at REAL NOT NULL);
                CREATE INDEX IF NOT EXISTS records_created ON records(created_at);
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS champion (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT NOT NULL,
                    reason TEXT NOT NULL, at REAL NOT NULL);
                """
            )
            self._events.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('log_id', ?)",
                (uuid.uuid4().hex,),
            )
            self._log_id = self._events.execute(
                "SELECT value FROM meta WHERE key = 'log_id'"
            ).fetchone()[0]
        self._puts = 0

    def log_id(self) -> str:
        """Which log this is: model versions record it, so a fresh database is noticed."""
        return str(self._log_id)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's turn on the connections, waited for no longer than SQLite's own busy
        timeout: while another process holds the file's write lock, each waiting call gives up
        after at most two busy timeouts (the queue, then its own), not one per call ahead."""
        if not self._lock.acquire(timeout=BUSY_TIMEOUT_S):
            raise sqlite3.OperationalError(
                f"database is locked (this process waited {BUSY_TIMEOUT_S:g}s for its turn)"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        return conn

    def _table(self, stream: str) -> str:
        table = f"events_{_check_stream(stream)}"
        if stream not in self._streams:
            with self._events:
                # AUTOINCREMENT: offsets are never reused, even after old rows are pruned.
                self._events.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} ("
                    "offset INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, "
                    "digest TEXT NOT NULL, payload TEXT NOT NULL, acked_at REAL NOT NULL)"
                )
            self._streams.add(stream)
        return table

    def append(self, stream: str, items: Sequence[tuple[str, dict[str, Any]]]) -> list[Appended]:
        out: list[Appended] = []
        with self._locked():
            table = self._table(stream)
            now = time.time()
            with self._events:  # one transaction (and one fsync) for the whole batch
                for event_id, payload in items:
                    digest = payload_digest(payload)
                    cur = self._events.execute(
                        f"INSERT INTO {table} (event_id, digest, payload, acked_at) "  # noqa: S608
                        "VALUES (?, ?, ?, ?) ON CONFLICT(event_id) DO NOTHING",
                        (event_id, digest, json.dumps(payload), now),
                    )
                    if cur.rowcount == 1:
                        out.append(Appended(event_id, str(cur.lastrowid), now, False))
                        continue
                    offset, old_digest, acked_at = self._events.execute(
                        f"SELECT offset, digest, acked_at FROM {table} WHERE event_id = ?",  # noqa: S608
                        (event_id,),
                    ).fetchone()
                    out.append(
                        Appended(event_id, str(offset), acked_at, True, old_digest == digest)
                    )
        return out

    def read(self, stream: str, after: str, limit: int, block_s: float = 0.0) -> list[Entry]:
        deadline = time.monotonic() + block_s
        while True:
            with self._locked():
                table = self._table(stream)
                rows = self._events.execute(
                    f"SELECT offset, event_id, payload FROM {table} WHERE offset > ? "  # noqa: S608
                    "ORDER BY offset LIMIT ?",
                    (offset_key(after)[0], limit),
                ).fetchall()
            if rows or time.monotonic() >= deadline:
                return [Entry(str(o), e, json.loads(p)) for o, e, p in rows]
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def commit(self, stream: str, upto: str) -> None:
        with self._locked():
            table = self._table(stream)
            with self._events:
                self._events.execute(
                    "INSERT INTO consumers (stream, committed) VALUES (?, ?) "
                    "ON CONFLICT(stream) DO UPDATE SET committed = excluded.committed",
                    (stream, offset_key(upto)[0]),
                )
                # Keep retain_events behind the committed offset (for tail() and replays).
                self._events.execute(
                    f"DELETE FROM {table} WHERE offset <= ?",  # noqa: S608
                    (offset_key(upto)[0] - self.retain_events,),
                )

    def rewind(self, stream: str) -> None:
        """Nothing to do: reads go by offset, so the next read after the saved offset sees
        every entry a failed round had read."""

    def tail(self, stream: str, upto: str, n: int) -> list[Entry]:
        with self._locked():
            table = self._table(stream)
            rows = self._events.execute(
                f"SELECT offset, event_id, payload FROM {table} WHERE offset <= ? "  # noqa: S608
                "ORDER BY offset DESC LIMIT ?",
                (offset_key(upto)[0], n),
            ).fetchall()
        return [Entry(str(o), e, json.loads(p)) for o, e, p in reversed(rows)]

    def backlog(self, stream: str) -> int:
        with self._locked():
            table = self._table(stream)
            row = self._events.execute(
                "SELECT committed FROM consumers WHERE stream = ?", (stream,)
            ).fetchone()
            # Offsets increase but may skip (a refused duplicate can use one up): count rows.
            (count,) = self._events.execute(
                f"SELECT COUNT(*) FROM {table} WHERE offset > ?",  # noqa: S608
                (int(row[0]) if row else 0,),
            ).fetchone()
        return int(count)

    def put_records(self, items: Sequence[tuple[str, dict[str, Any]]], keep_s: float) -> None:
        now = time.time()
        with self._locked(), self._records:
            self._records.executemany(
                "INSERT OR REPLACE INTO records (id, payload, created_at) VALUES (?, ?, ?)",
                [(rid, json.dumps(p), now) for rid, p in items],
            )
            self._puts += 1
            if self._puts % 500 == 0:  # prune now and then, never on every request
                self._records.execute("DELETE FROM records WHERE created_at < ?", (now - keep_s,))

    def get_record(self, record_id: str) -> tuple[dict[str, Any], float] | None:
        with self._locked():
            row = self._records.execute(
                "SELECT payload, created_at FROM records WHERE id = ?", (record_id,)
            ).fetchone()
        return (json.loads(row[0]), float(row[1])) if row else None

    def champion(self) -> dict[str, Any] | None:
        history = self.champion_history(1)
        return history[0] if history else None

    def set_champion(self, version: str, reason: str) -> dict[str, Any]:
        with self._locked(), self._events:
            cur = self._events.execute(
                "INSERT INTO champion (version, reason, at) VALUES (?, ?, ?)",
                (version, reason, time.time()),
            )
            seq = cur.lastrowid
            self._events.execute("DELETE FROM champion WHERE seq <= ?", (int(seq or 0) - 1000,))
        return {"seq": seq, "version": version, "reason": reason}

    def champion_history(self, n: int = 20) -> list[dict[str, Any]]:
        with self._locked():
            rows = self._events.execute(
                "SELECT seq, version, reason, at FROM champion ORDER BY seq DESC LIMIT ?", (n,)
            ).fetchall()
        return [{"seq": s, "version": v, "reason": r, "at": a} for s, v, r, a in rows]

    def close(self) -> None:
        with self._locked():
            self._events.close()
            self._records.close()


# ------------------------------------------------------------------------------ Redis
# KEYS: stream, dedupe key. ARGV: payload, digest, now, dedupe ttl (s), approximate maxlen.
# Returns {1, id, now} for a new event, {0, "id|digest|acked_at"} for one seen before.
_APPEND_LUA = """
local prev = redis.call('GET', KEYS[2])
if prev then return {0, prev} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'p', ARGV[1])
redis.call('SET', KEYS[2], id .. '|' .. ARGV[2] .. '|' .. ARGV[3], 'EX', ARGV[4])
return {1, id}
"""


class RedisLog:
    """Cluster backend: Redis Streams, read through a consumer group named ``trainer``.

    Delivered-but-unacknowledged entries stay in the group's pending list; after a restart
    the consumer reads those first (id ``0``), then new ones (``>``), and skips any at or
    below the offset its saved model already covers.
    """

    GROUP = "trainer"
    CONSUMER = "trainer-1"  # one trainer: its successor inherits its pending entries

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "online",
        retain_events: int = 200_000,
        dedupe_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.prefix = prefix
        self.retain_events = retain_events
        self.dedupe_ttl_s = dedupe_ttl_s
        self._append = self.r.register_script(_APPEND_LUA)
        self._groups: set[str] = set()
        self._pending_cursor: dict[str, str | None] = {}  # None once the pending list is read
        self._delivered: dict[str, list[str]] = {}
        self.r.set(f"{prefix}:log_id", uuid.uuid4().hex, nx=True)
        self._log_id = self.r.get(f"{prefix}:log_id").decode()

    def log_id(self) -> str:
        return str(self._log_id)

    def _key(self, stream: str) -> str:
        return f"{self.prefix}:log:{_check_stream(stream)}"

    def _group(self, stream: str) -> str:
        key = self._key(stream)
        if stream not in self._groups:
            import redis

            try:
                self.r.xgroup_create(key, self.GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:  # BUSYGROUP: it exists already
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups.add(stream)
        return key

    def append(self, stream: str, items: Sequence[tuple[str, dict[str, Any]]]) -> list[Appended]:
        key = self._group(stream)
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        digests = []
        for event_id, payload in items:
            digest = payload_digest(payload)
            digests.append(digest)
            dedupe = f"{self.prefix}:seen:{stream}:{event_id}"
            self._append(
                keys=[key, dedupe],
                args=[
                    json.dumps(payload),
                    digest,
                    repr(now),
                    self.dedupe_ttl_s,
                    self.retain_events,
                ],
                client=pipe,
            )
        out = []
        for (event_id, _), digest, res in zip(items, digests, pipe.execute(), strict=True):
            if int(res[0]) == 1:
                out.append(Appended(event_id, res[1].decode(), now, False))
            else:
                offset, old_digest, acked_at = res[1].decode().split("|")
                out.append(Appended(event_id, offset, float(acked_at), True, old_digest == digest))
        return out

    def read(self, stream: str, after: str, limit: int, block_s: float = 0.0) -> list[Entry]:
        key = self._group(stream)
        cursor = self._pending_cursor.setdefault(stream, "0")
        if cursor is not None:  # first our own pending entries (delivered before a crash)
            resp = self.r.xreadgroup(self.GROUP, self.CONSUMER, {key: cursor}, count=limit)
            entries = resp[0][1] if resp else []
            if not entries:
                self._pending_cursor[stream] = None
                return self.read(stream, after, limit, block_s)
            self._pending_cursor[stream] = entries[-1][0].decode()
        else:
            block_ms = int(block_s * 1000) or None
            resp = self.r.xreadgroup(
                self.GROUP, self.CONSUMER, {key: ">"}, count=limit, block=block_ms
            )
            entries = resp[0][1] if resp else []
        out, stale = [], []
        floor = offset_key(after)
        for raw_id, fields in entries:
            offset = raw_id.decode()
            if offset_key(offset) <= floor:
                stale.append(offset)  # already inside a saved model version
                continue
            payload = json.loads(fields[b"p"])
            out.append(Entry(offset, str(payload.get("event_id", "")), payload))
            self._delivered.setdefault(stream, []).append(offset)
        if stale:
            self.r.xack(key, self.GROUP, *stale)
        return out

    def commit(self, stream: str, upto: str) -> None:
        key = self._group(stream)
        limit = offset_key(upto)
        delivered = self._delivered.get(stream, [])
        done = [o for o in delivered if offset_key(o) <= limit]
        if done:
            self.r.xack(key, self.GROUP, *done)
        self._delivered[stream] = [o for o in delivered if offset_key(o) > limit]
        self.r.set(f"{self.prefix}:committed:{stream}", upto)

    def rewind(self, stream: str) -> None:
        """A read's entries were lost with a failed round (Redis went away mid-round, the
        answer to XREADGROUP never arrived): they are in the group's pending list, which
        ``>`` never delivers again, so read that list first on the next read, as a restarted
        consumer does. Entries at or below the saved offset are skipped there."""
        self._pending_cursor[stream] = "0"
        self._delivered[stream] = []

    def tail(self, stream: str, upto: str, n: int) -> list[Entry]:
        key = self._group(stream)
        top = upto if upto != START else "0-0"
        rows = self.r.xrevrange(key, max=top, min="-", count=n)
        out = []
        for raw_id, fields in reversed(rows):
            payload = json.loads(fields[b"p"])
            out.append(Entry(raw_id.decode(), str(payload.get("event_id", "")), payload))
        return out

    def backlog(self, stream: str) -> int:
        key = self._group(stream)
        for group in self.r.xinfo_groups(key):
            if group["name"].decode() == self.GROUP:
                lag = group.get("lag")
                return int(lag or 0) + int(group.get("pending") or 0)
        return 0

    def put_records(self, items: Sequence[tuple[str, dict[str, Any]]], keep_s: float) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for rid, payload in items:
            value = json.dumps({"p": payload, "t": now})
            pipe.set(f"{self.prefix}:rec:{rid}", value, ex=max(1, int(keep_s)))
        pipe.execute()

    def get_record(self, record_id: str) -> tuple[dict[str, Any], float] | None:
        raw = self.r.get(f"{self.prefix}:rec:{record_id}")
        if raw is None:
            return None
        doc = json.loads(raw)
        return doc["p"], float(doc["t"])

    def champion(self) -> dict[str, Any] | None:
        raw = self.r.lindex(f"{self.prefix}:champion", 0)
        return json.loads(raw) if raw else None

    def set_champion(self, version: str, reason: str) -> dict[str, Any]:
        key = f"{self.prefix}:champion"
        seq = int(self.r.incr(f"{self.prefix}:champion_seq"))
        doc = {"seq": seq, "version": version, "reason": reason, "at": time.time()}
        pipe = self.r.pipeline(transaction=True)
        pipe.lpush(key, json.dumps(doc))
        pipe.ltrim(key, 0, 999)
        pipe.execute()
        return doc

    def champion_history(self, n: int = 20) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(f"{self.prefix}:champion", 0, n - 1)]

    def close(self) -> None:
        self.r.close()
