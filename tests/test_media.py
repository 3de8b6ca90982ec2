"""Signed URLs, uploads, data: URIs, and the address policy of image downloads."""

from __future__ import annotations

import base64
import io
import ipaddress
import random
import socket
import time

import pytest
from api_server import local_site, png_bytes
from PIL import Image

from skyreels_local.errors import InvalidInputError, MediaError
from skyreels_local.jobs import Database
from skyreels_local.media.fetch import ImageFetcher, decode_data_uri
from skyreels_local.media.net import AddressPolicy, BlockedAddressError, describe_address
from skyreels_local.media.signing import Links, UrlSigner
from skyreels_local.media.uploads import PayloadTooLargeError, UploadStore, safe_filename, sniff_image


@pytest.fixture
def store(tmp_path):
    return Database(tmp_path / "jobs.sqlite3")


@pytest.fixture
def uploads(tmp_path, store):
    return UploadStore(tmp_path / "uploads", store.uploads, max_bytes=100_000)


def fetcher(uploads, allow=(), max_bytes=100_000, timeout_s=5.0):
    return ImageFetcher(
        uploads=uploads,
        signer=UrlSigner("k" * 32),
        policy=AddressPolicy(list(allow)),
        max_bytes=max_bytes,
        timeout_s=timeout_s,
    )


def test_signatures_bind_method_path_and_expiry():
    signer = UrlSigner("secret")
    sig = signer.signature("GET", "/files/outputs/a.mp4", 2_000_000_000)
    assert signer.verify("GET", "/files/outputs/a.mp4", "2000000000", sig)
    assert not signer.verify("PUT", "/files/outputs/a.mp4", "2000000000", sig)
    assert not signer.verify("GET", "/files/outputs/b.mp4", "2000000000", sig)
    assert not signer.verify("GET", "/files/outputs/a.mp4", "2000000001", sig)
    assert not signer.verify("GET", "/files/outputs/a.mp4", "2000000000", sig, now=2_000_000_001)
    assert not UrlSigner("other").verify("GET", "/files/outputs/a.mp4", "2000000000", sig)
    assert not signer.verify("GET", "/files/outputs/a.mp4", "soon", sig)


def test_output_links_are_stable_and_expire_with_retention():
    links = Links(UrlSigner("s"), retention_s=7 * 86400)
    first = links.output("http://h:1", "abc.mp4", finished_at=1000.0)
    assert first == links.output("http://h:1", "abc.mp4", finished_at=1000.0)
    assert f"expires={1000 + 7 * 86400}" in first and first.startswith("http://h:1/files/outputs/abc.mp4?")


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("photo.png", "photo.png"),
        ("../../etc/passwd", "passwd"),
        ("a b?.png", "a_b_.png"),
        ("..", "upload"),
        ("", "upload"),
    ],
)
def test_safe_filename(name, safe):
    assert safe_filename(name) == safe


