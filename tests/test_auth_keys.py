"""API keys and accounts as pure logic: key entries, the keys file's comment syntax, empty keys,
and the job table's schema upgrade that gives every prediction and upload an owner."""

from __future__ import annotations

import sqlite3
import uuid

from skyreels_local.jobs import Database, migrations
from skyreels_local.server.api.auth import (
    ApiKeys,
    bare_key_account,
    configured_keys,
    parse_key_entry,
    read_keys_file,
)


def test_a_hash_inside_a_key_is_part_of_it_and_only_line_initial_hashes_are_comments(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# studio keys\n   # indented comment\nZx9#pQ7-secret\n\n  team-a:k#1  \n#team-b:off\n")
    assert read_keys_file(keys) == ["Zx9#pQ7-secret", "team-a:k#1"]
    api = ApiKeys([], keys)
    assert api.check("Zx9#pQ7-secret") and not api.check("Zx9")
    assert api.account_of("k#1") == "team-a" and not api.check("k") and not api.check("team-b:off")


def test_an_entry_names_its_account_and_a_bare_key_is_an_account_of_its_own():
    assert parse_key_entry("team-a:SECRET").account == "team-a"
    assert parse_key_entry(" team_b.2 : s3 ").account == "team_b.2"
    bare = parse_key_entry("Zx9#pQ7-secret")
    assert bare.account == bare_key_account("Zx9#pQ7-secret")
    assert bare.account.startswith("key-") and len(bare.account) == 16 and "Zx9" not in bare.account
    assert bare_key_account("Zx9#pQ7-secret") == bare_key_account("Zx9#pQ7-secret")  # stable
    assert bare_key_account("a") != bare_key_account("b")
    # not an account name before the colon: the whole entry is one bare key
    odd = parse_key_entry("not an account:xyz")
    assert odd.account == bare_key_account("not an account:xyz")
    api = ApiKeys(["team-a:k1", "team-a:k2", "team-b:k3", "solo"])
    assert [api.account_of(k) for k in ("k1", "k2", "k3", "solo")] == [
        "team-a",
        "team-a",
        "team-b",
        bare_key_account("solo"),
    ]
    assert api.account_of("team-a:k1") is None  # the account prefix is not part of the key


def test_empty_entries_are_ignored_and_never_turn_auth_on_or_let_an_empty_key_in(tmp_path):
    for entries in ([""], ["  "], ["team-a:"], ["team-a:  "], ["", " ", "team-a:"]):
        assert parse_key_entry(entries[0]) is None
        api = ApiKeys(entries)
        assert not api.enabled, entries  # no real key: auth off (serve refuses a public bind)
        assert configured_keys(entries, None) == []
    api = ApiKeys(["", "real"])
    assert api.enabled and api.check("real") and not api.check("") and not api.check(" ")
    empty_file = tmp_path / "keys.txt"
    empty_file.write_text("# nothing yet\n\n   \n")
    assert configured_keys([""], empty_file) == []
    assert ApiKeys([], empty_file).enabled  # a configured keys file keeps auth on, with no key in
    assert not ApiKeys([], empty_file).check("")


def _old_database(path):
    """A schema-1 database (before accounts) with one finished prediction and one upload."""
    conn = sqlite3.connect(path)
    conn.executescript(migrations.SCHEMA_V1)
    conn.execute(
        """INSERT INTO predictions (id, model, status, seed, base_url, created_at, params, input)
           VALUES ('a' || hex(randomblob(15)), 'm', 'completed', 1, 'http://s', 1.0, '{}', '{}')"""
    )
    conn.execute(
        "INSERT INTO uploads (id, filename, content_type, size, created_at) VALUES ('u1', 'a.png', 'image/png', 3, 1.0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def test_schema_upgrade_gives_old_rows_the_anonymous_owner_and_new_rows_theirs(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    _old_database(path)
    store = Database(path)
    assert store._conn().execute("PRAGMA user_version").fetchone()[0] == migrations.LATEST_VERSION
    (legacy,), _ = store.predictions.history(account=None)
    assert legacy.account is None and store.uploads.get("u1").account is None
    assert store.predictions.history(account="team-a") == ([], 0)  # a keyed account does not see legacy rows
    job_id = uuid.uuid4().hex
    store.predictions.create(
        id=job_id, model="m", input={}, params={}, seed=1, base_url="http://s", account="team-a"
    )
    assert store.predictions.get(job_id).account == "team-a"
    assert [j.id for j in store.predictions.history(account="team-a")[0]] == [job_id]
    assert store.predictions.history(account=None)[1] == 1
    store.close()
    Database(path).close()  # opening an upgraded database again is a no-op


def test_delete_predictions_removes_only_the_owners_rows_and_their_webhooks(tmp_path):
    store = Database(tmp_path / "jobs.sqlite3")
    ids = {}
    for owner in ("team-a", "team-b"):
        ids[owner] = uuid.uuid4().hex
        store.predictions.create(
            id=ids[owner],
            model="m",
            input={"image": "http://h/files/uploads/" + "0" * 32 + "/a.png"},
            params={},
            seed=1,
            base_url="http://s",
            webhook_url="http://hook",
            account=owner,
        )
        store.predictions.request_cancel(ids[owner])  # terminal, with a webhook in the outbox
    deleted = store.predictions.delete([ids["team-a"], ids["team-b"], "nope"], account="team-a")
    assert deleted.ids == [ids["team-a"]]
    assert deleted.inputs == ["http://h/files/uploads/" + "0" * 32 + "/a.png"]
    assert store.predictions.get(ids["team-a"]) is None and store.predictions.get(ids["team-b"]) is not None
    outbox = [row[0] for row in store._conn().execute("SELECT prediction_id FROM webhooks")]
    assert outbox == [ids["team-b"]]
    assert store.predictions.delete([ids["team-b"]], account=None).ids == []


def test_history_filters_by_owner_only_when_asked(tmp_path):
    store = Database(tmp_path / "jobs.sqlite3")
    for owner in ("team-a", None):
        store.predictions.create(
            id=uuid.uuid4().hex, model="m", input={}, params={}, seed=1, base_url="s", account=owner
        )
    assert store.predictions.history()[1] == 2  # operators and tests see every row
    assert [j.account for j in store.predictions.history(account="team-a")[0]] == ["team-a"]
    assert [j.account for j in store.predictions.history(account=None)[0]] == [None]
