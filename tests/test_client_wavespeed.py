"""The official WaveSpeed Python client (PyPI `wavespeed` 2.x), unchanged but for base URL and key,
against a real server running the tiny model: the issue's definition of done."""

from __future__ import annotations

import httpx
import pytest
import wavespeed
from api_server import data_uri, local_site, png_bytes, running_server

from skyreels_local.video import read_mp4

MODEL = "wavespeed-ai/SkyReels-V1"
KEY = "client-test-key"


@pytest.fixture(scope="module")
def site():
    with local_site() as site:
        yield site


@pytest.fixture(scope="module")
def server(tmp_path_factory, site):
    data_dir = tmp_path_factory.mktemp("client") / "data"
    with running_server(data_dir, api_key=KEY, args=["--url-allow-list", "127.0.0.1"]) as server:
        yield server


@pytest.fixture
def client(server):
    return wavespeed.Client(base_url=server.base_url, api_key=KEY)


def decode_output(url: str, tmp_path) -> tuple:
    response = httpx.get(url)
    assert response.status_code == 200
    path = tmp_path / "out.mp4"
    path.write_bytes(response.content)
    return read_mp4(path)


def test_run_returns_an_mp4_url_that_decodes(client, server, tmp_path):
    result = client.run(
        MODEL,
        {"prompt": "a lighthouse in fog", "image": data_uri(), "num_inference_steps": 2, "seed": 5},
        poll_interval=0.2,
        timeout=120,
    )
    (url,) = result["outputs"]
    assert url.startswith(server.base_url + "/files/outputs/") and ".mp4" in url
    frames, fps = decode_output(url, tmp_path)
    assert frames.shape == (9, 32, 64, 3) and fps == 24
    assert frames.std() > 0  # random weights give noise, not a blank frame


def test_upload_then_run_with_the_returned_url(client, tmp_path):
    image_path = tmp_path / "input.png"
    image_path.write_bytes(png_bytes(100, 80, (30, 90, 200)))
    url = client.upload(str(image_path))
    assert httpx.get(url).content == image_path.read_bytes()
    result = client.run(
        MODEL,
        {"prompt": "a lighthouse", "image": url, "num_inference_steps": 1, "aspect_ratio": "9:16"},
        poll_interval=0.2,
    )
    frames, _ = decode_output(result["outputs"][0], tmp_path)
    assert frames.shape == (9, 64, 32, 3)


def test_sync_mode(client, tmp_path):
    result = client.run(
        MODEL,
        {"prompt": "waves", "image": data_uri(), "num_inference_steps": 1},
        enable_sync_mode=True,
        timeout=120,
    )
    frames, _ = decode_output(result["outputs"][0], tmp_path)
    assert frames.shape[0] == 9


def test_a_failed_task_surfaces_its_error(client, site):
    with pytest.raises(RuntimeError) as raised:
        client.run(
            MODEL,
            {"prompt": "x", "image": f"{site.url}/gone.png", "num_inference_steps": 1},
            poll_interval=0.2,
        )
    message = str(raised.value)
    assert "Prediction failed" in message and "HTTP 404" in message


def test_a_failed_task_in_sync_mode_and_run_no_throw(client, site):
    with pytest.raises(RuntimeError, match="Prediction failed.*HTTP 404"):
        client.run(MODEL, {"prompt": "x", "image": f"{site.url}/gone.png"}, enable_sync_mode=True)
    result = client.run_no_throw(MODEL, {"prompt": "x", "image": "http://10.9.9.9/a.png"}, poll_interval=0.2)
    assert result["status"] == "failed" and result["outputs"] is None
    assert len(result["task_id"]) == 32 and "private-network" in result["error"]


def test_bad_input_and_bad_key_surface_as_submission_errors(client, server):
    with pytest.raises(RuntimeError, match="HTTP 400.*guidance_scale"):
        client.run(MODEL, {"prompt": "x", "image": data_uri(), "guidance_scale": 99})
    wrong = wavespeed.Client(base_url=server.base_url, api_key="not-the-key")
    with pytest.raises(RuntimeError, match="HTTP 401"):
        wrong.run(MODEL, {"prompt": "x", "image": data_uri()})
    with pytest.raises(RuntimeError, match="HTTP 401"):
        wrong.upload(__file__)


def test_get_result_of_a_finished_task(client):
    result = client.run_no_throw(
        MODEL, {"prompt": "x", "image": data_uri(), "num_inference_steps": 1}, poll_interval=0.2
    )
    full = client.get_result(result["task_id"])
    assert full["code"] == 200 and full["data"]["status"] == "completed"
    assert full["data"]["outputs"] == result["outputs"]
