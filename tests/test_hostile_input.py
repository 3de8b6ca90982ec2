"""Hostile input never gets a 500 (issue 14): every case below was a 500 with a traceback, or an
input accepted that should not be. Against a real server (one per module, no URL allow-list,
so loopback/private addresses are refused as in production), plus unit tests of the pure parts:
strict JSON in and out, and the image format allow-list."""

from __future__ import annotations

import base64
import io
import json
import math

import httpx
import pytest
from api_server import MODEL_PATH, data_uri, running_server
from fastapi import params
from fastapi.routing import APIRoute
from PIL import Image

from skyreels_local.config import Settings
from skyreels_local.errors import InvalidInputError, MediaError
from skyreels_local.media.images import allowed_formats, decode_image, detect_format
from skyreels_local.server import strict_json
from skyreels_local.server.api import create_app
from skyreels_local.server.api.responses import StrictJSONResponse

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
IMAGE = data_uri()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("hostile") / "data"
    with running_server(data_dir) as server:
        yield server
        # Nothing in this module may have produced a traceback (in the API or in a worker).
        assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log_tail(200)


def strict(response: httpx.Response) -> dict:
    """The reply's JSON, parsed as strictly as we parse requests (no NaN/Infinity)."""
    return json.loads(response.content, parse_constant=lambda name: pytest.fail(f"{name} in {response.text}"))


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    body = strict(response)
    assert body["code"] == status and set(body) == {"code", "message", "data"}, body
    for fragment in fragments:
        assert fragment in body["data"]["error"], body
    return body["data"]["error"]


def post_raw(server, text: str, path: str = MODEL_PATH, **params: str) -> httpx.Response:
    """POST a hand-written JSON text (httpx's json= would refuse or escape what we send)."""
    with server.client() as client:
        return client.post(
            path, content=text.encode(), params=params or None, headers={"Content-Type": "application/json"}
        )


def submit_text(**fields: str) -> str:
    """A submit body with some fields given as raw JSON text (a valid prompt and image otherwise)."""
    raw = {"prompt": '"a boat"', "image": json.dumps(IMAGE), "num_inference_steps": "2", **fields}
    return "{" + ",".join(f"{json.dumps(name)}:{value}" for name, value in raw.items()) + "}"


# --- /files/: non-ASCII query values -----------------------------------------------------------


FILE_ROUTES = [
    ("GET", f"/files/outputs/{'a' * 32}.mp4"),
    ("HEAD", f"/files/outputs/{'a' * 32}.mp4"),
    ("GET", f"/files/uploads/{'b' * 32}/x.png"),
    ("HEAD", f"/files/uploads/{'b' * 32}/x.png"),
    ("PUT", f"/files/uploads/{'b' * 32}/x.png"),
]


@pytest.mark.parametrize(("method", "path"), FILE_ROUTES)
@pytest.mark.parametrize(
    "query",
    [
        {"expires": "9999999999", "signature": "é"},
        {"expires": "9999999999", "signature": "\u0663" * 43},
        {"expires": "\u0661\u0662\u0663", "signature": "abc"},  # Arabic-Indic digits
        {"expires": "9" * 5000, "signature": "abc"},
        {"expires": "1_000", "signature": "abc"},
    ],
)
def test_files_routes_answer_403_to_odd_signatures_and_expiries(server, method, path, query):
    response = httpx.request(
        method, server.base_url + path, params=query, content=b"x" if method == "PUT" else None
    )
    assert response.status_code == 403, response.text
    if method != "HEAD":
        assert_error(response, 403, "signature is invalid")


# --- submit body: URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://[::1", "http://[abc]/", "http://exa\x00mple.com/"])
@pytest.mark.parametrize("where", ["image", "webhook_url", "webhook"])
def test_unparsable_urls_are_a_400_naming_the_field(server, url, where):
    if where == "webhook":
        response = post_raw(server, submit_text(), webhook=url)
    else:
        response = post_raw(server, submit_text(**{where: json.dumps(url)}))
    assert_error(response, 400, f"`{where}`", "must be an http(s) URL")


@pytest.mark.parametrize("host", ["0177.0.0.1", "0x7f.1", "2130706433", "127.1", "0x7f000001", "10.0.0.01"])
@pytest.mark.parametrize("where", ["image", "webhook_url"])
def test_legacy_ipv4_forms_are_a_400_naming_the_field(server, host, where):
    response = post_raw(server, submit_text(**{where: json.dumps(f"http://{host}/x.png")}))
    assert_error(response, 400, f"`{where}`", "dotted-decimal", repr(host))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://[::1]:9/hook", "loopback"),
        ("http://10.1.2.3/hook", "private-network"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://localhost:9/hook", "loopback"),
    ],
)
@pytest.mark.parametrize("where", ["webhook_url", "webhook"])
def test_a_webhook_the_address_policy_refuses_is_a_400_at_submit(server, url, reason, where):
    if where == "webhook":
        response = post_raw(server, submit_text(), webhook=url)
    else:
        response = post_raw(server, submit_text(webhook_url=json.dumps(url)))
    assert_error(response, 400, f"`{where}` is refused", reason, "url-allow-list")


