"""The playground page (`GET /playground`): the schema -> form mapping as unit tests, the route's
headers over HTTP, and the page itself in a real headless Chromium (Debian's `chromium` +
`chromium-driver`, driven by Selenium) against a real `serve --model tiny-random` process.

Outside CI a machine without Chromium skips the browser tests with a reason; in CI (`CI=true`,
where .ci/run installs the browser) a missing browser is a failure. Screenshots are written to
$SKYREELS_TEST_ARTIFACTS (default /tmp/skyreels-test-artifacts).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_server import data_uri, png_bytes, running_server

from skyreels_local.engine.request import GUIDANCE_MAX, GUIDANCE_MIN, SEED_MAX, STEPS_MAX, STEPS_MIN
from skyreels_local.server.api.routes.playground import CSP, form_fields
from skyreels_local.server.schemas import SkyReelsInput

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Root in a container with no network: no sandbox, no GPU, and none of the background calls home.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ARTIFACTS = Path(os.environ.get("SKYREELS_TEST_ARTIFACTS", "/tmp/skyreels-test-artifacts"))
KEY = "playground-key-0123"
TINY_FRAMES, FPS = 9, 24  # the tiny model's videos
DESKTOP = (1280, 1000)

# --- schema -> form (unit) ------------------------------------------------------------------


def test_form_follows_the_input_schema_with_the_api_titles_as_labels():
    fields = {f["name"]: f for f in form_fields(SkyReelsInput.model_json_schema())}
    assert [f["label"] for f in fields.values()] == [
        "Prompt",
        "Negative prompt",
        "Image",
        "Seed",
        "Guidance scale",
        "Steps",
        "Aspect ratio",
    ]
    assert {n: f["widget"] for n, f in fields.items()} == {
        "prompt": "textarea",
        "negative_prompt": "textarea",
        "image": "image",
        "seed": "seed",
        "guidance_scale": "slider",
        "num_inference_steps": "slider",
        "aspect_ratio": "choice",
    }
    guidance, steps, seed = fields["guidance_scale"], fields["num_inference_steps"], fields["seed"]
    assert (guidance["min"], guidance["max"], guidance["step"], guidance["default"]) == (
        GUIDANCE_MIN,
        GUIDANCE_MAX,
        0.1,
        6.0,
    )
    assert (steps["min"], steps["max"], steps["step"], steps["default"]) == (STEPS_MIN, STEPS_MAX, 1, 30)
    assert (seed["min"], seed["max"], seed["default"]) == (-1, SEED_MAX, -1)
    assert fields["aspect_ratio"]["options"] == ["16:9", "9:16"]
    assert [n for n, f in fields.items() if f["required"]] == ["prompt", "image"]
    assert fields["negative_prompt"]["nullable"] is True and fields["prompt"]["nullable"] is False


def test_form_hides_request_options_the_page_handles_itself():
    names = [f["name"] for f in form_fields(SkyReelsInput.model_json_schema())]
    assert not {"enable_sync_mode", "enable_base64_output", "webhook_url"} & set(names)


def test_a_new_schema_field_gets_a_control_from_its_type():
    schema = {
        "properties": {
            "fps": {"type": "integer", "minimum": 8, "maximum": 60, "default": 24, "title": "Fps"},
            "strength": {"type": "number", "minimum": 0, "maximum": 100000, "title": "Motion Strength"},
            "loop": {"type": "boolean", "default": False, "title": "Loop"},
            "style": {"anyOf": [{"enum": ["a", "b"], "type": "string"}, {"type": "null"}], "title": "Style"},
            "prompt": {"type": "string", "title": "Prompt"},
        },
        "required": ["prompt", "fps"],
    }
    fields = form_fields(schema)
    assert [f["name"] for f in fields] == ["prompt", "fps", "strength", "loop", "style"]
    by_name = {f["name"]: f for f in fields}
    assert by_name["fps"] | {"help": ""} == {
        "name": "fps",
        "label": "Fps",
        "required": True,
        "default": 24,
        "help": "",
        "widget": "slider",
        "min": 8,
        "max": 60,
        "step": 1,
        "nullable": False,
    }
    assert by_name["strength"]["widget"] == "number"  # too wide a range for a slider
    assert by_name["strength"]["label"] == "Motion strength"
    assert by_name["loop"]["widget"] == "checkbox"
    assert (by_name["style"]["widget"], by_name["style"]["options"], by_name["style"]["nullable"]) == (
        "choice",
        ["a", "b"],
        True,
    )


# --- the server and the browser ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The slowed tiny engine: a run lasts long enough to watch progress and to cancel.
    env = {"SKYREELS_ENGINE_FACTORY": "slow_engine:build_engine", "SKYREELS_TEST_STEP_DELAY_S": "0.15"}
    with running_server(tmp_path_factory.mktemp("playground") / "data", api_key=KEY, env=env) as server:
        yield server


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


def _new_driver(profile_dir: str, width: int, height: int) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests need Chromium in CI: {missing}")
        pytest.skip(f"no browser here: {missing}")
    profile = tempfile.mkdtemp(prefix="skyreels-chromium-")
    driver = _new_driver(profile, *DESKTOP)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(driver: Any, script: str, timeout: float = 60.0, *args: Any) -> Any:
    """Run `script` (a JS function body returning a value) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            state = driver.execute_script(
                "const t = id => document.getElementById(id).textContent; return [t('status'), t('message')]"
            )
            raise AssertionError(
                f"timed out after {timeout}s waiting for: {script}; status, message: {state}"
            )
        time.sleep(0.05)


