"""The job database's numbered migrations: a file written by the first release (schema 1, the
committed fixture made by tests/fixtures/make_jobs_v1.py from that release's own code) is
upgraded on open, its rows read back unchanged, and each migration runs exactly once."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from skyreels_local.jobs import LATEST_VERSION, Database, JobStatus
from skyreels_local.jobs import db as db_module
from skyreels_local.jobs.migrations import MIGRATIONS, Migration
from skyreels_local.server.schemas import prediction_from_job

V1_FIXTURE = Path(__file__).parent / "fixtures" / "jobs_v1.sqlite3"
IMAGE = "http://example.invalid/cat.png"


@pytest.fixture
def v1_path(tmp_path) -> Path:
    path = tmp_path / "jobs.sqlite3"
    shutil.copyfile(V1_FIXTURE, path)
    return path


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def schema(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()


@pytest.fixture
def applied(monkeypatch) -> list[int]:
    """The versions of the migrations that ran, in order (each one wrapped by a spy)."""
    ran: list[int] = []

    def spy(migration: Migration) -> Migration:
        def apply(conn: sqlite3.Connection) -> None:
            ran.append(migration.version)
            migration.apply(conn)

        return Migration(migration.version, migration.description, apply)

    monkeypatch.setattr(db_module, "MIGRATIONS", tuple(spy(m) for m in MIGRATIONS))
    return ran


def test_migrations_are_numbered_one_to_n_without_gaps():
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert LATEST_VERSION == len(MIGRATIONS) == 3
    assert all(m.description for m in MIGRATIONS)


def test_a_first_release_database_is_upgraded_and_its_rows_read_back(v1_path):
    assert user_version(v1_path) == 1
    db = Database(v1_path)
    assert db.schema_version() == user_version(v1_path) == LATEST_VERSION
    for table in ("predictions", "uploads"):
        assert "account" in {row[1] for row in db._conn().execute(f"PRAGMA table_info({table})")}
    assert "has_nsfw_contents" in {row[1] for row in db._conn().execute("PRAGMA table_info(predictions)")}

    done = db.predictions.get_full("done")
    assert (done.status, done.outputs, done.execution_ms, done.inference_ms) == (
        JobStatus.COMPLETED,
        ["done.mp4"],
        1500,
        1200,
    )
    assert done.params == {
        "prompt": "a cat",
        "image": IMAGE,
        "seed": 100,
        "num_inference_steps": 3,
        "guidance_scale": 6.0,
    }
    assert (done.input["image"], done.seed, done.base_url, done.account) == (
        IMAGE,
        100,
        "http://old.server",
        None,
    )
    # Written before the safety checker: no verdicts (the API shows false per output, as before).
    assert done.has_nsfw_contents is None
    broken = db.predictions.get("broken")
    assert (broken.status, broken.code, broken.error) == (JobStatus.FAILED, 5000, "CUDA out of memory")
    running = db.predictions.get("running")
    assert (running.status, running.progress, running.claim, running.worker_id) == (
        JobStatus.PROCESSING,
        0.5,
        "claim-running",
        "w0",
    )
    waiting = db.predictions.get("waiting")
    assert (waiting.status, db.predictions.queue_position(waiting)) == (JobStatus.CREATED, 1)

    # README: rows from before accounts belong to the anonymous owner, visible only without keys.
    legacy, total = db.predictions.history(account=None)
    assert ([job.id for job in legacy], total) == (["waiting", "running", "broken", "done"], 4)
    assert db.predictions.history(account="team-a") == ([], 0)
    upload = db.uploads.get("u" * 32)
    assert (upload.filename, upload.complete, upload.account) == ("cat.png", True, None)

    assert db.secrets.get_or_create("url_signing_key", "new") == "v1-signing-key"
    assert db.counters.all() == {"denoise_steps": 3.0, "denoise_seconds": 1.2}
    assert [(d["url"], d["status"]) for d in db.webhooks.deliveries("done")] == [
        ("http://hook.invalid/done", "pending")
    ]
    (worker,) = db.workers.all()
    assert (worker.id, worker.state, worker.job_id) == ("w0", "busy", "running")

    # The old claim still finishes its job on the upgraded file, and the queue carries on.
    assert db.predictions.complete(
        "running",
        "claim-running",
        outputs=["running.mp4"],
        execution_ms=1,
        inference_ms=1,
        has_nsfw_contents=[True],
    )
    finished = db.predictions.get("running")
    assert (finished.status, finished.has_nsfw_contents) == (JobStatus.COMPLETED, [True])
    assert db.counters.all() == {
        "denoise_steps": 3.0,
        "denoise_seconds": 1.2,
        "safety_checks": 1.0,
        "nsfw_flagged": 1.0,
    }
    assert db.predictions.claim_next("w0", "claim-next").id == "waiting"
    db.close()


def test_each_migration_runs_once(v1_path, tmp_path, applied):
    Database(v1_path).close()
    assert applied == [2, 3]  # the file was at 1
    upgraded = schema(v1_path)
    assert any(name == "predictions_account_seq" for _, name, _ in upgraded)
    Database(v1_path).close()
    assert applied == [2, 3]  # reopening changes nothing
    assert schema(v1_path) == upgraded

    applied.clear()
    Database(tmp_path / "new.sqlite3").close()
    assert applied == [1, 2, 3]
    assert user_version(tmp_path / "new.sqlite3") == LATEST_VERSION


def test_a_version_2_file_gains_the_verdict_column(v1_path, applied):
    """Migration 3 alone: the fixture brought to schema 2 by migration 2's own code, then opened."""
    with sqlite3.connect(v1_path, isolation_level=None) as conn:
        MIGRATIONS[1].apply(conn)
        conn.execute("PRAGMA user_version = 2")
    before = {row[1] for row in sqlite3.connect(v1_path).execute("PRAGMA table_info(predictions)")}
    assert "has_nsfw_contents" not in before
    db = Database(v1_path)
    assert applied == [3] and db.schema_version() == 3
    done = db.predictions.get("done")
    assert (done.outputs, done.has_nsfw_contents) == (["done.mp4"], None)
    # Rendered as before the column: false per output.
    rendered = prediction_from_job(done, base_url="http://x", outputs=["http://x/done.mp4"], queue_position=0)
    assert rendered.has_nsfw_contents == [False]
    assert db.predictions.claim_next("w0", "c").id == "waiting"
    assert db.predictions.complete(
        "waiting", "c", outputs=["waiting.mp4"], execution_ms=1, inference_ms=1, has_nsfw_contents=[False]
    )
    assert db.predictions.get("waiting").has_nsfw_contents == [False]
    db.close()


def test_a_failing_migration_leaves_the_file_at_the_previous_version(v1_path, monkeypatch):
    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE predictions ADD COLUMN half TEXT")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(
        db_module, "MIGRATIONS", (*MIGRATIONS, Migration(LATEST_VERSION + 1, "broken", half_done))
    )
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        Database(v1_path)
    assert user_version(v1_path) == LATEST_VERSION  # migrations 2 and 3 are kept, 4 rolled back whole
    with sqlite3.connect(v1_path) as conn:
        assert "half" not in {row[1] for row in conn.execute("PRAGMA table_info(predictions)")}