def test_a_public_webhook_is_still_accepted(server):
    # An address literal: no DNS lookup in the test. The delivery itself fails in the background.
    response = post_raw(server, submit_text(webhook_url='"http://8.8.8.8:9/hook"'))
    assert response.status_code == 200, response.text
    assert strict(response)["data"]["status"] == "created"


# --- submit body: numbers, nesting, text ------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({"seed": "9" * 5000}, ["`seed`", "at most 40 digits", "integer of 5000 characters"]),
        ({"seed": "-" + "9" * 5000}, ["`seed`", "at most 40 digits"]),
        ({"guidance_scale": "1" * 5000 + ".5"}, ["`guidance_scale`", "at most 40 characters"]),
        ({"guidance_scale": "1e400"}, ["`guidance_scale`", "finite number", "1e400"]),
        ({"guidance_scale": "NaN"}, ["`guidance_scale`", "NaN and Infinity are not JSON", "'NaN'"]),
        ({"seed": "Infinity"}, ["`seed`", "'Infinity'"]),
        ({"extra": '[1, {"deep": -Infinity}]'}, ["`extra.1.deep`", "'-Infinity'"]),
        ({"extra": "[" * 5000 + "]" * 5000}, ["`body`", "deeper than 32 levels"]),
        ({"extra": "[" * 40 + "]" * 40}, ["`extra.0.0.0", "deeper than 32 levels"]),
        ({"prompt": '"a \\ud800 boat"'}, ["`prompt`", "lone surrogate", "a \ufffd boat"]),
        ({"negative_prompt": '"\\udfff"'}, ["`negative_prompt`", "lone surrogate"]),
        ({"extra": '{"\\ud800": 1}'}, ["`extra`", "key that is not valid Unicode"]),
    ],
)
def test_hostile_json_in_a_submit_is_a_400_naming_the_field(server, fields, fragments):
    assert_error(post_raw(server, submit_text(**fields)), 400, *fragments)


def test_a_body_that_is_not_utf8_is_a_400(server):
    with server.client() as client:
        response = client.post(
            MODEL_PATH, content=b'{"prompt": "\xff"}', headers={"Content-Type": "application/json"}
        )
    assert_error(response, 400, "`body` must be UTF-8")


def test_a_valid_unicode_body_is_still_accepted(server):
    # A proper surrogate pair (an emoji) and a 40-digit number elsewhere are fine.
    response = post_raw(server, submit_text(prompt='"a boat \\ud83d\\udea4"', extra="1" + "0" * 39))
    assert response.status_code == 200, response.text
    data = strict(response)["data"]
    assert data["status"] == "created"


@pytest.mark.parametrize(
    ("path", "text", "fragments"),
    [
        ("/api/v3/predictions", '{"page": NaN}', ["`page`", "'NaN'"]),
        ("/api/v3/predictions", '{"page": ' + "9" * 5000 + "}", ["`page`", "at most 40 digits"]),
        ("/api/v3/predictions", '{"status": "\\ud800"}', ["`status`", "lone surrogate"]),
        ("/api/v3/media/uploads", '{"filename": "a.png", "size": Infinity}', ["`size`", "'Infinity'"]),
        (
            "/api/v3/media/uploads",
            '{"filename": "a.png", "size": ' + "9" * 5000 + "}",
            ["`size`", "40 digits"],
        ),
        ("/api/v3/media/uploads", '{"filename": "\\ud800.png", "size": 3}', ["`filename`", "lone surrogate"]),
        (
            "/api/v3/media/uploads",
            '{"filename": "a.png", "size": -1}',
            ["`size`", "greater than or equal to 0"],
        ),
        ("/api/v3/media/uploads", '{"filename": "a.png"}', ["`size` is required"]),
    ],
)
def test_every_json_body_route_is_strict(server, path, text, fragments):
    assert_error(post_raw(server, text, path=path), 400, *fragments)


def test_every_json_body_is_read_by_the_strict_parser():
    """A route with a pydantic body parameter would bypass strict_json (FastAPI parses it with
    plain json.loads): JSON bodies go through deps.json_body; only multipart forms may be body
    parameters."""
    app = create_app(Settings(workers=0))
    lenient = [
        f"{sorted(route.methods)} {route.path}"
        for route in app.routes
        if isinstance(route, APIRoute)
        and route.body_field is not None
        and not isinstance(route.body_field.field_info, params.Form)  # File is a Form
    ]
    assert lenient == []


