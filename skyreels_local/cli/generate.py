"""`skyreels-local generate`: one video from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidInputError
from ..media.images import decode_image, load_image_file
from ..params import (
    ASPECT_RATIOS,
    DEFAULT_ASPECT_RATIO,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    GUIDANCE_MAX,
    GUIDANCE_MIN,
    MAX_PROMPT_CHARS,
    STEPS_MAX,
    STEPS_MIN,
    GenerationParams,
)
from ..safety.gate import SafetyGate
from ..safety.policy import check_folder, config_from_settings
from .settings_flags import HelpFormatter, add_settings_flags, settings_from_args

if TYPE_CHECKING:
    from ..config import Settings

# The Settings fields `generate` reads, each a flag with its SKYREELS_* twin (settings_flags.py);
# data_dir holds the torch.compile cache that the fast presets reuse; the last three govern an
# --image URL, which is fetched exactly as the server fetches an `image` URL; the safety checker's
# three settings work as in `serve` (block: no file is written and the command fails, saying why);
# the last four split one video over a group of processes (README "Several GPUs per video").
GENERATE_FIELDS = (
    "model",
    "device",
    "profile",
    "preset",
    "attention",
    "turbo_threshold",
    "step_cache",
    "data_dir",
    "max_download_bytes",
    "download_timeout_s",
    "url_allow_list",
    "safety_checker",
    "nsfw_threshold",
    "nsfw_action",
    "gpus_per_video",
    "ulysses",
    "cfg_parallel",
    "group_timeout_s",
)

TINY_DEMO_NOTE = (
    "tiny-random is a DEMO model with random weights, so its videos are noise; it renders at a "
    "fixed small size (64x32 for 16:9, 9 frames unless --num-frames) so that it runs in seconds on "
    "a CPU. Real weights render 960x544, 97 frames."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate one video from an image and a prompt",
        description="Generate one image-to-video clip and write it as an H.264 MP4.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--image",
        required=True,
        help="input image: a local file path or an http(s) URL; a URL is fetched as the server "
        "fetches one (--max-download-bytes, --download-timeout-s), and a loopback or LAN host is "
        "refused unless --url-allow-list names it (e.g. --url-allow-list 192.168.1.0/24)",
    )
    p.add_argument(
        "--prompt",
        required=True,
        help=f'text prompt, at most {MAX_PROMPT_CHARS} characters ("FPS-24, " is prefixed unless present)',
    )
    p.add_argument("--out", required=True, type=Path, help="output MP4 path")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: SkyReels' own)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed; -1 draws one and prints it")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=DEFAULT_GUIDANCE_SCALE,
        help=f"true classifier-free guidance scale, {GUIDANCE_MIN:g} to {GUIDANCE_MAX:g} (1 disables CFG)",
    )
    p.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps, {STEPS_MIN} to {STEPS_MAX}"
    )
    p.add_argument(
        "--aspect-ratio", default=DEFAULT_ASPECT_RATIO, choices=ASPECT_RATIOS, help="output aspect ratio"
    )
    p.add_argument("--width", type=int, default=None, help="override the width (multiple of 16)")
    p.add_argument("--height", type=int, default=None, help="override the height (multiple of 16)")
    p.add_argument("--num-frames", type=int, default=None, help="override the frame count (4k+1, e.g. 97)")
    add_settings_flags(p, GENERATE_FIELDS)
    p.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")
    p.set_defaults(func=run)


def read_image(source: str, settings: Settings):
    """A local path, or an http(s) URL downloaded as the server downloads an `image` URL: the same
    size and time limits, redirect cap and address policy. The policy is the server's on purpose:
    one rule to learn, and a URL that works here works when submitted to the server. The CLI user
    fetches their own URL, so a loopback or LAN host is one flag away (--url-allow-list)."""
    if source[:8].lower().startswith(("http://", "https://")):
        from ..media.fetch import download  # httpx loads only when a URL is given
        from ..media.net import AddressPolicy

        data = download(
            source,
            policy=AddressPolicy(settings.url_allow_list),
            max_bytes=settings.max_download_bytes,
            timeout_s=settings.download_timeout_s,
        )
        return decode_image(data, source=f"image URL {source!r}")
    return load_image_file(source)


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    """The flags as GenerationParams; a bad value raises the API's error naming the field."""
    return GenerationParams(
        prompt=args.prompt,
        image=args.image,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        aspect_ratio=args.aspect_ratio,
        width=args.width,
        height=args.height,
        num_frames=args.num_frames,
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, GENERATE_FIELDS)
    if args.out.suffix.lower() != ".mp4":
        raise InvalidInputError("--out", str(args.out), "must end in .mp4")
    # Validate everything cheap before the (possibly minutes-long) model load: the parameters
    # (the same contract and errors as the API's), then the image.
    params = params_from_args(args)
    image = read_image(args.image, settings)
    safety_config = config_from_settings(settings)
    if safety_config.folder is not None:
        check_folder(safety_config.folder)  # a damaged classifier folder fails now, not after the video

    # torch and diffusers load only now, so that bad input fails in well under a second.
    from ..engine.engine import Progress
    from ..engine.request import GenerationRequest
    from ..engine.tiny import TINY_MODEL_NAME
    from ..video import write_mp4
    from ..worker.loading import load_configured_engine

    if settings.model == TINY_MODEL_NAME:
        print(f"note: {TINY_DEMO_NOTE}", file=sys.stderr)
    if settings.gpus_per_video > 1:
        # N processes, this one rank 0 (worker/group.py); a rank that dies ends the command.
        from ..worker.group import launch_group

        engine = launch_group(settings, settings.device, on_group_lost=_group_lost)
    else:
        engine = load_configured_engine(settings, settings.device)
    safety = SafetyGate.load(safety_config, device=engine.device)
    bar = None if args.no_progress or not sys.stderr.isatty() and os.environ.get("CI") else _progress_bar()

    def on_progress(progress: Progress) -> None:
        if bar is not None:
            bar.total = progress.total
            bar.n = progress.step
            bar.set_postfix_str(f"eta {progress.eta_s:.0f}s", refresh=True)

    try:
        result = engine.generate(GenerationRequest(image, params=params), on_progress=on_progress)
    finally:
        if bar is not None:
            bar.close()
        if hasattr(engine, "close"):
            engine.close()
    # Raises OutputBlockedError under --nsfw-action block: then no file is written.
    flagged = safety.review(result.frames, params, label="generate")
    if flagged:
        print("warning: the safety checker flagged this video as NSFW", file=sys.stderr)
    path = write_mp4(result.frames, args.out, fps=result.fps)
    # As the API reports it, one boolean per output (false also when no checker ran: said so);
    # before the summary, which stays the last line.
    print(
        f"has_nsfw_contents: [{str(bool(flagged)).lower()}]"
        + ("" if safety.checker else " (safety checker off)")
    )
    print(
        f"done in {result.timings['total_s']:.1f}s: seed {result.seed}, "
        f"{result.width}x{result.height}, {result.num_frames} frames at {result.fps} fps, "
        f"model {engine.spec.name}, profile {engine.profile}, preset {engine.preset}"
        + (f", {engine.split.describe()}" if hasattr(engine, "split") else "")
        + f" -> {path}"
        + (" (tiny-random: demo size and noise, see README)" if settings.model == TINY_MODEL_NAME else "")
    )
    return 0


def _group_lost(reason: str) -> None:
    # The other ranks are gone; rank 0 would wait in a collective until the group timeout.
    print(f"error: {reason}; no video was written", file=sys.stderr, flush=True)
    os._exit(1)


def _progress_bar():
    from tqdm import tqdm

    return tqdm(total=1, desc="denoising", unit="step", file=sys.stderr, leave=False)
