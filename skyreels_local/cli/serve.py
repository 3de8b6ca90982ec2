"""`skyreels-local serve`: the WaveSpeed v3 HTTP API (uvicorn) with its worker processes.

Every flag has a SKYREELS_* environment twin (`--max-queue` <-> SKYREELS_MAX_QUEUE); a flag
given on the command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from ..config import Settings
from ..errors import SkyreelsError, TaskCode

log = logging.getLogger(__name__)

# (flag, Settings field, argparse options). Defaults stay None so that unset flags fall through
# to the environment and then to Settings' defaults.
_FLAGS: list[tuple[str, str, dict]] = [
    ("--host", "host", {"help": "address to listen on"}),
    ("--port", "port", {"type": int, "help": "port to listen on"}),
    (
        "--model",
        "model",
        {"help": "`tiny-random` (demo model: random output, runs on CPU) or a weights directory"},
    ),
    (
        "--device",
        "device",
        {"help": "pin one worker to this torch device (e.g. cuda:1); default one per GPU"},
    ),
    ("--profile", "profile", {"help": "memory profile (see configs/)"}),
    ("--preset", "preset", {"help": "speed preset: exact | fp8 | turbo | stock"}),
    ("--data-dir", "data_dir", {"type": Path, "help": "job table, uploads and outputs live here"}),
    ("--api-key", "api_keys", {"action": "append", "help": "an accepted API key (repeatable)"}),
    ("--api-keys-file", "api_keys_file", {"type": Path, "help": "file with one API key per line"}),
    (
        "--insecure-no-auth",
        "insecure_no_auth",
        {"action": "store_const", "const": True, "help": "allow a non-loopback address without any API key"},
    ),
    ("--public-base-url", "public_base_url", {"help": "base of absolute URLs in responses"}),
    ("--workers", "workers", {"type": int, "help": "worker processes (default: one per GPU, or 1)"}),
    ("--sync-wait-s", "sync_wait_s", {"type": float, "help": "longest wait of an enable_sync_mode request"}),
    ("--max-queue", "max_queue", {"type": int, "help": "waiting jobs before submit answers 429"}),
    (
        "--request-header-timeout-s",
        "request_header_timeout_s",
        {"type": float, "help": "close a connection that sends no complete request head this long"},
    ),
    (
        "--max-connections",
        "max_connections",
        {"type": int, "help": "open connections before new requests get 503"},
    ),
    ("--max-upload-bytes", "max_upload_bytes", {"type": int, "help": "largest accepted upload"}),
    ("--max-download-bytes", "max_download_bytes", {"type": int, "help": "largest input image download"}),
    (
        "--download-timeout-s",
        "download_timeout_s",
        {"type": float, "help": "time limit of one image download"},
    ),
    (
        "--url-allow-list",
        "url_allow_list",
        {"help": "comma-separated hosts/CIDRs that image and webhook URLs may reach although not public"},
    ),
    (
        "--retention-days",
        "retention_days",
        {"type": float, "help": "keep predictions, outputs and uploads this long"},
    ),
    ("--webhook-secret", "webhook_secret", {"help": "webhook signing secret (default: generated and kept)"}),
    ("--max-attempts", "max_attempts", {"type": int, "help": "starts of an interrupted job before it fails"}),
    (
        "--job-timeout-s",
        "job_timeout_s",
        {"type": float, "help": "a job running longer fails (code 5004) and its worker is restarted"},
    ),
    (
        "--webhook-timeout-s",
        "webhook_timeout_s",
        {"type": float, "help": "time a webhook receiver gets to answer"},
    ),
    (
        "--webhook-backoff-s",
        "webhook_backoff_s",
        {"type": float, "help": "first webhook retry delay (doubles per failure, at most 10 min)"},
    ),
    (
        "--webhook-retry-window-s",
        "webhook_retry_window_s",
        {"type": float, "help": "undelivered webhooks are retried this long"},
    ),
]


def _env_name(field: str) -> str:
    return "SKYREELS_" + field.upper()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the WaveSpeed v3 HTTP API",
        description="Serve wavespeed-ai/SkyReels-V1 behind the WaveSpeed v3 HTTP contract. Point a WaveSpeed "
        "client at http://HOST:PORT with one of the API keys.",
    )
    defaults = Settings.model_fields
    for flag, field, options in _FLAGS:
        default = defaults[field].get_default(call_default_factory=True)
        shown = "" if default in (None, []) else f", default {default}"
        p.add_argument(
            flag,
            dest=field,
            default=None,
            **{**options, "help": f"{options['help']} [env {_env_name(field)}{shown}]"},
        )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        field: getattr(args, field) for _, field, _ in _FLAGS if getattr(args, field, None) is not None
    }
    return Settings(**overrides)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeConfigError(SkyreelsError):
    http_status = 500
    task_code = TaskCode.SERVICE_UNAVAILABLE


def check_bind_policy(settings: Settings) -> None:
    """No key configured: loopback only, unless --insecure-no-auth (then say so loudly)."""
    if settings.api_keys_file and not Path(settings.api_keys_file).expanduser().is_file():
        raise ServeConfigError(f"--api-keys-file {str(settings.api_keys_file)!r} does not exist")
    if settings.api_keys or settings.api_keys_file:
        return
    if is_loopback(settings.host):
        log.warning(
            "no API key configured: every request to %s:%d is accepted (fine on loopback; set "
            "SKYREELS_API_KEYS or --api-key before exposing the server)", settings.host, settings.port,
        )  # fmt: skip
        return
    if not settings.insecure_no_auth:
        raise ServeConfigError(
            f"refusing to listen on {settings.host} without an API key: set SKYREELS_API_KEYS, --api-key or "
            "--api-keys-file (or pass --insecure-no-auth to serve anyone who can reach this address)"
        )
    banner = "!" * 78
    log.warning(
        "\n%s\n!! INSECURE: no API key, listening on %s:%d. ANYONE who can reach this address can\n"
        "!! run jobs and read every prediction. Remove --insecure-no-auth and set an API key.\n%s",
        banner, settings.host, settings.port, banner,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            print(f"error: --{field.replace('_', '-')} / {_env_name(field)}: {error['msg']}", file=sys.stderr)
        return 2
    check_bind_policy(settings)

    import uvicorn

    from ..api import create_app
    from ..api.limits import KEEP_ALIVE_S, header_timeout_protocol

    app = create_app(settings, log_level=args.log_level)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the CLI's logging setup
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=5,  # sync-mode requests would otherwise hold a shutdown open
        # Slow clients: no complete request head in time -> closed; idle keep-alive -> closed
        # after 5 s (uvicorn's default, stated here); past max_connections new requests get 503.
        http=header_timeout_protocol(settings.request_header_timeout_s),
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=settings.max_connections,
    )
    return 0