def test_data_uris():
    assert (
        decode_data_uri("data:image/png;base64," + base64.b64encode(b"abc").decode(), max_bytes=10) == b"abc"
    )
    assert decode_data_uri("data:,a%20b", max_bytes=10) == b"a b"
    with pytest.raises(MediaError, match="larger than 10 bytes"):
        decode_data_uri("data:;base64," + base64.b64encode(b"x" * 100).decode(), max_bytes=10)
    with pytest.raises(MediaError, match="no ','"):
        decode_data_uri("data:image/png;base64", max_bytes=10)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.0.0.8", "private"),
        ("192.168.1.20", "private"),
        ("172.16.5.5", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "reserved"),
        ("100.64.0.1", "non-public"),
        ("fd00:ec2::254", "private"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_classes(address, reason):
    described = describe_address(ipaddress.ip_address(address))
    assert (described is None) if reason is None else (reason in described)


def test_policy_checks_resolved_addresses_and_the_allow_list():
    with pytest.raises(BlockedAddressError, match="'localhost' resolves to .*loopback"):
        AddressPolicy().resolve("localhost", 80)  # a DNS name that resolves to loopback
    with pytest.raises(BlockedAddressError, match="cloud metadata"):
        AddressPolicy().resolve("169.254.169.254", 80)
    assert AddressPolicy().resolve("8.8.8.8", 80) == "8.8.8.8"
    assert AddressPolicy(["localhost"]).resolve("localhost", 80) in ("127.0.0.1", "::1")
    assert AddressPolicy(["127.0.0.0/8"]).resolve("127.0.0.5", 80) == "127.0.0.5"
    with pytest.raises(BlockedAddressError):
        AddressPolicy(["127.0.0.1"]).resolve("127.0.0.5", 80)
    with pytest.raises(MediaError, match="cannot resolve"):
        AddressPolicy().resolve("no-such-host.invalid", 80)


def test_downloads_honour_the_policy_on_every_redirect_hop(uploads):
    with local_site() as site:
        site.files["ok.png"] = png_bytes(40, 30)
        allowed = fetcher(uploads, allow=["127.0.0.1"])
        assert allowed.fetch(f"{site.url}/ok.png").size == (40, 30)
        with pytest.raises(BlockedAddressError, match="loopback"):
            fetcher(uploads).fetch(f"{site.url}/ok.png")  # default policy: loopback refused
        with pytest.raises(BlockedAddressError, match="cloud metadata"):
            allowed.fetch(f"{site.url}/redirect?to=http://169.254.169.254/latest/meta-data/")
        with pytest.raises(BlockedAddressError, match="loopback"):
            allowed.fetch(f"{site.url}/redirect?to=http://127.0.0.2:1/x.png")  # only .1 is allowed
        with pytest.raises(MediaError, match="redirects more than 5 times"):
            allowed.fetch(f"{site.url}/loop")


def test_downloads_are_capped_and_sniffed(uploads):
    with local_site() as site:
        site.files["big.png"] = png_bytes(400, 400) + b"\0" * 200_000
        site.files["text.png"] = b"hello"
        allowed = fetcher(uploads, allow=["127.0.0.1"])
        with pytest.raises(MediaError, match="more than the 100000 allowed"):
            allowed.fetch(f"{site.url}/big.png")
        with pytest.raises(MediaError, match="not a readable image"):
            allowed.fetch(f"{site.url}/text.png")
        with pytest.raises(MediaError, match="HTTP 404"):
            allowed.fetch(f"{site.url}/nothing.png")


def test_decompression_bombs_are_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 MP, a few KB on disk
    assert bomb.stat().st_size < 100_000
    with pytest.raises(MediaError, match="more than the 64,000,000 allowed"):
        sniff_image(bomb)


def test_upload_store_and_own_upload_urls(uploads):
    image = png_bytes(30, 20)
    upload = uploads.new(filename="in.png", size=len(image), content_type=None)
    with pytest.raises(PayloadTooLargeError):
        uploads.new(filename="big.png", size=100_001, content_type=None)
    tmp, handle = uploads.open_writer(upload)
    handle.write(image)
    handle.close()
    uploads.finish(upload, tmp, len(image))
    assert uploads.file(upload).read_bytes() == image
    stored = uploads.store.get(upload.id)
    assert stored.complete and stored.content_type == "image/png" and stored.size == len(image)

    f = fetcher(uploads)  # default policy: loopback refused, so a local read proves no HTTP happened
    links = Links(f.signer, retention_s=3600)
    url = links.upload_download("http://127.0.0.1:9", stored)
    assert f.own_upload(url).id == upload.id
    assert f.fetch(url).size == (30, 20)
    assert f.own_upload(url.replace("127.0.0.1:9", "studio.example")).id == upload.id  # any host
    forged = url.replace("signature=", "signature=x")
    assert f.own_upload(forged) is None
    with pytest.raises(BlockedAddressError):
        f.fetch(forged)  # not ours: treated as a foreign URL, and loopback is refused

    not_image = uploads.new(filename="x.png", size=4, content_type=None)
    tmp, handle = uploads.open_writer(not_image)
    handle.write(b"text")
    handle.close()
    with pytest.raises(InvalidInputError, match="`file` must be an image"):
        uploads.finish(not_image, tmp, 4)
    assert not tmp.exists() and not uploads.file(not_image).exists()


def test_sniffing_ignores_the_claimed_type(tmp_path):
    path = tmp_path / "photo.png"  # a JPEG named .png
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue())
    assert sniff_image(path) == ("image/jpeg", 8, 8)


