"""Accounts against one real server: a keys file with `team-a:k1`, `team-a:k2` and `team-b:k3`.
Predictions belong to the account of the key that created them; another account's are 404
everywhere. Also: deleting predictions, DELETE as cancel, the state-only /ready and /health
without a key, and /metrics behind the key (--metrics-require-key).

The tiny engine runs at 0.1 s per step (tests/slow_engine.py): a 1-step job finishes at once, a
LONG one is still running when the test acts on it."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from api_server import MODEL_PATH, data_uri, png_bytes, running_server
from fastapi.testclient import TestClient

from skyreels_local.config import Settings
from skyreels_local.server.api import create_app

LONG = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("accounts")
    keys = root / "keys.txt"
    keys.write_text("# two accounts\nteam-a:k1\nteam-a:k2\nteam-b:k3\n")
    env = {"SKYREELS_ENGINE_FACTORY": "slow_engine:build_engine", "SKYREELS_TEST_STEP_DELAY_S": "0.1"}
    args = ["--api-keys-file", str(keys), "--metrics-require-key"]
    with running_server(root / "data", env=env, args=args, api_key="team-c:k9") as server:
        yield server


def as_key(server, key: str) -> httpx.Client:
    return server.client(api_key=key)


def submit(client: httpx.Client, steps: int = 1, image: str | None = None) -> str:
    body = {"prompt": "p", "image": image or data_uri(), "num_inference_steps": steps}
    response = client.post(MODEL_PATH, json=body)
    assert response.status_code == 200, response.text
    return response.json()["data"]["id"]


def wait(client: httpx.Client, prediction_id: str, statuses=("completed", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        data = client.get(f"/api/v3/predictions/{prediction_id}/result").json()["data"]
        if data["status"] in statuses:
            return data
        time.sleep(0.1)
    raise AssertionError(f"{prediction_id} still {data['status']}")


def history_ids(client: httpx.Client) -> list[str]:
    body = client.post("/api/v3/predictions", json={"page_size": 100}).json()["data"]
    assert body["total"] == len(body["items"])
    return [item["id"] for item in body["items"]]


def assert_not_found(response: httpx.Response, prediction_id: str) -> None:
    assert response.status_code == 404, response.text
    assert response.json() == {
        "code": 404,
        "message": "Not Found",
        "data": {"error": f"prediction {prediction_id!r} not found"},
    }


def test_another_accounts_prediction_is_404_everywhere_and_keys_of_one_account_share(server):
    with as_key(server, "k1") as k1, as_key(server, "k2") as k2, as_key(server, "k3") as k3:
        prediction_id = submit(k1)
        done = wait(k2, prediction_id)  # the other key of team-a polls it
        assert done["status"] == "completed"
        assert k2.get(f"/api/v3/predictions/{prediction_id}").json()["data"]["id"] == prediction_id
        assert prediction_id in history_ids(k1) and prediction_id in history_ids(k2)
        assert prediction_id not in history_ids(k3)
        get_history = k3.get("/api/v3/predictions").json()["data"]["items"]  # the GET form too
        assert prediction_id not in [item["id"] for item in get_history]
        for response in (
            k3.get(f"/api/v3/predictions/{prediction_id}/result"),
            k3.get(f"/api/v3/predictions/{prediction_id}"),
            k3.post(f"/api/v3/predictions/{prediction_id}/cancel"),
            k3.delete(f"/api/v3/predictions/{prediction_id}"),
        ):
            assert_not_found(response, prediction_id)
        unknown = uuid.uuid4().hex
        assert_not_found(k3.get(f"/api/v3/predictions/{unknown}/result"), unknown)  # the same answer
        assert k3.post("/api/v3/predictions/delete", json={"ids": [prediction_id]}).json() == {
            "code": 200,
            "message": "success",
            "data": {"deleted_count": 0},
        }
        # still there for its owner, and its signed output URL is shareable with anyone
        output = k1.get(f"/api/v3/predictions/{prediction_id}/result").json()["data"]["outputs"][0]
        assert httpx.get(output).status_code == 200


def test_delete_removes_the_row_the_input_upload_and_the_outputs(server):
    with as_key(server, "k1") as k1, as_key(server, "k2") as k2, as_key(server, "k3") as k3:
        upload = k1.post(
            "/api/v3/media/upload/binary", files={"file": ("in.png", png_bytes(), "image/png")}
        ).json()["data"]["download_url"]
        prediction_id = submit(k1, image=upload)
        output = wait(k1, prediction_id)["outputs"][0]
        assert httpx.get(output).status_code == 200 and httpx.get(upload).status_code == 200
        other = submit(k3)  # team-b's own prediction is untouched by team-a's delete
        response = k2.post("/api/v3/predictions/delete", json={"ids": [prediction_id, prediction_id, other]})
        assert response.json() == {"code": 200, "message": "success", "data": {"deleted_count": 1}}
        assert_not_found(k1.get(f"/api/v3/predictions/{prediction_id}/result"), prediction_id)
        assert prediction_id not in history_ids(k1)
        assert httpx.get(output).status_code == 404 and httpx.get(upload).status_code == 404
        assert not list((server.data_dir / "outputs").glob(f"{prediction_id}*"))
        assert wait(k3, other)["status"] == "completed"
        # deleting again counts nothing
        again = k1.post("/api/v3/predictions/delete", json={"ids": [prediction_id]}).json()["data"]
        assert again == {"deleted_count": 0}


def test_delete_cancels_running_and_waiting_predictions_first(server):
    with as_key(server, "k1") as k1:
        running, waiting = submit(k1, LONG), submit(k1, LONG)
        wait(k1, running, statuses=("processing",))
        response = k1.post("/api/v3/predictions/delete", json={"ids": [running, waiting]})
        assert response.json()["data"] == {"deleted_count": 2}
        for prediction_id in (running, waiting):
            assert_not_found(k1.get(f"/api/v3/predictions/{prediction_id}/result"), prediction_id)
        # the worker stopped the deleted job (no output appears) and takes the next one
        assert wait(k1, submit(k1))["status"] == "completed"
        assert not list((server.data_dir / "outputs").glob(f"{running}*"))


def test_delete_as_cancel_gives_the_same_answer_as_post_cancel(server):
    with as_key(server, "k2") as k2:
        running, waiting = submit(k2, LONG), submit(k2, LONG)
        wait(k2, running, statuses=("processing",))
        deleted = k2.delete(f"/api/v3/predictions/{waiting}")
        assert deleted.status_code == 200 and deleted.json()["data"]["status"] == "cancelled"
        assert k2.post(f"/api/v3/predictions/{waiting}/cancel").json() == deleted.json()
        first = k2.delete(f"/api/v3/predictions/{running}").json()["data"]
        assert first["id"] == running and first["status"] in ("processing", "cancelled")
        assert wait(k2, running)["status"] == "cancelled"
        # a cancel is not a delete: both stay in the history
        assert {running, waiting} <= set(history_ids(k2))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "ids"),
        ({"ids": "abc"}, "ids"),
        ({"ids": [1, 2]}, "ids"),
        ({"ids": [None]}, "ids"),
        ({"ids": ["a"] * 101}, "ids"),
        ([], "body"),
    ],
)
def test_a_bad_delete_body_is_a_400_naming_the_field(server, body, field):
    with as_key(server, "k1") as k1:
        response = k1.post("/api/v3/predictions/delete", json=body)
    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["code"] == 400 and payload["data"]["error"].startswith(f"`{field}` ")


def test_delete_needs_a_key(server):
    response = httpx.post(server.base_url + "/api/v3/predictions/delete", json={"ids": []})
    assert response.status_code == 401


def test_ready_and_health_show_only_the_state_without_a_valid_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        ready = httpx.get(server.base_url + "/ready", headers=headers)
        assert ready.status_code == 200
        assert ready.json() == {"code": 200, "message": "success", "data": {"ready": True, "state": "ready"}}
        assert httpx.get(server.base_url + "/health", headers=headers).json()["data"] == {"status": "ok"}
    with as_key(server, "k3") as k3:
        detail = k3.get("/ready").json()["data"]
        assert detail["state"] == "ready" and detail["model"] == "tiny-random"
        assert isinstance(detail["workers"][0]["pid"], int) and "version" in k3.get("/health").json()["data"]


def test_metrics_require_a_key_when_configured(server):
    response = httpx.get(server.base_url + "/metrics")
    assert response.status_code == 401 and response.json()["code"] == 401
    with as_key(server, "k3") as k3:
        metrics = k3.get("/metrics")
    assert metrics.status_code == 200 and "skyreels_queue_depth" in metrics.text


def test_legacy_rows_are_visible_only_while_auth_is_off(tmp_path):
    """Rows without an owner (from before accounts, or created with auth off)."""
    data_dir = tmp_path / "data"
    legacy = uuid.uuid4().hex
    with TestClient(create_app(Settings(data_dir=data_dir, workers=0, api_keys=["team-a:k1"]))) as client:
        client.app.state.services.db.predictions.create(
            id=legacy, model="m", input={}, params={}, seed=1, base_url="http://s"
        )
        headers = {"Authorization": "Bearer k1"}
        assert_not_found(client.get(f"/api/v3/predictions/{legacy}", headers=headers), legacy)
        assert client.get("/api/v3/predictions", headers=headers).json()["data"]["total"] == 0
    with TestClient(create_app(Settings(data_dir=data_dir, workers=0))) as client:
        assert client.get(f"/api/v3/predictions/{legacy}").json()["data"]["id"] == legacy
        assert client.get("/api/v3/predictions").json()["data"]["total"] == 1


def test_a_failed_workers_error_and_pid_are_shown_only_with_a_key(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", workers=0, api_keys=["team-a:k1"])
    with TestClient(create_app(settings)) as client:
        store = client.app.state.services.db
        store.workers.register("w0", pid=4242, device="cuda:0")
        store.workers.update("w0", state="failed", error="cannot read /srv/weights/secret-model: denied")
        anonymous = client.get("/ready")
        assert anonymous.status_code == 503
        assert anonymous.json() == {
            "code": 503,
            "message": "Service Unavailable",
            "data": {"ready": False, "state": "failed"},
        }
        assert "secret-model" not in client.get("/health").text
        detail = client.get("/ready", headers={"Authorization": "Bearer k1"}).json()["data"]
        assert detail["state"] == "failed" and detail["workers"][0]["pid"] == 4242
        assert "secret-model" in detail["workers"][0]["error"]