def by_label(driver: Any, text: str) -> Any:
    """The control a real <label> with exactly this text names (as a screen reader finds it)."""
    from selenium.webdriver.common.by import By

    label = driver.find_element(By.XPATH, f"//label[normalize-space()='{text}']")
    return driver.find_element(By.ID, label.get_attribute("for"))


def open_page(driver: Any, server: Any) -> None:
    driver.get(server.base_url + "/")  # the root redirects to the playground
    wait_until(driver, "return document.body.dataset.ready === 'true'")


def set_range(driver: Any, element: Any, value: float) -> None:
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
        element,
        value,
    )


def set_text(driver: Any, element: Any, text: str) -> None:
    """Set a long value at once (send_keys types it key by key)."""
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
        element,
        text,
    )


def page_text(driver: Any, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked the network for since the last call (Chromium's DevTools log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def screenshot(driver: Any, name: str) -> Path:
    """The whole page, beyond the window's height, as a PNG artifact (DevTools' capture)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


PROGRESS_WATCH = """
window.progressSeen = [];
new MutationObserver(() => window.progressSeen.push(document.getElementById('progress').value))
  .observe(document.getElementById('progress'), {attributes: true, attributeFilter: ['value']});
"""


@pytest.fixture(scope="module")
def generated(browser, server, tmp_path_factory) -> dict[str, Any]:
    """One generation as a person does it: key, PNG file, prompt, steps, Generate; waits until
    the <video> can play. Returns what the tests below check."""
    image = tmp_path_factory.mktemp("images") / "harbour.png"
    image.write_bytes(png_bytes(120, 80, (20, 110, 160)))
    open_page(browser, server)
    requested_urls(browser)  # start the network log from here
    browser.execute_script("localStorage.clear()")
    by_label(browser, "API key").send_keys(KEY)
    by_label(browser, "Image").send_keys(str(image))
    by_label(browser, "Prompt").send_keys("a harbour at dawn, boats rocking")
    set_range(browser, by_label(browser, "Steps"), 8)
    by_label(browser, "Aspect ratio").send_keys("9:16")
    browser.execute_script(PROGRESS_WATCH)
    started = time.monotonic()
    browser.find_element("xpath", "//button[normalize-space()='Generate']").click()
    wait_until(
        browser,
        "const v = document.getElementById('video'); return v.getAttribute('src') && v.readyState >= 2",
        timeout=120,
    )
    video = browser.execute_script(
        "const v = document.getElementById('video');"
        "return {src: v.getAttribute('src'), duration: v.duration, width: v.videoWidth,"
        " height: v.videoHeight, loop: v.loop, controls: v.controls}"
    )
    wait_until(browser, "return document.querySelector('#history [data-status=completed]')", timeout=30)
    wait_until(browser, "return document.getElementById('video').readyState === 4")  # no spinner
    browser.execute_script("document.getElementById('code-panel').open = true")  # for the screenshot
    result = {
        "video": video,
        "seconds": time.monotonic() - started,
        "progress_seen": browser.execute_script("return window.progressSeen"),
        "status": page_text(browser, "status"),
        "seed_used": page_text(browser, "seed-used"),
        "download": browser.execute_script("return document.getElementById('download').getAttribute('href')"),
        "screenshot": screenshot(browser, "playground.png"),
    }
    result["urls"] = requested_urls(browser)
    return result


# --- HTTP (no browser) ----------------------------------------------------------------------


def test_root_redirects_to_the_playground_which_carries_the_csp(server):
    root = httpx.get(server.base_url + "/")
    assert (root.status_code, root.headers["location"]) == (307, "/playground")
    page = httpx.get(server.base_url + "/playground")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert '<script src="/playground/playground.js" defer></script>' in page.text
    assert "<script>" not in page.text and "style=" not in page.text  # nothing inline to allow
    for asset, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        response = httpx.get(f"{server.base_url}/playground/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert response.headers["content-security-policy"] == CSP


def test_only_the_shipped_assets_are_served(server):
    for name in ("index.html.bak", "..%2Fapp.py", "secret"):
        response = httpx.get(f"{server.base_url}/playground/{name}")
        assert response.status_code == 404, name
    form = httpx.get(server.base_url + "/playground/form.json").json()
    assert form["model"] == "wavespeed-ai/SkyReels-V1"
    assert form["fields"] == form_fields(SkyReelsInput.model_json_schema())


# --- in the browser -----------------------------------------------------------------------------


def test_generate_plays_the_video_with_progress_seed_and_timings(generated):
    video = generated["video"]
    assert "/files/outputs/" in video["src"] and ".mp4" in video["src"]
    assert video["duration"] == pytest.approx(TINY_FRAMES / FPS, abs=0.01)
    assert (video["width"], video["height"]) == (32, 64)  # 9:16 was chosen
    assert video["loop"] is True and video["controls"] is True
    assert generated["download"] == video["src"]
    assert generated["status"] == "completed"
    assert generated["seed_used"].startswith("Seed used: ") and int(generated["seed_used"].split()[-1]) >= 0
    assert any(0 < float(v) < 100 for v in generated["progress_seen"]), generated["progress_seen"]
    assert generated["screenshot"].stat().st_size > 10_000


def test_the_page_loads_nothing_from_elsewhere_and_never_puts_the_key_in_a_url(generated, server):
    urls = generated["urls"]
    assert any(u.startswith(server.base_url + "/api/v3/media/upload/binary") for u in urls)
    assert any(u.startswith(server.base_url + "/files/outputs/") for u in urls)
    foreign = [u for u in urls if not u.startswith((server.base_url + "/", "blob:", "data:"))]
    assert foreign == []
    assert not [u for u in urls if KEY in u]


def test_the_code_panel_shows_curl_and_python_for_the_form(browser, server, generated):
    if not browser.execute_script("return document.getElementById('code-panel').open"):
        browser.find_element("xpath", "//summary[normalize-space()='Code']").click()
    curl = page_text(browser, "code-curl")
    assert f"curl -s -X POST {server.base_url}/api/v3/wavespeed-ai/SkyReels-V1" in curl
    body = json.loads(curl.split("-d '", 1)[1].split("'\n", 1)[0])
    assert body["prompt"] == "a harbour at dawn, boats rocking"
    assert (body["num_inference_steps"], body["aspect_ratio"], body["seed"]) == (8, "9:16", -1)
    assert body["image"].startswith(server.base_url + "/files/uploads/")  # the uploaded file's URL
    browser.find_element("id", "tab-python").click()
    python = page_text(browser, "code-python")
    assert f'wavespeed.Client(base_url="{server.base_url}"' in python
    assert '"prompt": "a harbour at dawn, boats rocking",' in python and "client.run(" in python
    assert KEY not in curl + python  # the snippets read the key from the environment


def test_history_reopens_a_prediction_and_reuses_its_settings(browser, server, generated):
    open_page(browser, server)  # a fresh page: the key comes back from localStorage
    assert by_label(browser, "API key").get_attribute("value") == KEY
    item = wait_until(browser, "return document.querySelector('#history [data-status=completed]')")
    assert "a harbour at dawn" in item.text
    assert page_text(browser, "status") == "idle"
    item.click()
    wait_until(browser, "const v = document.getElementById('video'); return v.readyState >= 2")
    assert page_text(browser, "status") == "completed"
    browser.find_element("xpath", "//button[normalize-space()='Reuse settings']").click()
    assert by_label(browser, "Prompt").get_attribute("value") == "a harbour at dawn, boats rocking"
    assert by_label(browser, "Steps").get_attribute("value") == "8"
    assert by_label(browser, "Aspect ratio").get_attribute("value") == "9:16"
    assert "/files/uploads/" in by_label(browser, "or Image URL").get_attribute("value")


def test_cancel_stops_a_running_prediction(browser, server, generated):
    open_page(browser, server)
    by_label(browser, "Prompt").send_keys("a long one, cancelled")
    # A data: URI image, so no upload; 50 slowed steps take long enough to cancel.
    set_text(browser, by_label(browser, "or Image URL"), data_uri())
    set_range(browser, by_label(browser, "Steps"), STEPS_MAX)
    browser.find_element("xpath", "//button[normalize-space()='Generate']").click()
    wait_until(browser, "return document.getElementById('status').textContent.startsWith('processing')")
    assert page_text(browser, "elapsed").endswith(" s")
    browser.find_element("id", "cancel").click()
    wait_until(browser, "return document.getElementById('status').textContent === 'cancelled'", timeout=30)
    assert browser.find_element("id", "cancel").get_attribute("disabled") is not None


def test_a_wrong_key_shows_the_401_message(browser, server, generated):
    open_page(browser, server)
    key = by_label(browser, "API key")
    key.clear()
    key.send_keys("not-the-key")
    by_label(browser, "Prompt").send_keys("anything")
    by_label(browser, "or Image URL").send_keys(server.base_url + "/files/uploads/none/x.png")
    try:
        browser.find_element("xpath", "//button[normalize-space()='Generate']").click()
        message = wait_until(
            browser, "const m = document.getElementById('message'); return !m.hidden && m.textContent"
        )
    finally:  # the page kept the wrong key for next time: the other tests need the right one
        browser.execute_script("localStorage.setItem('skyreels.playground.apiKey', arguments[0])", KEY)
    assert message == (
        "The server refused the API key (401 Unauthorized: invalid API key). "
        "Enter a valid key in the API key field."
    )
    assert page_text(browser, "status") == "idle"


def test_the_csp_blocks_an_image_from_another_origin(browser, server, generated):
    open_page(browser, server)
    blocked = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "document.addEventListener('securitypolicyviolation', e => done([e.blockedURI, e.effectiveDirective]));"
        "const img = document.createElement('img'); img.src = 'http://192.0.2.1/pixel.png';"
        "document.body.append(img);"
    )
    assert blocked == ["http://192.0.2.1/pixel.png", "img-src"]


def test_the_page_fits_a_narrow_screen(browser, server, generated):
    browser.set_window_size(390, 844)
    try:
        open_page(browser, server)
        layout = browser.execute_script(
            "const r = id => document.getElementById(id).getBoundingClientRect();"
            "return {scroll: document.documentElement.scrollWidth, width: window.innerWidth,"
            " input: r('input-heading'), output: r('output-heading'), generate: r('generate')}"
        )
        screenshot(browser, "playground-narrow.png")
    finally:
        browser.set_window_size(*DESKTOP)
    assert layout["scroll"] <= layout["width"]  # no sideways scrolling
    assert layout["output"]["top"] > layout["generate"]["bottom"]  # one column: output below the form
    assert layout["generate"]["right"] <= layout["width"]


def test_drop_and_paste_set_the_image_with_a_preview(browser, server, generated):
    open_page(browser, server)
    # What a drop or a paste hands the page: a DataTransfer holding an image file.
    make_file = "const dt = new DataTransfer(); dt.items.add(new File([new Uint8Array(arguments[0])], arguments[1], {type: 'image/png'}));"
    png = list(png_bytes(40, 30))
    preview_src = (
        "const p = document.getElementById('image-preview'); return !p.hidden && p.getAttribute('src')"
    )
    browser.execute_script(
        make_file + "document.getElementById('dropzone').dispatchEvent("
        "new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));",
        png,
        "dropped.png",
    )
    dropped = wait_until(browser, preview_src)
    assert dropped.startswith("blob:" + server.base_url)
    assert "file=@dropped.png" in page_text(browser, "code-curl")  # the Code panel uploads it first
    browser.execute_script(
        make_file
        + "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));",
        png,
        "pasted.png",
    )
    pasted = wait_until(
        browser, preview_src + " !== arguments[0] && " + preview_src.split("return ")[1], 10, dropped
    )
    assert pasted.startswith("blob:") and pasted != dropped
    assert "file=@pasted.png" in page_text(browser, "code-curl")


def test_a_failed_prediction_shows_its_error_text(browser, server, generated):
    open_page(browser, server)
    by_label(browser, "Prompt").send_keys("[oom] too big for this GPU")  # slow_engine's OOM marker
    set_text(browser, by_label(browser, "or Image URL"), data_uri())
    set_range(browser, by_label(browser, "Steps"), 2)
    browser.find_element("xpath", "//button[normalize-space()='Generate']").click()
    status = wait_until(
        browser, "const s = document.getElementById('status').textContent; return s.startsWith('failed') && s"
    )
    error = page_text(browser, "error-text")
    assert error and status == "failed: " + error
    assert "out of memory" in error.lower()
    assert browser.execute_script("return document.getElementById('video').hidden") is True