# --- history paging ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "fragments"),
    [
        ({"page": str(10**20)}, ["`page`", "from 1 to 1000000000", str(10**20)]),
        ({"page": str(2**63)}, ["`page`", "from 1 to 1000000000"]),
        ({"page": "-5"}, ["`page`", "-5"]),
        ({"page": "9" * 5000}, ["`page`"]),
        ({"page_size": str(10**20)}, ["`page_size`", "from 1 to 100"]),
        ({"page_size": "-1"}, ["`page_size`", "-1"]),
        ({"page_size": "101"}, ["`page_size`", "101"]),
    ],
)
def test_history_page_extremes_are_a_400_naming_the_param(server, query, fragments):
    with server.client() as client:
        error = assert_error(client.get("/api/v3/predictions", params=query), 400, *fragments)
        assert len(error) < 400  # a 5000-digit value is shortened in the message
    body = "{" + ",".join(f'"{key}": {value}' for key, value in query.items()) + "}"
    assert_error(post_raw(server, body, path="/api/v3/predictions"), 400, *fragments[:1])


def test_the_largest_page_is_an_empty_page(server):
    with server.client() as client:
        response = client.get("/api/v3/predictions", params={"page": 10**9, "page_size": 100})
    assert response.status_code == 200, response.text
    data = strict(response)["data"]
    assert data["page"] == 10**9 and data["items"] == []


# --- images: the format allow-list --------------------------------------------------------------------


def image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 30)).save(buffer, fmt)
    return buffer.getvalue()


ALLOWED = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]


@pytest.mark.parametrize("fmt", ALLOWED)
def test_each_allowed_format_is_decoded(fmt):
    image = decode_image(image_bytes(fmt), source="the `image` data: URI")
    assert image.size == (24, 16) and image.mode == "RGB"
    red, green, _blue = image.getpixel((12, 8))
    assert red > 150 and green < 80


def test_the_allow_list_has_the_safe_formats_and_never_eps():
    assert set(ALLOWED) <= set(allowed_formats())
    assert set(allowed_formats()) <= {*ALLOWED, "AVIF", "HEIF"}


@pytest.mark.parametrize(
    ("data", "detected"),
    [(EPS, "EPS"), (image_bytes("PCX"), "PCX"), (image_bytes("PPM"), "PPM"), (b"hello", None)],
)
def test_other_formats_are_refused_naming_the_detected_format(data, detected):
    with pytest.raises(MediaError) as caught:
        decode_image(data, source="the `image` data: URI")
    message = caught.value.message
    assert message.startswith("the `image` data: URI is not a readable image"), message
    assert "PNG, JPEG, WEBP, GIF, BMP, TIFF" in message
    if detected:
        assert f"it is {detected}," in message
    assert detect_format(data[:64]) == detected


@pytest.mark.parametrize("fmt", ALLOWED)
def test_each_allowed_format_can_be_uploaded(server, fmt):
    with server.client() as client:
        response = client.post(
            "/api/v3/media/upload/binary", files={"file": (f"a.{fmt.lower()}", image_bytes(fmt))}
        )
    assert response.status_code == 200, response.text
    assert strict(response)["data"]["size"] == len(image_bytes(fmt))


def test_an_eps_upload_is_a_400_naming_the_field_and_format(server):
    with server.client() as client:
        response = client.post("/api/v3/media/upload/binary", files={"file": ("boat.eps", EPS)})
    assert_error(response, 400, "`file` must be an image", "it is EPS", "'boat.eps'")


def test_an_eps_data_uri_fails_the_task_with_1402_and_never_reaches_ghostscript(server):
    eps_uri = "data:application/postscript;base64," + base64.b64encode(EPS).decode()
    data = server.submit({"prompt": "a boat", "image": eps_uri, "num_inference_steps": 2})
    done = server.wait(data["id"])
    assert done["status"] == "failed" and done["code"] == 1402, done
    assert "`image` data: URI" in done["error"] and "it is EPS" in done["error"], done["error"]
    assert "Ghostscript" not in server.log_path.read_text(errors="replace")


# --- strict JSON out ---------------------------------------------------------------------------------


def test_non_finite_floats_are_written_as_null():
    value = {"a": float("nan"), "b": [float("inf"), -math.inf, 1.5], "c": {"d": (float("nan"),)}, "e": "NaN"}
    assert strict_json.dumps(value) == b'{"a":null,"b":[null,null,1.5],"c":{"d":[null]},"e":"NaN"}'
    response = StrictJSONResponse({"progress": float("nan"), "text": "é"})
    assert response.body == '{"progress":null,"text":"é"}'.encode()
    assert strict_json.dumps({"text": "é"}, ensure_ascii=True) == b'{"text":"\\u00e9"}'


def test_strict_loads_accepts_what_json_allows_and_refuses_the_rest():
    assert strict_json.loads(b'{"a": [1, 2.5, -3e2, "\\ud83d\\udea4", null, true]}') == {
        "a": [1, 2.5, -300.0, "\U0001f6a4", None, True]
    }
    assert strict_json.loads("1" * 40) == int("1" * 40)
    for text, field in [("[NaN]", "0"), ('{"x": {"y": 1e999}}', "x.y"), ('{"s": ["\\udc00"]}', "s.0")]:
        with pytest.raises(InvalidInputError) as caught:
            strict_json.loads(text)
        assert caught.value.field == field, caught.value.message
    with pytest.raises(InvalidInputError, match="must be valid JSON"):
        strict_json.loads(b"{nope")
