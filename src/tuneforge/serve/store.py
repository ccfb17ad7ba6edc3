"""The fine-tuning platform's state in SQLite: files, jobs, events, checkpoints and API-key projects.

One database file (`runs/<name>/api/platform.sqlite3`, WAL mode) behind this one
small interface, so concurrent requests, restarts and several server processes
over the same run folder see one consistent state. Every change is one
transaction; a job's status moves only through `update_job`, whose guard (the
statuses a change may leave) is checked inside the same transaction, and a worker
takes a queued job with `claim_job`, which only one process can win.

Uploaded bytes stay on disk (`api/files/<id>.jsonl`, written atomically before
their row exists); the database references them. Keys are stored as SHA-256
digests with their project, never as text.

A store opened over a run folder written by the JSON-file version of the API
(`api/files/*.json`, `api/jobs/*/job.json`) imports those once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, project TEXT NOT NULL, created_at INTEGER NOT NULL, purpose TEXT NOT NULL, obj TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, project TEXT NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL,
    request TEXT, worker TEXT, obj TEXT NOT NULL, extra TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, job_id TEXT NOT NULL, obj TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL, obj TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS projects (
    key_sha256 TEXT PRIMARY KEY, project TEXT NOT NULL, first_seen INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
"""


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        fresh = not self.path.exists()
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # SQLite gives its -wal and -shm this mode
        for made in (
            self.path,
            self.path.with_name(self.path.name + "-wal"),
            self.path.with_name(self.path.name + "-shm"),
        ):
            if made.exists():
                os.chmod(made, 0o600)  # a database an earlier version made too
        self._connection().executescript(SCHEMA)  # idempotent; executescript runs outside any transaction
        if fresh:
            self._import_json_files(self.path.parent)

    # ------------------------------------------------------------------ connections

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at each checkpoint, never corrupt
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: the write lock up front, so read-modify-write cannot interleave)."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._connection().execute(sql, args).fetchall()

    # ------------------------------------------------------------------ files

    def add_file(self, obj: dict, project: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?)",
                (obj["id"], project, obj["created_at"], obj["purpose"], json.dumps(obj)),
            )

    def file(self, file_id: str, project: str | None = None) -> dict | None:
        rows = self._rows("SELECT obj, project FROM files WHERE id = ?", (file_id,))
        if not rows or (project is not None and rows[0][1] != project):
            return None
        return json.loads(rows[0][0])

    def files(self, project: str, purpose: str | None = None, newest_first: bool = True) -> list[dict]:
        order = "DESC" if newest_first else "ASC"
        sql = (
            f"SELECT obj FROM files WHERE project = ?{' AND purpose = ?' if purpose else ''} "
            f"ORDER BY created_at {order}, rowid {order}"
        )
        return [json.loads(r[0]) for r in self._rows(sql, (project, purpose) if purpose else (project,))]

    def delete_file(self, file_id: str, in_use: Callable[[sqlite3.Connection], str | None]) -> str | None:
        """Delete the row unless `in_use` (run in the same transaction) names a job that needs it; returns that job."""
        with self.transaction() as db:
            user = in_use(db)
            if user is None:
                db.execute("DELETE FROM files WHERE id = ?", (file_id,))
            return user

    # ------------------------------------------------------------------ jobs

    def add_job(self, obj: dict, project: str, extra: dict, limit: int | None = None) -> bool:
        """Insert a job; False (and nothing inserted) when the project already has `limit` unfinished jobs."""
        with self.transaction() as db:
            if limit is not None:
                (unfinished,) = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE project = ? AND status IN "
                    "('validating_files', 'queued', 'running', 'paused')",
                    (project,),
                ).fetchone()
                if unfinished >= limit:
                    return False
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, NULL, NULL, ?, ?)",
                (obj["id"], project, obj["created_at"], obj["status"], json.dumps(obj), json.dumps(extra)),
            )
        return True

    def job(self, job_id: str, project: str | None = None) -> dict | None:
        found = self.job_row(job_id)
        if found is None or (project is not None and found["project"] != project):
            return None
        return found["obj"]

    def job_row(self, job_id: str) -> dict | None:
        rows = self._rows("SELECT obj, project, request, worker, extra FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        obj, project, request, worker, extra = rows[0]
        return {
            "obj": json.loads(obj),
            "project": project,
            "request": request,
            "worker": worker,
            "extra": json.loads(extra),
        }

    def jobs(self, project: str, metadata: dict[str, str] | None = None) -> list[dict]:
        """The project's jobs, newest first; with `metadata`, only those whose metadata has every given pair."""
        found = [
            json.loads(r[0])
            for r in self._rows(
                "SELECT obj FROM jobs WHERE project = ? ORDER BY created_at DESC, rowid DESC", (project,)
            )
        ]
        if metadata:
            found = [j for j in found if all((j.get("metadata") or {}).get(k) == v for k, v in metadata.items())]
        return found

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        marks = ",".join("?" * len(statuses))
        rows = self._rows(f"SELECT id FROM jobs WHERE status IN ({marks}) ORDER BY created_at, rowid", statuses)
        return [self.job_row(r[0]) | {"id": r[0]} for r in rows]

    def update_job(
        self,
        job_id: str,
        changes: dict[str, Any],
        unless: tuple[str, ...] = (),
        request: str | None | bool = False,
        worker: str | None | bool = False,
        extra: dict | None = None,
        only: tuple[str, ...] = (),
    ) -> dict | None:
        """Apply `changes` to the job object (and the request/worker columns when given) in one transaction, unless
        its status is one of `unless` (or, with `only`, is not one of those); the job object after, or None when the
        guard held it back."""
        with self.transaction() as db:
            row = db.execute("SELECT obj, status, extra FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[1] in unless or (only and row[1] not in only):
                return None
            obj = {**json.loads(row[0]), **changes}
            sets, args = ["obj = ?", "status = ?"], [json.dumps(obj), obj["status"]]
            if request is not False:
                sets.append("request = ?")
                args.append(request)
            if worker is not False:
                sets.append("worker = ?")
                args.append(worker)
            if extra is not None:
                sets.append("extra = ?")
                args.append(json.dumps({**json.loads(row[2]), **extra}))
            db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
            return obj

    def claim_job(self, worker: str) -> str | None:
        """Take the oldest queued job for `worker` (status running); None when there is none. One claimant wins."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT id, obj FROM jobs WHERE status = 'queued' ORDER BY created_at, rowid LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            obj = {**json.loads(row[1]), "status": "running", "estimated_finish": None}
            db.execute(
                "UPDATE jobs SET status = 'running', worker = ?, request = NULL, obj = ? WHERE id = ?",
                (worker, json.dumps(obj), row[0]),
            )
            return row[0]

    def request_of(self, job_id: str) -> str | None:
        rows = self._rows("SELECT request FROM jobs WHERE id = ?", (job_id,))
        return rows[0][0] if rows else None

    # ------------------------------------------------------------------ events and checkpoints

    def add_event(self, job_id: str, obj: dict) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO events (id, job_id, obj) VALUES (?, ?, ?)", (obj["id"], job_id, json.dumps(obj)))

    def events(self, job_id: str) -> list[dict]:
        """Newest first, as the API lists them."""
        return [
            json.loads(r[0]) for r in self._rows("SELECT obj FROM events WHERE job_id = ? ORDER BY seq DESC", (job_id,))
        ]

    def add_checkpoint(self, job_id: str, obj: dict, path: Path) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                (obj["id"], job_id, obj["step_number"], str(path), json.dumps(obj)),
            )

    def checkpoints(self, job_id: str) -> list[tuple[dict, Path]]:
        """Newest first."""
        rows = self._rows("SELECT obj, path FROM checkpoints WHERE job_id = ? ORDER BY step DESC", (job_id,))
        return [(json.loads(obj), Path(path)) for obj, path in rows]

    # ------------------------------------------------------------------ keys

    def record_projects(self, entries: tuple[tuple[bytes, str], ...]) -> None:
        """Remember which key digest belongs to which project (first seen), for the audit of who made what."""
        now = int(time.time())
        with self.transaction() as db:
            for hashed, project in entries:
                db.execute("INSERT OR IGNORE INTO projects VALUES (?, ?, ?)", (hashed.hex(), project, now))

    # ------------------------------------------------------------------ the JSON-file version's state

    def _import_json_files(self, root: Path) -> None:
        for meta in sorted((root / "files").glob("*.json")):
            obj = json.loads(meta.read_text(encoding="utf-8"))
            for key in ("expires_at", "status_details"):
                if obj.get(key) is None:
                    obj.pop(key, None)
            self.add_file(obj, "default")
            meta.unlink()
        for path in sorted((root / "jobs").glob("*/job.json")):
            state = json.loads(path.read_text(encoding="utf-8"))
            obj = state["job"]
            self.add_job(obj, "default", {})
            for event in state.get("events", []):
                self.add_event(obj["id"], event)
            for checkpoint in state.get("checkpoints", []):
                self.add_checkpoint(obj["id"], checkpoint, path.parent / "adapter")
            os.replace(path, path.with_suffix(".json.imported"))
