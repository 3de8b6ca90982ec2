"""The app factory without workers (in-process): readiness, auth modes, base URLs, and the
guarantee that the HTTP process never imports torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from api_server import MODEL_PATH, data_uri, server_env
from fastapi.testclient import TestClient

from skyreels_local.config import Settings
from skyreels_local.server.api import create_app
from skyreels_local.server.api.auth import ApiKeys, bare_key_account
from skyreels_local.server.api.services import DataDirInUseError


def app_client(tmp_path, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path / "data", workers=0, **settings)))


def submit_body():
    return {"prompt": "p", "image": data_uri(), "num_inference_steps": 1}


def test_the_http_process_never_imports_torch(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from fastapi.testclient import TestClient
        import skyreels_local.cli, skyreels_local.cli.serve
        from skyreels_local.server.api import create_app
        from skyreels_local.config import Settings

        app = create_app(Settings(data_dir={str(tmp_path / "data")!r}, workers=0, api_keys=["k"]))
        with TestClient(app) as client:
            headers = {{"Authorization": "Bearer k"}}
            body = {{"prompt": "p", "image": "https://example.com/a.png"}}
            assert client.post("{MODEL_PATH}", json=body, headers=headers).status_code == 200
            assert client.get("/ready").status_code == 503
            assert client.get("/metrics").status_code == 200
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "diffusers", "transformers")))
        assert not loaded, loaded
        print("torch-free")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=server_env())
    assert result.returncode == 0, result.stderr
    assert "torch-free" in result.stdout


def test_ready_is_503_in_the_envelope_until_a_worker_is_up(tmp_path):
    with app_client(tmp_path, api_keys=["k"]) as client:
        anonymous = client.get("/ready")
        assert anonymous.status_code == 503
        assert anonymous.json()["data"] == {"ready": False, "state": "loading"}  # the state only
        response = client.get("/ready", headers={"Authorization": "Bearer k"})
        assert response.status_code == 503
        body = response.json()
        assert body["code"] == 503 and body["message"] == "Service Unavailable"
        assert body["data"]["ready"] is False and "no worker" in body["data"]["error"]
        assert body["data"]["model"] == Settings().model and body["data"]["preset"] == "exact"
        # jobs are accepted while no worker runs; they wait
        data = client.post(MODEL_PATH, json=submit_body(), headers={"Authorization": "Bearer k"}).json()[
            "data"
        ]
        assert data["status"] == "created" and data["queue_position"] == 1
        # a worker that registers and reports ready makes the server ready
        services = client.app.state.services
        services.db.workers.register("w9", pid=1, device="cuda")
        services.db.workers.update("w9", state="ready", model="/weights", profile="bf16-resident")
        ready = client.get("/ready", headers={"Authorization": "Bearer k"}).json()["data"]
        assert ready["ready"] is True and ready["model"] == "/weights" and ready["profile"] == "bf16-resident"


def test_one_server_per_data_dir(tmp_path):
    first = app_client(tmp_path)
    with first, pytest.raises(DataDirInUseError, match="in use by another server"), app_client(tmp_path):
        pass
    with app_client(tmp_path) as client:  # released on shutdown
        assert client.get("/health").status_code == 200


def test_without_any_key_configured_auth_is_off(tmp_path):
    with app_client(tmp_path) as client:
        assert client.post(MODEL_PATH, json=submit_body()).status_code == 200


def test_public_base_url_wins_over_the_request_host(tmp_path):
    with app_client(tmp_path, public_base_url="https://gpu1.studio.example/") as client:
        data = client.post(MODEL_PATH, json=submit_body()).json()["data"]
        assert data["urls"]["get"] == f"https://gpu1.studio.example/api/v3/predictions/{data['id']}/result"
        ticket = client.post("/api/v3/media/uploads", json={"filename": "a.png", "size": 3}).json()["data"]
        assert ticket["upload"]["url"].startswith("https://gpu1.studio.example/files/uploads/")


def test_the_preset_is_recorded_with_each_prediction(tmp_path):
    with app_client(tmp_path, preset="turbo") as client:
        data = client.post(MODEL_PATH, json=submit_body()).json()["data"]
        assert data["preset"] == "turbo"
        assert client.get(f"/api/v3/predictions/{data['id']}").json()["data"]["preset"] == "turbo"


def test_keys_file_is_reread_when_it_changes(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# studio keys\nold-key\n")
    with app_client(tmp_path, api_keys_file=keys) as client:
        get = lambda key: client.get("/api/v3/models", headers={"Authorization": f"Bearer {key}"})  # noqa: E731
        assert get("old-key").status_code == 200
        assert get("new-key").status_code == 401
        keys.write_text("  # rotated\nnew-key\n\n")
        assert get("new-key").status_code == 200
        assert get("old-key").status_code == 401
        keys.write_text("")
        assert get("new-key").status_code == 401  # an emptied file lets nobody in; it never disables auth


def test_api_keys_semantics(tmp_path):
    assert not ApiKeys([]).enabled
    keys = ApiKeys(["a", "b"])
    assert keys.enabled and keys.check("a") and keys.check("b")
    assert not keys.check("") and not keys.check("ab") and not keys.check("A")
    with pytest.raises(FileNotFoundError):
        ApiKeys([], tmp_path / "missing.txt")


def test_the_retention_sweep_removes_old_predictions_uploads_and_their_files(tmp_path):
    with app_client(tmp_path, retention_days=7, api_keys=["k"]) as client:
        services = client.app.state.services
        store, now = services.db, time.time()
        kept, owner = {}, bare_key_account("k")
        for label, created in (("old", now - 8 * 86400), ("recent", now - 6 * 86400)):
            job_id = uuid.uuid4().hex
            store.predictions.create(
                id=job_id,
                model="m",
                input={},
                params={},
                seed=1,
                base_url="http://s",
                now=created,
                account=owner,
            )
            store.predictions.claim_next("w0", label, now=created)
            store.predictions.complete(
                job_id, label, outputs=[f"{job_id}.mp4"], execution_ms=1, inference_ms=1, now=created
            )
            (services.paths.outputs / f"{job_id}.mp4").write_bytes(b"video")
            upload = store.uploads.create(
                id=uuid.uuid4().hex, filename="in.png", content_type="image/png", size=3, now=created
            )
            services.uploads.file(upload).parent.mkdir(parents=True)
            services.uploads.file(upload).write_bytes(b"png")
            kept[label] = (job_id, upload)
        services.sweep()
        headers = {"Authorization": "Bearer k"}
        old_job, old_upload = kept["old"]
        recent_job, recent_upload = kept["recent"]
        assert client.get(f"/api/v3/predictions/{old_job}", headers=headers).status_code == 404
        assert not (services.paths.outputs / f"{old_job}.mp4").exists()
        assert (
            store.uploads.get(old_upload.id) is None and not services.uploads.file(old_upload).parent.exists()
        )
        assert (
            client.get(f"/api/v3/predictions/{recent_job}", headers=headers).json()["data"]["status"]
            == "completed"
        )
        assert (services.paths.outputs / f"{recent_job}.mp4").read_bytes() == b"video"
        assert services.uploads.file(recent_upload).read_bytes() == b"png"
