"""`generate --image URL` downloads through the server's fetch code: the same address policy
(loopback/LAN refused unless allow-listed), size cap and time limit, taken from Settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from api_server import local_site, png_bytes

from skyreels_local.cli.generate import read_image
from skyreels_local.config import Settings
from skyreels_local.errors import MediaError
from skyreels_local.media.net import BlockedAddressError

CLI = [sys.executable, "-m", "skyreels_local"]


@pytest.fixture
def site():
    with local_site() as site:
        site.files["in.png"] = png_bytes(40, 30)
        yield site


def test_loopback_url_is_refused_by_default(site):
    with pytest.raises(BlockedAddressError) as caught:
        read_image(f"{site.url}/in.png", Settings())
    message = caught.value.message
    assert "'127.0.0.1' resolves to 127.0.0.1, a loopback address; refused" in message
    assert "--url-allow-list" in message  # says how to allow it


def test_allow_listed_loopback_url_is_downloaded(site):
    image = read_image(f"{site.url}/in.png", Settings(url_allow_list=["127.0.0.1"]))
    assert image.size == (40, 30)
    assert image.mode == "RGB"


def test_allow_listed_cidr_covers_the_host(site):
    image = read_image(f"{site.url}/in.png", Settings(url_allow_list=["127.0.0.0/8"]))
    assert image.size == (40, 30)


def test_redirect_to_a_refused_host_is_refused_on_the_hop(site):
    # The first hop is allow-listed by name, the redirect target (127.0.0.1) is not.
    port = site.url.rpartition(":")[2]
    url = f"http://localhost:{port}/redirect?to={site.url}/in.png"
    with pytest.raises(BlockedAddressError, match="'127.0.0.1' resolves to 127.0.0.1"):
        read_image(url, Settings(url_allow_list=["localhost"]))


def test_declared_size_over_max_download_bytes_is_refused(site):
    size = len(site.files["in.png"])
    settings = Settings(url_allow_list=["127.0.0.1"], max_download_bytes=size - 1)
    with pytest.raises(MediaError, match=f"is {size} bytes, more than the {size - 1} allowed"):
        read_image(f"{site.url}/in.png", settings)


def test_slow_download_stops_at_download_timeout_s(site):
    site.files["slow.png"] = png_bytes(200, 200)  # 588 bytes: 6 pieces 0.5 s apart, 3 s in all
    site.drip_s["slow.png"] = 0.5  # far from the limit: a loaded CI machine cannot blur the two
    settings = Settings(url_allow_list=["127.0.0.1"], download_timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(MediaError, match=r"(took longer than|timed out after) 0\.3s"):
        read_image(f"{site.url}/slow.png", settings)
    assert time.monotonic() - started < 2.0  # stopped at the limit, not at the end of the file


def test_http_error_status_names_the_url(site):
    with pytest.raises(MediaError, match=r"cannot download image '.*/missing.png': HTTP 404"):
        read_image(f"{site.url}/missing.png", Settings(url_allow_list=["127.0.0.1"]))


def run_generate(url: str, tmp_path, *flags: str, env: dict[str, str] | None = None):
    args = ["generate", "--model", "tiny-random", "--image", url, "--prompt", "x"]
    args += ["--out", str(tmp_path / "o.mp4"), *flags]
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.integration
def test_cli_refuses_loopback_url_in_one_line(site, tmp_path):
    result = run_generate(f"{site.url}/in.png", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "a loopback address; refused (allow it with SKYREELS_URL_ALLOW_LIST / --url-allow-list)" in (
        result.stderr
    )
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.integration
@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_allow_list_flag_and_env_let_the_download_through(site, tmp_path, how):
    # Not an image, so the command stops right after the download, before any model load: the
    # error proves the URL passed the policy and was read.
    site.files["notes.txt"] = b"not an image"
    env = dict(os.environ)
    flags: tuple[str, ...] = ()
    if how == "flag":
        flags = ("--url-allow-list", "127.0.0.1")
    else:
        env["SKYREELS_URL_ALLOW_LIST"] = "127.0.0.1"
    result = run_generate(f"{site.url}/notes.txt", tmp_path, *flags, env=env)
    assert result.returncode == 2
    assert f"image URL '{site.url}/notes.txt' is not a readable image" in result.stderr


@pytest.mark.integration
def test_cli_max_download_bytes_flag_caps_the_download(site, tmp_path):
    result = run_generate(
        f"{site.url}/in.png", tmp_path, "--url-allow-list", "127.0.0.1", "--max-download-bytes", "50"
    )
    assert result.returncode == 2
    assert "more than the 50 allowed" in result.stderr
