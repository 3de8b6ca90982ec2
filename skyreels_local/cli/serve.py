"""`skyreels-local serve`: the WaveSpeed v3 HTTP API (uvicorn) with its worker processes.

Every flag has a SKYREELS_* environment twin (`--max-queue` <-> SKYREELS_MAX_QUEUE); a flag
given on the command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
import socket
from pathlib import Path

from ..config import TINY_MODEL, Settings
from ..errors import SkyreelsError, TaskCode
from .settings_flags import HelpFormatter, add_settings_flags, fields_except
from .settings_flags import settings_from_args as settings_from_fields

log = logging.getLogger(__name__)

# Every Settings field is a `serve` flag (a new field gets one without touching this file), but
# these, which the server does not read.
SERVE_EXCLUDED_FIELDS: tuple[str, ...] = ()
SERVE_FIELDS = fields_except(SERVE_EXCLUDED_FIELDS)
# torch device strings the workers accept (torch.device's own syntax, checked without torch).
DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps|xpu|hpu|meta)(:\d+)?")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the WaveSpeed v3 HTTP API",
        description="Serve wavespeed-ai/SkyReels-V1 behind the WaveSpeed v3 HTTP contract. Point a WaveSpeed "
        "client at http://HOST:PORT with one of the API keys. Every flag has a SKYREELS_* environment twin; "
        "a flag given wins over the environment, which wins over the default.",
        formatter_class=HelpFormatter,
    )
    add_settings_flags(p, SERVE_FIELDS)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return settings_from_fields(args, SERVE_FIELDS)


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
    """No real key configured: loopback only, unless --insecure-no-auth (then say so loudly).
    Empty entries (`--api-key "$KEY"` with KEY unset) count as no key: they never turn auth off
    on a public address."""
    from ..server.api.auth import configured_keys  # here: `skyreels-local --help` stays fast

    if settings.api_keys_file and not Path(settings.api_keys_file).expanduser().is_file():
        raise ServeConfigError(f"--api-keys-file {str(settings.api_keys_file)!r} does not exist")
    if configured_keys(settings.api_keys, settings.api_keys_file):
        return
    banner = "!" * 78
    if is_loopback(settings.host) and settings.api_keys_file:
        log.warning(
            "API keys file %s has no key: every API request is refused until one is added",
            settings.api_keys_file,
        )
        return
    if is_loopback(settings.host):
        log.warning(
            "\n%s\n!! no API key configured: authentication is OFF, every request to %s:%d is accepted.\n"
            "!! (Empty --api-key / SKYREELS_API_KEYS / keys-file entries are ignored.) Fine on\n"
            "!! loopback; set a key before exposing the server.\n%s",
            banner, settings.host, settings.port, banner,
        )  # fmt: skip
        return
    if not settings.insecure_no_auth:
        raise ServeConfigError(
            f"refusing to listen on {settings.host} without an API key (empty keys are ignored): set "
            "SKYREELS_API_KEYS, --api-key or --api-keys-file (or pass --insecure-no-auth to serve anyone "
            "who can reach this address)"
        )
    log.warning(
        "\n%s\n!! INSECURE: no API key, listening on %s:%d. ANYONE who can reach this address can\n"
        "!! run jobs and read every prediction. Remove --insecure-no-auth and set an API key.\n%s",
        banner, settings.host, settings.port, banner,
    )  # fmt: skip


def check_startup(settings: Settings) -> None:
    """What can be known before any worker starts: refuse to serve rather than accept jobs that
    no worker could run. A worker's own load errors (a GPU fault) show in /ready and in submits."""
    from ..errors import InvalidInputError
    from ..preset_names import validate_preset
    from ..profile_names import validate_profile_spec

    try:
        validate_preset(settings.preset)
        validate_profile_spec(settings.profile)
    except InvalidInputError as exc:
        raise ServeConfigError(f"--{exc.field} / SKYREELS_{exc.field.upper()}: {exc.message}") from None
    if settings.device is not None:
        check_device(settings.device)
    if settings.model != TINY_MODEL and not settings.engine_factory and settings.workers != 0:
        from ..errors import WeightsError
        from ..weights.layout import check_weights_dir

        try:
            check_weights_dir(settings.model)  # layout, sizes and headers; no hashing
        except WeightsError as exc:
            raise ServeConfigError(f"--model / SKYREELS_MODEL: {exc.message}") from None
    check_safety_checker(settings)


