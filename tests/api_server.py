"""Test helpers for the HTTP API: a real `skyreels-local serve` process on a loopback port, and a
small local HTTP site that serves images and receives webhooks.

Each API test module starts one server (module-scoped fixture): the tiny model loads once, and
every test talks to a real uvicorn over a real socket, with real worker processes behind it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from PIL import Image
from waiting import wait_until

TESTS_DIR = Path(__file__).resolve().parent
API_KEY = "test-key-0123456789"
MODEL_PATH = "/api/v3/wavespeed-ai/SkyReels-V1"
TERMINAL = ("completed", "failed", "cancelled")


def png_bytes(width: int = 96, height: int = 72, color: tuple[int, int, int] = (0, 128, 128)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes | None = None) -> str:
    return "data:image/png;base64," + base64.b64encode(data or png_bytes()).decode()


@dataclass
class RunningServer:
    base_url: str
    api_key: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen

    def client(self, api_key: str | None = None, **kwargs: Any) -> httpx.Client:
        key = self.api_key if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30.0, **kwargs)

    def submit(self, body: dict[str, Any], **params: Any) -> dict[str, Any]:
        with self.client() as client:
            response = client.post(MODEL_PATH, json=body, params=params or None)
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def get(self, prediction_id: str) -> dict[str, Any]:
        with self.client() as client:
            response = client.get(f"/api/v3/predictions/{prediction_id}/result")
        assert response.status_code == 200, response.text
        return response.json()["data"]

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def wait(
        self, prediction_id: str, *, statuses: tuple[str, ...] = TERMINAL, timeout: float = 120.0
    ) -> dict:
        seen: list[dict] = [{}]

        def reached() -> dict | None:
            seen[0] = self.get(prediction_id)
            return seen[0] if seen[0]["status"] in statuses else None

        return wait_until(
            reached,
            timeout,
            lambda: f"prediction {prediction_id} to reach {statuses} (still {seen[0].get('status')})",
            interval=0.1,
        )

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def auth(server: RunningServer) -> dict[str, str]:
    """The Authorization header of the server's key (/ready shows workers' detail only with it)."""
    return {"Authorization": f"Bearer {server.api_key}"}


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test server: ours only (no SKYREELS_* leaking in from the shell)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREELS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_server(
    data_dir: Path,
    *,
    args: list[str] = (),
    env: dict[str, str] | None = None,
    api_key: str = API_KEY,
    port: int = 0,
) -> RunningServer:
    """Start `serve`; port 0 (the default) lets the server bind a free port, which it reports in
    its --port-file: no window in which another process could take a port we picked."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port_file = data_dir.parent / f"port-{data_dir.name}-{time.monotonic_ns()}"
    log_path = port_file.with_name(port_file.name.replace("port-", "server-") + ".log")
    command = [
        sys.executable, "-m", "skyreels_local", "serve",
        "--model", "tiny-random", "--device", "cpu", "--port", str(port), "--port-file", str(port_file),
        "--data-dir", str(data_dir), "--api-key", api_key, *args,
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env(env))
    bound = _read_port_file(port_file, process, log_path)
    return RunningServer(f"http://127.0.0.1:{bound or port}", api_key, data_dir, log_path, process)


def _read_port_file(port_file: Path, process: subprocess.Popen, log_path: Path) -> int | None:
    """The port the server bound, once it has written it; None if the server exited first (the
    caller's wait_ready or exit-code check then reports why)."""

    def written_or_exited() -> bool:
        return port_file.is_file() or process.poll() is not None

    wait_until(written_or_exited, 120, lambda: f"the server's port file:\n{log_path.read_text()[-3000:]}")
    return int(port_file.read_text()) if port_file.is_file() else None


def wait_ready(server: RunningServer, timeout: float = 240.0, *, path: str = "/ready") -> None:
    """Until `path` answers 200 (`/health` for a server without workers, which is never ready)."""

    def answers_200() -> bool:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            return httpx.get(server.base_url + path, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers_200, timeout, lambda: f"{path} to answer 200:\n{server.log_tail()}", interval=0.25)


def stop_server(server: RunningServer, *, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    if server.process.poll() is None:
        server.process.send_signal(sig)
        try:
            server.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@contextmanager
def running_server(data_dir: Path, *, ready_path: str = "/ready", **kwargs: Any) -> Iterator[RunningServer]:
    server = start_server(data_dir, **kwargs)
    try:
        wait_ready(server, path=ready_path)
        yield server
    finally:
        stop_server(server)


# --- a local site: images to download, a webhook receiver ------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class LocalSite:
    """GET <url>/<name> serves `files[name]`, GET <url>/redirect?to=<url> redirects, /loop redirects forever, anything
    else is 404; POST records the request and answers the next of `post_statuses` (then 200), but
    POST /redirect?to=<url> answers 307 to <url> (a redirect that keeps the method and body).

    Misbehaviour on demand: `declared_length[name]` announces more bytes than are sent (a cut-off
    download); `drip_s[name]` sends the file in 100-byte pieces that far apart (a slow server);
    `post_delays[path]` (else `post_delay_s`) holds a POST that long before answering (a hanging
    webhook receiver)."""

    files: dict[str, bytes] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    post_statuses: list[int] = field(default_factory=list)
    post_delay_s: float = 0.0
    post_delays: dict[str, float] = field(default_factory=dict)
    declared_length: dict[str, int] = field(default_factory=dict)
    drip_s: dict[str, float] = field(default_factory=dict)
    url: str = ""

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        wait_until(
            lambda: len(self.received) >= count,
            timeout,
            lambda: f"{count} requests (received {len(self.received)})",
        )
        return self.received

    def wait_for_path(self, path: str, timeout: float = 30.0) -> list[Received]:
        """The requests received at `path`, once there is at least one."""
        return wait_until(
            lambda: [r for r in self.received if r.path == path], timeout, f"a request to {path}"
        )


@contextmanager
def local_site() -> Iterator[LocalSite]:
    site = LocalSite()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            name = parts.path.lstrip("/")
            if name in site.files:
                data = site.files[name]
                self.send_response(200)
                self.send_header(
                    "Content-Type", "application/octet-stream"
                )  # content is sniffed, not trusted
                self.send_header("Content-Length", str(site.declared_length.get(name, len(data))))
                self.end_headers()
                if name in site.drip_s:
                    try:
                        for start in range(0, len(data), 100):
                            self.wfile.write(data[start : start + 100])
                            self.wfile.flush()
                            time.sleep(site.drip_s[name])
                    except OSError:  # the client gave up
                        pass
                else:
                    self.wfile.write(data)
            elif name in ("redirect", "loop"):  # /redirect?to=<url>; /loop redirects to itself
                self.send_response(302)
                self.send_header(
                    "Location", parse_qs(parts.query)["to"][0] if name == "redirect" else "/loop"
                )
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(404)

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            site.received.append(Received(self.path, dict(self.headers.items()), body))  # on arrival
            parts = urlsplit(self.path)
            if parts.path == "/redirect":  # POST /redirect?to=<url>: 307, the body should follow
                self.send_response(307)
                self.send_header("Location", parse_qs(parts.query)["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            delay = site.post_delays.get(urlsplit(self.path).path, site.post_delay_s)
            if delay:
                time.sleep(delay)
            status = site.post_statuses.pop(0) if site.post_statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    site.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        httpd.shutdown()
        httpd.server_close()
