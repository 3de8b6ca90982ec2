"""The WaveSpeed v3 contract (shared CONTRACT.md), field by field and status by status, over raw
HTTP against a real `skyreels-local serve` with the tiny model behind it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from api_server import API_KEY, MODEL_PATH, auth, data_uri, local_site, png_bytes, running_server

from skyreels_local.video import read_mp4

MAX_UPLOAD = 256 * 1024
HEX32 = re.compile(r"^[0-9a-f]{32}$")
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
# tiny-random's geometry: 64x32 for 16:9, 32x64 for 9:16, 9 frames.
TINY_FRAMES = 9


@pytest.fixture(scope="module")
def site():
    with local_site() as site:
        site.files["boat.png"] = png_bytes(120, 90, (200, 60, 20))
        site.files["not-an-image.png"] = b"this is text, whatever the name says"
        yield site


@pytest.fixture(scope="module")
def server(tmp_path_factory, site):
    data_dir = tmp_path_factory.mktemp("contract") / "data"
    # The local site lives on 127.0.0.1, which the default address policy refuses.
    args = ["--url-allow-list", "127.0.0.1", "--max-upload-bytes", str(MAX_UPLOAD)]
    with running_server(data_dir, args=args) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with server.client() as client:
        yield client


def quick(**fields):
    """A valid, fast request body (1 step on the tiny model)."""
    return {"prompt": "a red boat at dawn", "image": data_uri(), "num_inference_steps": 1, **fields}


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"code", "message", "data"}
    assert body["code"] == status
    assert isinstance(body["message"], str) and body["message"]
    assert set(body["data"]) == {"error"}
    for fragment in fragments:
        assert fragment in body["data"]["error"], body["data"]["error"]
    return body["data"]["error"]


def assert_prediction_shape(server, data: dict) -> None:
    """The fields every prediction object carries, with their types [CONTRACT: data]."""
    assert HEX32.match(data["id"])
    assert data["model"] == "wavespeed-ai/SkyReels-V1"
    assert isinstance(data["outputs"], list)
    assert isinstance(data["has_nsfw_contents"], list)
    assert len(data["has_nsfw_contents"]) == len(data["outputs"])
    assert data["urls"] == {"get": f"{server.base_url}/api/v3/predictions/{data['id']}/result"}
    assert data["status"] in ("created", "processing", "completed", "failed", "cancelled")
    assert RFC3339_Z.match(data["created_at"]), data["created_at"]
    assert isinstance(data["error"], str)
    assert isinstance(data["executionTime"], int) and not isinstance(data["executionTime"], bool)
    assert isinstance(data["timings"]["inference"], int)
    assert 0.0 <= data["progress"] <= 1.0
    assert isinstance(data["queue_position"], int)
    assert isinstance(data["seed"], int) and 0 <= data["seed"] <= 2_147_483_647
    assert data["preset"] == "exact"
    assert "input" not in data
    if data["status"] == "failed":
        assert data["code"] in (1400, 1401, 1402, 1403, 1405, 5000, 5003, 5004)
    else:
        assert "code" not in data


# --- system ----------------------------------------------------------------------------------


def test_health_and_ready_report_model_profile_and_workers(server):
    health = httpx.get(server.base_url + "/health")
    assert health.status_code == 200
    assert health.json()["data"]["status"] == "ok"
    ready = httpx.get(server.base_url + "/ready", headers=auth(server))  # detail needs the key
    assert ready.status_code == 200
    data = ready.json()["data"]
    assert data["ready"] is True
    assert data["model"] == "tiny-random"
    assert data["profile"] == "cpu"
    assert data["preset"] == "exact"
    assert [w["state"] for w in data["workers"]] in (["ready"], ["busy"])
    assert data["workers"][0]["device"] == "cpu"


def test_openapi_documents_the_submit_body_and_bearer_auth(server):
    spec = httpx.get(server.base_url + "/openapi.json").json()
    submit = spec["paths"][MODEL_PATH]["post"]
    schema = submit["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["prompt", "image"]
    assert schema["properties"]["aspect_ratio"]["enum"] == ["16:9", "9:16"]
    assert any(scheme.get("scheme") == "bearer" for scheme in spec["components"]["securitySchemes"].values())
    assert httpx.get(server.base_url + "/docs").status_code == 200


def test_models_list_and_webhook_secret(client):
    models = client.get("/api/v3/models")
    assert models.status_code == 200
    assert [m["model_id"] for m in models.json()["data"]] == ["wavespeed-ai/SkyReels-V1"]
    secret = client.get("/api/v3/webhook/secret").json()["data"]["secret"]
    assert secret.startswith("whsec_") and len(secret) > 20
    assert client.get("/api/v3/webhook/secret").json()["data"]["secret"] == secret  # stable


def test_metrics_count_jobs_by_status(server):
    server.wait(server.submit(quick())["id"])
    text = httpx.get(server.base_url + "/metrics").text
    completed = re.search(r'^skyreels_jobs\{status="completed"\} (\S+)$', text, re.M)
    assert completed and float(completed.group(1)) >= 1
    assert re.search(r"^skyreels_workers_up 1\.0$", text, re.M)


# --- auth ------------------------------------------------------------------------------------


def authed_routes(server) -> list[tuple[str, str]]:
    """Every /api/v3 operation in our own OpenAPI file, with path parameters filled in, so that a
    route added later without auth fails this test."""
    spec = httpx.get(server.base_url + "/openapi.json").json()
    routes = []
    for path, operations in spec["paths"].items():
        if path.startswith("/api/v3/"):
            concrete = re.sub(r"\{[^}]+\}", uuid.uuid4().hex, path)
            routes += [(method.upper(), concrete) for method in operations]
    return routes


def test_every_api_route_requires_the_key(server):
    routes = authed_routes(server)
    assert len(routes) >= 10
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}):
            response = httpx.request(method, server.base_url + path, headers=headers, json={})
            assert_error(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"


def test_auth_is_checked_before_the_body_is_parsed(server):
    for path in ("/api/v3/media/uploads", "/api/v3/predictions", MODEL_PATH, "/api/v3/media/upload/binary"):
        response = httpx.post(
            server.base_url + path, content=b"{broken", headers={"Content-Type": "application/json"}
        )
        assert_error(response, 401)


def test_unknown_model_is_404_once_authenticated(server, client):
    assert_error(httpx.post(server.base_url + "/api/v3/acme/other-model", json=quick()), 401)
    assert_error(client.post("/api/v3/acme/other-model", json=quick()), 404, "acme/other-model")
    assert_error(client.post("/api/v3/wavespeed-ai/skyreels-v1", json=quick()), 404)  # ids are case-sensitive


def test_file_urls_need_a_valid_signature_not_the_key(server, client):
    data = server.wait(server.submit(quick())["id"])
    url = data["outputs"][0]
    assert httpx.get(url).status_code == 200  # no Authorization header
    unsigned = url.split("?")[0]
    assert_error(httpx.get(unsigned), 403, "signature")
    tampered = re.sub(r"signature=[^&]+", "signature=AAAA", url)
    assert_error(httpx.get(tampered), 403)
    expired = re.sub(r"expires=\d+", "expires=1000", url)
    assert_error(httpx.get(expired), 403)
    assert API_KEY not in url


# --- submit and poll -------------------------------------------------------------------------


def test_submit_envelope_and_prediction_fields(server, client):
    before = time.time()
    response = client.post(MODEL_PATH, json=quick(seed=1234))
    assert response.status_code == 200
    body = response.json()
    assert body["code"] == 200 and body["message"] == "success"
    assert "error" not in body
    data = body["data"]
    assert_prediction_shape(server, data)
    assert data["status"] in ("created", "processing")
    assert data["outputs"] == [] and data["has_nsfw_contents"] == []
    assert data["error"] == "" and data["seed"] == 1234
    created = datetime.strptime(data["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    assert before - 1 <= created <= time.time() + 1

    done = server.wait(data["id"])
    assert_prediction_shape(server, done)
    assert done["status"] == "completed" and done["error"] == ""
    assert done["progress"] == 1.0 and done["queue_position"] == 0
    assert done["seed"] == 1234 and done["profile"] == "cpu"
    assert done["executionTime"] > 0 and done["timings"]["inference"] > 0
    assert done["has_nsfw_contents"] == [False]
    (url,) = done["outputs"]
    assert url.startswith(server.base_url + "/files/outputs/")


def test_output_downloads_as_an_mp4_that_decodes(server, tmp_path):
    done = server.wait(server.submit(quick(aspect_ratio="16:9"))["id"])
    response = httpx.get(done["outputs"][0])
    assert response.status_code == 200
    assert response.headers["content-type"] == "video/mp4"
    path = tmp_path / "out.mp4"
    path.write_bytes(response.content)
    frames, fps = read_mp4(path)
    assert frames.shape == (TINY_FRAMES, 32, 64, 3)
    assert fps == 24
    head = httpx.head(done["outputs"][0])  # HEAD too (players probe with it), same headers, no body
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(response.content))


def test_both_result_gets_accept_json_content_type_with_an_empty_body(server, client):
    prediction_id = server.submit(quick())["id"]
    for path in (f"/api/v3/predictions/{prediction_id}/result", f"/api/v3/predictions/{prediction_id}"):
        response = client.request("GET", path, headers={"Content-Type": "application/json"}, content=b"")
        assert response.status_code == 200, response.text
        assert response.json()["data"]["id"] == prediction_id


def test_random_seed_is_drawn_at_submit_and_kept(server):
    first = server.submit(quick(seed=-1))
    second = server.submit(quick())
    assert first["seed"] != second["seed"]  # 1 in 2^31 to collide
    assert server.wait(first["id"])["seed"] == first["seed"]


def test_base64_output_is_bare_base64_of_the_mp4_and_9_16_is_portrait(server, tmp_path):
    done = server.wait(server.submit(quick(enable_base64_output=True, aspect_ratio="9:16"))["id"])
    assert done["status"] == "completed"
    (encoded,) = done["outputs"]
    assert not encoded.startswith("data:")
    path = tmp_path / "b64.mp4"
    path.write_bytes(base64.b64decode(encoded, validate=True))
    frames, _ = read_mp4(path)
    assert frames.shape == (TINY_FRAMES, 64, 32, 3)


def test_unknown_keys_and_nulls_are_accepted(server):
    data = server.submit(
        quick(enable_safety_checker=True, foo={"bar": [1, 2]}, negative_prompt=None, seed=None)
    )
    assert server.wait(data["id"])["status"] == "completed"


def test_image_from_an_http_url(server, site):
    done = server.wait(server.submit(quick(image=f"{site.url}/boat.png"))["id"])
    assert done["status"] == "completed", done["error"]


def test_sync_mode_returns_the_completed_prediction(client, server):
    response = client.post(MODEL_PATH, json=quick(enable_sync_mode=True))
    assert response.status_code == 200
    data = response.json()["data"]
    assert_prediction_shape(server, data)
    assert data["status"] == "completed"
    assert len(data["outputs"]) == 1 and httpx.get(data["outputs"][0]).status_code == 200


# --- failed tasks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        ("{site}/missing.png", "HTTP 404"),
        ("{site}/not-an-image.png", "not a readable image"),
        ("http://10.1.2.3/boat.png", "private-network address"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("{site}/redirect?to=http://127.0.0.2:9/x.png", "loopback"),
        ("data:image/png;base64,!!!not-base64", "not valid base64"),
        ("data:image/png;base64,aGVsbG8=", "not a readable image"),
    ],
)
def test_image_failures_are_failed_tasks_with_code_1402(server, site, image, fragment):
    data = server.submit(quick(image=image.format(site=site.url)))
    done = server.wait(data["id"])
    assert_prediction_shape(server, done)
    assert done["status"] == "failed"
    assert done["code"] == 1402
    assert fragment in done["error"], done["error"]
    assert done["outputs"] == [] and done["has_nsfw_contents"] == []


# --- 400 / 404 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"image": "https://example.com/a.png"}, ["`prompt` is required"]),
        ({"prompt": "x"}, ["`image` is required"]),
        ({"prompt": "", "image": "https://e.com/a.png"}, ["`prompt`", "''"]),
        ({"prompt": "x", "image": "ftp://e.com/a.png"}, ["`image`", "ftp://e.com/a.png"]),
        ({"prompt": "x", "image": 42}, ["`image`", "42"]),
        ({"prompt": "x", "image": "https://e.com/a.png", "seed": "7"}, ["`seed`", "'7'"]),
        ({"prompt": "x", "image": "https://e.com/a.png", "seed": 2**31}, ["`seed`", "2147483648"]),
        ({"prompt": "x", "image": "https://e.com/a.png", "guidance_scale": 25}, ["`guidance_scale`", "25"]),
        (
            {"prompt": "x", "image": "https://e.com/a.png", "num_inference_steps": 0},
            ["`num_inference_steps`", "0"],
        ),
        ({"prompt": "x", "image": "https://e.com/a.png", "aspect_ratio": "4:3"}, ["`aspect_ratio`", "'4:3'"]),
        ({"prompt": "x", "image": "https://e.com/a.png", "enable_sync_mode": "yes"}, ["`enable_sync_mode`"]),
        ({"prompt": "x", "image": "https://e.com/a.png", "negative_prompt": 3}, ["`negative_prompt`", "3"]),
        ({"prompt": "x" * 2001, "image": "https://e.com/a.png"}, ["`prompt`", "at most 2000", "2001"]),
        (
            {"prompt": "x", "image": "https://e.com/a.png", "negative_prompt": "n" * 2001},
            ["`negative_prompt`", "at most 2000", "2001"],
        ),
        ({"prompt": "x", "image": "https://e.com/a.png", "webhook_url": "nope"}, ["`webhook_url`", "'nope'"]),
        (
            {
                "prompt": "x",
                "image": "https://e.com/a.png",
                "webhook_url": "https://h.example/x",
                "enable_base64_output": True,
            },
            ["`enable_base64_output`", "webhook"],
        ),
        (["not", "an", "object"], ["`body`", "list"]),
    ],
)
def test_bad_input_is_a_400_naming_field_and_value(client, body, fragments):
    assert_error(client.post(MODEL_PATH, json=body), 400, *fragments)


def test_malformed_json_and_bad_webhook_query_are_400(client):
    assert_error(
        client.post(MODEL_PATH, content=b"{not json", headers={"Content-Type": "application/json"}),
        400,
        "`body`",
    )
    response = client.post(MODEL_PATH, json=quick(), params={"webhook": "file:///etc/passwd"})
    assert_error(response, 400, "`webhook`", "file:///etc/passwd")


def test_unknown_prediction_is_404_on_every_prediction_route(client):
    missing = uuid.uuid4().hex
    for method, path in [
        ("GET", f"/api/v3/predictions/{missing}/result"),
        ("GET", f"/api/v3/predictions/{missing}"),
        ("POST", f"/api/v3/predictions/{missing}/cancel"),
    ]:
        assert_error(client.request(method, path), 404, missing)
    assert_error(client.get("/no/such/endpoint"), 404)


# --- uploads ---------------------------------------------------------------------------------


def test_ticket_upload_put_without_auth_then_use_as_image(server, client):
    image = png_bytes(80, 60, (10, 200, 10))
    ticket = client.post(
        "/api/v3/media/uploads", json={"filename": "../../etc/in put.png", "size": len(image)}
    )
    assert ticket.status_code == 200, ticket.text
    body = ticket.json()
    assert body["code"] == 200 and body["message"] == "success"
    data = body["data"]
    assert data["type"] == "image" and data["size"] == len(image)
    assert data["filename"] == "in_put.png"  # path parts stripped, odd characters replaced
    assert data["upload"]["method"] == "PUT"
    assert API_KEY not in data["upload"]["url"] and API_KEY not in data["download_url"]
    put = httpx.put(data["upload"]["url"], content=image, headers=data["upload"]["headers"])
    assert 200 <= put.status_code < 300, put.text
    downloaded = httpx.get(data["download_url"])
    assert downloaded.status_code == 200 and downloaded.content == image
    assert downloaded.headers["content-type"] == "image/png"
    done = server.wait(server.submit(quick(image=data["download_url"]))["id"])
    assert done["status"] == "completed", done["error"]


def test_put_url_is_only_good_for_put(client):
    data = client.post("/api/v3/media/uploads", json={"filename": "a.png", "size": 10}).json()["data"]
    put_url = data["upload"]["url"]
    assert_error(httpx.get(put_url), 403)  # a PUT token does not authorize reading
    assert_error(httpx.put(data["download_url"], content=png_bytes()), 403)  # nor a GET token writing


def test_multipart_upload_then_use_as_image(server, client):
    image = png_bytes(64, 64, (250, 250, 0))
    response = client.post("/api/v3/media/upload/binary", files={"file": ("photo.png", image, "image/png")})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["type"] == "image" and data["size"] == len(image) and data["filename"] == "photo.png"
    assert httpx.get(data["download_url"]).content == image
    done = server.wait(server.submit(quick(image=data["download_url"]))["id"])
    assert done["status"] == "completed", done["error"]


def test_upload_errors_400_and_413(client):
    not_image = client.post(
        "/api/v3/media/upload/binary", files={"file": ("x.png", b"plain text", "image/png")}
    )
    assert_error(not_image, 400, "`file`", "image")
    too_big = b"\0" * (MAX_UPLOAD + 1)
    assert_error(client.post("/api/v3/media/upload/binary", files={"file": ("big.png", too_big)}), 413)
    assert_error(
        client.post("/api/v3/media/uploads", json={"filename": "big.png", "size": MAX_UPLOAD + 1}), 413
    )
    ticket = client.post("/api/v3/media/uploads", json={"filename": "b.png", "size": 10}).json()["data"]
    assert_error(httpx.put(ticket["upload"]["url"], content=too_big), 413)
    assert_error(client.post("/api/v3/media/uploads", json={"size": 10}), 400, "`filename` is required")
    assert_error(client.post("/api/v3/media/upload/binary"), 400, "`file` is required")


def test_request_body_over_the_limit_is_413(client):
    huge = {"prompt": "x", "image": "data:image/png;base64," + "A" * (40 * 1024 * 1024)}
    assert_error(client.post(MODEL_PATH, json=huge), 413)


# --- history ---------------------------------------------------------------------------------


def test_history_pages_and_filters(server, client):
    first = server.wait(server.submit(quick())["id"])
    failed = server.wait(server.submit(quick(image="http://10.0.0.1/x.png"))["id"])
    page = client.post("/api/v3/predictions", json={"page": 1, "page_size": 100}).json()["data"]
    ids = [item["id"] for item in page["items"]]
    assert page["page"] == 1 and page["total"] == len(ids) >= 2
    assert ids.index(failed["id"]) < ids.index(first["id"])  # newest first
    for item in page["items"]:
        assert_prediction_shape(server, item)
    only_failed = client.post("/api/v3/predictions", json={"status": "failed"}).json()["data"]["items"]
    assert failed["id"] in [i["id"] for i in only_failed] and {i["status"] for i in only_failed} == {"failed"}
    one = client.post("/api/v3/predictions", json={"page": 2, "page_size": 1}).json()["data"]
    assert len(one["items"]) == 1 and one["items"][0]["id"] == ids[1]
    future = client.post("/api/v3/predictions", json={"created_after": "2999-01-01T00:00:00Z"}).json()["data"]
    assert future["items"] == [] and future["total"] == 0
    assert client.post("/api/v3/predictions").status_code == 200  # empty body = defaults
    assert client.get("/api/v3/predictions", params={"status": "completed"}).status_code == 200
    assert_error(client.post("/api/v3/predictions", json={"page_size": 101}), 400, "`page_size`", "101")
    assert_error(client.post("/api/v3/predictions", json={"status": "done"}), 400, "`status`", "'done'")
    assert_error(
        client.post("/api/v3/predictions", json={"created_after": "yesterday"}), 400, "`created_after`"
    )


# --- webhooks --------------------------------------------------------------------------------


def verify_signature(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver side, written from the hosted documentation (not from our code)."""
    key = secret[len("whsec_") :] if secret.startswith("whsec_") else secret
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = hmac.new(key.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    version, _, signature = headers["webhook-signature"].partition(",")
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) <= 300
    return version == "v3" and fresh and hmac.compare_digest(expected, signature)