def check_safety_checker(settings: Settings) -> None:
    """A missing or damaged classifier folder stops `serve` here, not each job (no torch: the
    files, config.json's NSFW class and the safetensors headers; safety/policy.py)."""
    from ..safety.policy import SafetyCheckerError, check_folder, resolve_folder

    folder = resolve_folder(settings.safety_checker, settings.model)
    if folder is None or settings.workers == 0:
        return
    try:
        check_folder(folder)
    except SafetyCheckerError as exc:
        raise ServeConfigError(f"--safety-checker / SKYREELS_SAFETY_CHECKER: {exc.message}") from None


BROKER_SCHEMES = ("redis://", "rediss://", "unix://")


def check_broker_url(url: str) -> None:
    if not url.startswith(BROKER_SCHEMES):
        raise ServeConfigError(
            f"--broker / SKYREELS_BROKER: `broker` must be a Redis URL (redis://[:PASSWORD@]HOST:PORT/DB, "
            f"rediss:// for TLS, unix://), got {url.split('@')[-1]!r}"
        )


def with_broker_defaults(settings: Settings) -> Settings:
    """With --broker every job goes to the remote workers (`skyreels-local worker`): no local
    worker is started. Local GPUs join by running `skyreels-local worker --broker` on this host
    too (one queue, shared fairly), so an explicit --workers N > 0 is refused rather than
    running two schedulers over one table."""
    if not settings.broker:
        return settings
    check_broker_url(settings.broker)
    if settings.workers:
        raise ServeConfigError(
            f"--workers {settings.workers} with --broker: jobs go to `skyreels-local worker --broker ...` "
            "processes; start those on this host for its GPUs (one per GPU, --device cuda:N)"
        )
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        raise ServeConfigError("--broker needs Celery: pip install 'skyreels-local[cluster]'") from None
    return settings.model_copy(update={"workers": 0})


def check_device(device: str) -> None:
    if not DEVICE_PATTERN.fullmatch(device):
        raise ServeConfigError(
            f"--device / SKYREELS_DEVICE: `device` must be a torch device such as cpu, cuda or cuda:1, "
            f"got {device!r}"
        )
    if device.startswith("cuda"):
        from ..server.supervisor import visible_gpus

        gpus = visible_gpus()
        index = int(device.partition(":")[2] or 0)
        if index >= len(gpus):
            raise ServeConfigError(
                f"--device / SKYREELS_DEVICE: `device` {device!r} names a GPU this machine does not show "
                f"({len(gpus)} visible: CUDA_VISIBLE_DEVICES / nvidia-smi -L)"
            )


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen here, so the port is known (and reported) before uvicorn serves on it:
    with --port 0 the kernel picks a free one, and no other process can take it meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def write_port_file(path: Path, port: int) -> None:
    # Written whole, then renamed: a reader never sees a half-written number.
    path = path.expanduser()
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{port}\n")
    temporary.replace(path)


def run(args: argparse.Namespace) -> int:
    settings = with_broker_defaults(settings_from_args(args))
    check_bind_policy(settings)
    check_startup(settings)

    import uvicorn

    from ..server.api import create_app
    from ..server.api.limits import KEEP_ALIVE_S, header_timeout_protocol

    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    log.info("listening on %s:%d", settings.host, port)
    if settings.port_file:
        # Reported as soon as it is bound: connections wait in the socket's backlog until uvicorn runs.
        write_port_file(Path(settings.port_file), port)
    app = create_app(settings, log_level=args.log_level)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        log_config=None,  # keep the CLI's logging setup
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=5,  # sync-mode requests would otherwise hold a shutdown open
        # Slow clients: no complete request head in time -> closed; idle keep-alive -> closed
        # after 5 s (uvicorn's default, stated here); past max_connections new requests get 503.
        http=header_timeout_protocol(settings.request_header_timeout_s),
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=settings.max_connections,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