# --- issue 4: SSRF by name, the allow-list by name, and broken or hostile inputs ---------------


def test_a_dns_name_that_resolves_to_loopback_is_refused_and_a_named_allow_list_admits_it(uploads):
    # `localhost` is a real DNS name resolved by the system resolver (no hosts-file edits, no
    # network): it resolves to loopback, so it is refused unless allowed by name or by CIDR.
    with local_site() as site:
        site.files["ok.png"] = png_bytes(40, 30)
        by_name = site.url.replace("127.0.0.1", "localhost") + "/ok.png"
        with pytest.raises(BlockedAddressError, match="'localhost' resolves to .*loopback"):
            fetcher(uploads).fetch(by_name)
        assert fetcher(uploads, allow=["localhost"]).fetch(by_name).size == (40, 30)
        # Allowing one name allows nothing else on the same address.
        with pytest.raises(BlockedAddressError, match="'127.0.0.1' resolves to 127.0.0.1, a loopback"):
            fetcher(uploads, allow=["localhost"]).fetch(f"{site.url}/ok.png")
        # ... and a redirect from the allowed name to a private address is refused on that hop.
        with pytest.raises(BlockedAddressError, match="private-network address"):
            fetcher(uploads, allow=["localhost"]).fetch(
                site.url.replace("127.0.0.1", "localhost") + "/redirect?to=http://10.0.0.1/x.png"
            )


def test_truncated_and_slow_downloads_fail_clearly(uploads):
    buffer = io.BytesIO()
    Image.frombytes("RGB", (100, 50), random.Random(0).randbytes(100 * 50 * 3)).save(buffer, "PNG")
    whole = buffer.getvalue()  # ~15 KB that do not compress away
    assert len(whole) > 5000
    with local_site() as site:
        site.files["cut.png"] = whole[: len(whole) // 2]  # a whole response of half a PNG
        site.files["short.png"] = whole[:300]
        site.declared_length["short.png"] = len(whole)  # the connection closes early
        site.files["slow.png"] = whole
        site.drip_s["slow.png"] = 0.2  # 100 bytes every 0.2 s: many seconds in all
        allowed = fetcher(uploads, allow=["127.0.0.1"], timeout_s=1.0)
        with pytest.raises(MediaError, match="'http://127.0.0.1:.*/cut.png' is not a readable image"):
            allowed.fetch(f"{site.url}/cut.png")
        with pytest.raises(MediaError, match="cannot download image .*short.png.*RemoteProtocolError"):
            allowed.fetch(f"{site.url}/short.png")
        started = time.monotonic()
        with pytest.raises(MediaError, match=r"slow.png' took longer than 1s|slow.png' timed out after 1s"):
            allowed.fetch(f"{site.url}/slow.png")
        assert time.monotonic() - started < 3.0


def test_a_decompression_bomb_download_is_refused_before_decoding(uploads):
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, "PNG")  # 81 MP in a few KB
    with local_site() as site:
        site.files["bomb.png"] = bomb.getvalue()
        with pytest.raises(MediaError, match="9000x9000 pixels, more than the 64,000,000 allowed"):
            fetcher(uploads, allow=["127.0.0.1"]).fetch(f"{site.url}/bomb.png")
        with pytest.raises(MediaError, match="9000x9000 pixels"):
            fetcher(uploads).fetch("data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode())


def test_connections_try_every_allowed_address_of_a_name(monkeypatch, uploads):
    # A dual-stack name whose first address refuses the connection (as `localhost` -> ::1 does
    # for a server that listens on 127.0.0.1 only) is reached on its next address.
    real = socket.getaddrinfo

    def two_addresses(host, port, *args, **kwargs):
        if host == "images.studio.test":
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.9", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    with local_site() as site:
        site.files["ok.png"] = png_bytes(20, 10)
        url = site.url.replace("127.0.0.1", "images.studio.test") + "/ok.png"
        assert fetcher(uploads, allow=["images.studio.test"]).fetch(url).size == (20, 10)
        with pytest.raises(BlockedAddressError, match="'images.studio.test' resolves to 127.0.0.9"):
            fetcher(uploads, allow=["127.0.0.1"]).fetch(url)  # one refused address refuses the name