@pytest.mark.parametrize("how", ["query", "body"])
def test_webhook_is_delivered_signed_with_the_bare_prediction(server, client, site, how):
    secret = client.get("/api/v3/webhook/secret").json()["data"]["secret"]
    hook = f"{site.url}/hook-{how}"
    body = quick(seed=77)
    data = (
        server.submit(body, webhook=hook) if how == "query" else server.submit({**body, "webhook_url": hook})
    )
    server.wait(data["id"])
    (delivery,) = site.wait_for_path(f"/hook-{how}")
    headers = {k.lower(): v for k, v in delivery.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"] == data["id"]
    assert verify_signature(secret, headers, delivery.body)
    assert not verify_signature(secret, headers, delivery.body + b" ")  # the body is what is signed
    payload = delivery.json()
    assert "code" not in payload and "data" not in payload  # bare object, no envelope
    assert payload["id"] == data["id"] and payload["status"] == "completed"
    assert payload["seed"] == 77
    assert payload["outputs"][0].startswith(server.base_url + "/files/outputs/")
    assert httpx.get(payload["outputs"][0]).status_code == 200
    expected_input = body if how == "query" else {**body, "webhook_url": hook}
    assert payload["input"] == expected_input


def test_failed_task_webhook_carries_the_code(server, site):
    data = server.submit(quick(image=f"{site.url}/missing.png"), webhook=f"{site.url}/hook-failed")
    server.wait(data["id"])
    (delivery,) = site.wait_for_path("/hook-failed")
    payload = delivery.json()
    assert payload["status"] == "failed" and payload["code"] == 1402 and "HTTP 404" in payload["error"]
