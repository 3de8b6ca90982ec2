"""Resources under load and slow clients, against a real server process: database connections
stay bounded under polling bursts, a client that never completes its request head is cut off
while slow bodies are not, and unknown /api/v3 routes are 404s in the envelope."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import httpx
import pytest
from api_server import API_KEY, data_uri, local_site, running_server

from skyreels_local.jobs import POOL_SIZE

HEADER_TIMEOUT_S = 2.0
ORPHAN_ID = "ab" * 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("ops") / "data"
    args = [
        "--request-header-timeout-s", str(HEADER_TIMEOUT_S),
        "--url-allow-list", "127.0.0.1",
        # a failing webhook is retried for 3 s (attempts ~0.2, 0.4, 0.8, 1.6 s apart), then dead
        "--webhook-backoff-s", "0.2",
        "--webhook-retry-window-s", "3",
    ]  # fmt: skip
    # What a worker killed mid-encode leaves behind (video.write_mp4's temporary file), and a
    # finished output beside it: the start-up sweep removes the first only.
    (data_dir / "outputs").mkdir(parents=True)
    (data_dir / "outputs" / f".{ORPHAN_ID}.k3j_x9.part.mp4").write_bytes(b"half a video")
    (data_dir / "outputs" / f"{ORPHAN_ID}.mp4").write_bytes(b"a video")
    env = {"SKYREELS_ENGINE_FACTORY": "slow_engine:build_engine", "SKYREELS_TEST_STEP_DELAY_S": "0.01"}
    with running_server(data_dir, args=args, env=env) as server:
        yield server


def open_fds(pid: int) -> list[str]:
    fd_dir = f"/proc/{pid}/fd"
    targets = []
    for name in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            targets.append(os.readlink(f"{fd_dir}/{name}"))
    return targets


def poll_burst(server, prediction_id: str, clients: int = 40, polls_each: int = 1) -> None:
    """`clients` connections polling at once, so the server runs up to 40 threadpool threads."""
    start = Barrier(clients)

    def poll() -> None:
        with server.client() as client:
            start.wait()
            for _ in range(polls_each):
                assert client.get(f"/api/v3/predictions/{prediction_id}/result").status_code == 200

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(poll) for _ in range(clients)]:
            future.result()


@pytest.mark.slow  # ~7-20 s on a busy 2-core machine (120 polls through 40 threads)
def test_polling_bursts_keep_file_descriptors_bounded(server):
    job = server.submit({"image": data_uri(), "prompt": "fd check", "num_inference_steps": 2})
    pid = server.process.pid
    poll_burst(server, job["id"], clients=4)  # warm-up: the pool's steady connections
    time.sleep(0.5)
    baseline = len(open_fds(pid))
    # No idle wait between bursts is needed: the threads of a burst are still alive right after
    # it, which is when per-thread connections (the old design) held the most descriptors
    # (3 per thread: db, -wal, -shm). A pool must stay bounded whether threads live or retire.
    counts = []
    for _ in range(3):
        poll_burst(server, job["id"])
        time.sleep(0.5)  # the clients' sockets are closed; let the server see it
        fds = open_fds(pid)
        counts.append(len(fds))
    database = [target for target in fds if "jobs.sqlite3" in target]
    assert max(counts) - baseline <= 25, (baseline, counts, database)
    # Each pooled connection holds the db file and its -wal; the -shm is shared.
    assert len(database) <= 2 * POOL_SIZE + 1, database


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    sock.settimeout(timeout)
    started = time.monotonic()
    received = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return received, time.monotonic() - started
        received += chunk


def test_a_connection_without_a_complete_request_head_is_closed(server):
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0")  # never finished
        received, waited = read_until_closed(sock, timeout=HEADER_TIMEOUT_S + 8)
    assert received == b""
    assert HEADER_TIMEOUT_S - 0.5 <= waited <= HEADER_TIMEOUT_S + 3, waited


def test_a_keep_alive_connection_that_starts_a_second_request_and_stalls_is_closed(server):
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        first = b""
        while not first.endswith(b"}"):  # the whole first response (headers and JSON body)
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first
        sock.sendall(b"GET /hea")  # the next request starts within keep-alive, then stalls
        received, waited = read_until_closed(sock, timeout=HEADER_TIMEOUT_S + 8)
    assert received == b""
    assert waited <= HEADER_TIMEOUT_S + 3, waited


def test_a_slow_request_body_is_not_cut_off_by_the_head_timeout(server):
    """The head timeout guards only the request head: an upload that takes longer still works."""
    port = int(server.base_url.rsplit(":", 1)[1])
    body = b'{"page": 1, "page_size": 5}'
    head = (
        "POST /api/v3/predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        pieces = [body[i : i + 5] for i in range(0, len(body), 5)]
        for piece in pieces:  # spread over ~1.7x the head timeout
            time.sleep(HEADER_TIMEOUT_S * 1.7 / len(pieces))
            sock.sendall(piece)
        received, _ = read_until_closed(sock, timeout=10)
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert b'"page_size":5' in received


def test_unknown_api_v3_routes_are_404_in_the_envelope(server):
    with server.client() as client:
        for method, path in [
            ("GET", "/api/v3/no-such-thing"),
            ("GET", "/api/v3/predictions/x/result/extra"),
            ("PUT", "/api/v3/foo/bar"),
        ]:
            response = client.request(method, path)
            assert response.status_code == 404, (method, path, response.status_code, response.text)
            assert response.json()["code"] == 404
            assert "allow" not in response.headers
        response = client.post("/api/v3/some-org/Other-Model", json={"prompt": "x"})
        assert response.status_code == 404
        assert response.json()["code"] == 404
        assert "some-org/Other-Model" in response.json()["data"]["error"]


def test_models_entries_carry_id_beside_model_id(server):
    with server.client() as client:
        models = client.get("/api/v3/models").json()["data"]
    assert [m["id"] for m in models] == [m["model_id"] for m in models] == ["wavespeed-ai/SkyReels-V1"]


def test_balance_is_a_fixed_unmetered_balance(server):
    with server.client() as client:
        response = client.get("/api/v3/balance")
    assert response.status_code == 200
    assert response.json() == {
        "code": 200,
        "message": "success",
        "data": {"balance": 1_000_000.0, "currency": "USD", "unmetered": True},
    }


def test_a_known_route_with_the_wrong_method_is_still_405(server):
    with server.client() as client:
        response = client.get("/api/v3/wavespeed-ai/SkyReels-V1")
    assert response.status_code == 405
    assert response.json()["code"] == 405
    assert response.headers["allow"] == "POST"


def test_without_a_key_unknown_routes_still_answer_401(server):
    response = httpx.get(server.base_url + "/api/v3/balance")
    assert response.status_code == 401


def metric(server, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_redirecting_webhook_receiver_is_not_followed_and_the_delivery_dies(server):
    dead_before = metric(server, 'skyreels_webhooks_total{outcome="dead"}')
    with local_site() as site:
        target = f"{site.url}/elsewhere"
        hook = f"{site.url}/redirect?to={target}"
        job = server.submit(
            {"image": data_uri(), "prompt": "redirect", "num_inference_steps": 2}, webhook=hook
        )
        finished = server.wait(job["id"])
        assert finished["status"] == "completed", (finished.get("error"), finished.get("code"))
        deadline = time.monotonic() + 30
        while True:
            with server.client() as client:
                response = client.get(f"/api/v3/predictions/{job['id']}/webhook")
            assert response.status_code == 200, response.text
            deliveries = response.json()["data"]["deliveries"]
            if deliveries and deliveries[0]["status"] == "dead":
                break
            assert time.monotonic() < deadline, deliveries
            time.sleep(0.2)
        paths = [received.path for received in site.received]
    assert len(deliveries) == 1
    delivery = deliveries[0]
    assert delivery["url"] == hook
    assert delivery["attempts"] >= 1
    assert delivery["attempts"] == len(paths)
    assert "HTTP 307" in delivery["last_error"] and "not followed" in delivery["last_error"]
    assert delivery["delivered_at"] is None and delivery["next_attempt_at"] is None
    # every attempt went to the configured URL; the signed body never reached the redirect target
    assert all(path.startswith("/redirect") for path in paths), paths
    assert metric(server, 'skyreels_webhooks_total{outcome="dead"}') == dead_before + 1


def test_webhook_status_of_an_unknown_prediction_is_404(server):
    with server.client() as client:
        response = client.get("/api/v3/predictions/" + "0" * 32 + "/webhook")
    assert response.status_code == 404
    assert response.json()["code"] == 404


def test_unfinished_videos_of_killed_workers_are_removed_at_start_up(server):
    outputs = server.data_dir / "outputs"
    deadline = time.monotonic() + 10  # the sweep runs on its own thread right after start-up
    while (outputs / f".{ORPHAN_ID}.k3j_x9.part.mp4").exists():
        assert time.monotonic() < deadline, sorted(p.name for p in outputs.iterdir())
        time.sleep(0.1)
    assert (outputs / f"{ORPHAN_ID}.mp4").read_bytes() == b"a video"


def test_a_cancel_after_the_last_denoising_step_still_cancels(server):
    job = server.submit(
        {"image": data_uri(), "prompt": "[slow-finish] late cancel", "num_inference_steps": 2}
    )
    # progress reaches 0.95 when the last denoising step is done; decode then takes 3 s
    deadline = time.monotonic() + 60
    while (current := server.get(job["id"]))["progress"] < 0.95:
        assert current["status"] in ("created", "processing") and time.monotonic() < deadline, current
        time.sleep(0.05)
    with server.client() as client:
        answer = client.post(f"/api/v3/predictions/{job['id']}/cancel").json()["data"]
    assert answer["status"] == "processing"  # accepted; the worker is still decoding
    final = server.wait(job["id"])
    assert (final["status"], final["outputs"]) == ("cancelled", [])
    deadline = time.monotonic() + 5  # the worker deletes the video right after recording
    while list(server.data_dir.joinpath("outputs").glob(f"{job['id']}*")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
