"""One Settings object, built once per process; the only place that reads SKYREELS_* variables.

Every field is a CLI flag with an environment twin (`--data-dir` <-> `SKYREELS_DATA_DIR`); the
flag wins. The flags, their help and defaults are derived from these fields (cli/settings_flags.py),
so every field needs a `description`. Tests build their own Settings and pass it in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .preset_names import DEFAULT_STEP_CACHE, PRESETS, STEP_CACHES

DEFAULT_WEIGHTS_DIR = Path("weights")
TINY_MODEL = "tiny-random"  # the built-in demo model (engine/tiny.py); importable without torch
# A list read from one comma-separated environment variable (not JSON).
CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SKYREELS_", extra="ignore")

    # --- model -------------------------------------------------------------------------------
    model: str = Field(
        default=str(DEFAULT_WEIGHTS_DIR),
        description="`tiny-random` (built-in demo model, random output) or a weights directory",
    )
    device: str | None = Field(
        default=None,
        description="torch device, e.g. cpu, cuda, cuda:1 (serve: pins one worker to it); "
        "default: cuda when present (serve: one worker per GPU), else cpu",
    )
    profile: str = Field(
        default="auto",
        description="memory profile: auto (picked from free VRAM), a built-in one (80gb, 48gb, 24gb, "
        "sequential, cpu) or a profile file",
    )
    preset: str = Field(
        default="exact",
        description="speed preset: stock (diffusers as shipped), exact (same output, faster), fp8 (GPU "
        "cc>=8.9, slightly different output), turbo (step caching: fastest, output changes)",
        json_schema_extra={"choices": PRESETS},
    )
    attention: str = Field(
        default="auto",
        description="attention backend for the fast presets: auto (probe the installed kernels), a "
        "diffusers backend name such as _native_cudnn, _flash_3, sage, or one of our kernels: fa4, and "
        "with fp8/turbo cudnn-fp8, te-fp8, flashinfer-fp8, sage1 (falls back to auto when missing)",
    )
    turbo_threshold: float = Field(
        default=0.15, ge=0, description="turbo's First Block Cache threshold: higher reuses more steps"
    )
    step_cache: str = Field(
        default=DEFAULT_STEP_CACHE,
        description="turbo's step cache: fbcache (First Block Cache, --turbo-threshold), taylorseer "
        "(TaylorSeer lite, fixed interval) or magcache (MagCache with HunyuanVideo's published ratios)",
        json_schema_extra={"choices": STEP_CACHES},
    )
    # --- several GPUs per video (engine/parallel.py, worker/group.py) -------------------------
    gpus_per_video: int = Field(
        default=1,
        ge=1,
        description="processes (one per GPU; gloo processes with --device cpu) that generate one video "
        "together; serve starts visible GPUs / N such groups",
    )
    ulysses: int | None = Field(
        default=None,
        ge=1,
        description="expert: Ulysses (sequence-parallel) degree; must divide the 24 heads; default: "
        "--gpus-per-video / 2 with CFG-parallel, else --gpus-per-video",
    )
    cfg_parallel: bool | None = Field(
        default=None,
        description="expert: run the two CFG branches on the two halves of the group; default: on when "
        "--gpus-per-video is even",
    )
    group_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="a rank of a --gpus-per-video group waiting this long in one collective fails the job "
        "and restarts the group",
    )

    # --- safety checker (README "Safety checker") ---------------------------------------------
    safety_checker: str = Field(
        default="auto",
        description="NSFW check of every finished video: auto (on when <weights>/safety_checker/ "
        "exists; weights/ for tiny-random), off, or the folder of an image classifier",
    )
    nsfw_threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="a video is flagged when a sampled frame's NSFW probability is above this",
    )
    nsfw_action: Literal["flag", "block"] = Field(
        default="flag",
        description="flag: keep the video, has_nsfw_contents [true]; block: keep no video, the "
        "prediction fails with an error saying why",
        json_schema_extra={"choices": ("flag", "block")},
    )
    allow_disable_safety_checker: bool = Field(
        default=False,
        description="honour a request's enable_safety_checker: false (otherwise it is ignored)",
    )

    # --- server ------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on; 0 picks a free one")
    port_file: Path | None = Field(
        default=None,
        description="once listening, write the bound port to this file (useful with --port 0)",
    )
    data_dir: Path = Field(default=Path("data"), description="job table, uploads and outputs live here")

    # --- API server (`skyreels-local serve`) ---------------------------------------------------
    api_keys: CommaList = Field(
        default_factory=list, description="bearer keys the API accepts (env: comma-separated)"
    )
    api_keys_file: Path | None = Field(
        default=None, description="file with one API key per line (# comments); re-read when it changes"
    )
    insecure_no_auth: bool = Field(
        default=False, description="serve without any API key on a non-loopback address (dangerous)"
    )
    metrics_require_key: bool = Field(
        default=False, description="/metrics answers 401 without a valid API key (when auth is on)"
    )
    public_base_url: str | None = Field(
        default=None,
        description="base of the absolute URLs in responses, e.g. https://gpu1.studio.lan; "
        "default: the scheme and host the request came to",
    )
    workers: int | None = Field(
        default=None,
        ge=0,
        description="worker processes: default one per visible GPU, one on a CPU-only machine; "
        "0 starts none (jobs wait for workers started separately)",
    )
    sync_wait_s: float = Field(
        default=600.0, gt=0, description="enable_sync_mode: longest wait before replying `processing` + 5004"
    )
    max_queue: int = Field(default=500, ge=1, description="waiting jobs before a submit is answered 429")
    request_header_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a connection that has not sent a complete request head (request line and headers) "
        "this long after opening, or after its previous response, is closed; bodies and answers are not limited",
    )
    max_connections: int = Field(
        default=500,
        ge=1,
        description="open client connections (or running requests) past which new requests get 503",
    )
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="largest accepted upload")
    max_download_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1, description="largest input image download"
    )
    download_timeout_s: float = Field(default=30.0, gt=0, description="time limit of one image download")
    url_allow_list: CommaList = Field(
        default_factory=list,
        description="hosts or CIDRs that image and webhook URLs may reach although they are not public "
        "(loopback, LAN, link-local); everything else non-public is refused (env: comma-separated)",
    )
    retention_days: float = Field(
        default=7.0, gt=0, description="predictions, outputs and uploads are kept this long"
    )
    webhook_secret: str | None = Field(
        default=None,
        description="webhook signing secret (whsec_...); default: generated once, kept in the data dir",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="time a webhook receiver gets to answer")
    webhook_retry_window_s: float = Field(
        default=24 * 3600.0, gt=0, description="undelivered webhooks are retried with backoff for this long"
    )
    webhook_backoff_s: float = Field(
        default=2.0, gt=0, description="first webhook retry delay; it doubles per failure, up to 10 minutes"
    )
    job_timeout_s: float = Field(
        default=7200.0,
        gt=0,
        description="a job running longer than this fails with code 5004 and its worker is restarted "
        "(a hung step, a stuck GPU); allow for the slowest profile on the slowest card",
    )
    max_attempts: int = Field(
        default=2, ge=1, description="times a job is started before an interrupted job fails with code 5000"
    )
    prefetch_prompts: bool = Field(
        default=True,
        description="a worker encodes the next queued job's prompts while the current one denoises "
        "(or, when the text encoders are offloaded, between jobs), so the next job starts denoising at once",
    )
    # --- several machines (skyreels_local/cluster, README "Several machines") -----------------
    broker: str | None = Field(
        default=None,
        description="Redis URL of the Celery broker (redis://[:PASSWORD@]HOST:PORT/DB, rediss:// for TLS; "
        "keep Redis private): serve hands jobs to `skyreels-local worker` processes on any host "
        "(--workers then defaults to 0); worker takes them",
    )
    cluster_heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        description="with --broker: a worker's heartbeat period; a job whose worker is silent for about 6 "
        "of them is dispatched again (an attempt)",
    )
    broker_visibility_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="with --broker: Redis redelivers a task taken by a worker that vanished (host down) "
        "after this; must exceed the longest job; default --job-timeout-s + 600",
    )
    broker_send_window: int | None = Field(
        default=None,
        ge=1,
        description="with --broker: jobs sent to Redis but not yet started, at most (each carries its input "
        "image; the rest wait in the job table, in order); default twice the live workers of the model, "
        "at least 2",
    )
    engine_factory: str | None = Field(
        default=None,
        description="advanced: `module:function(settings, device)` returning an Engine; default loads --model",
    )

    @field_validator("api_keys", "url_allow_list", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
