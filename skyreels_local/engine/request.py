"""What one generation asks for, its validation, and the SkyReels conventions applied to it."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from ..errors import InvalidInputError, MissingInputError

# Upstream SkyReels V1 (video_generate.py): prompts are trained with this prefix.
FPS_PREFIX = "FPS-24, "
OUTPUT_FPS = 24
DEFAULT_NEGATIVE_PROMPT = (
    "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, "
    "bad hands, bad teeth, bad eyes, bad limbs, distortion"
)
ASPECT_RATIOS = ("16:9", "9:16")

# Limits of the hosted API's SkyReels-V1 schema [compat].
SEED_MIN, SEED_MAX = -1, 2_147_483_647
GUIDANCE_MIN, GUIDANCE_MAX = 1.0, 20.0
STEPS_MIN, STEPS_MAX = 1, 50
# Our own limits on the size overrides: beyond these the 13B model does not fit one GPU anyway.
SIZE_MAX = 1920
FRAMES_MAX = 257


@dataclass(frozen=True)
class GenerationRequest:
    """One image-to-video request, in the contract's terms (guidance_scale is the true CFG scale)."""

    prompt: str
    image: Image.Image
    negative_prompt: str | None = None
    seed: int = -1
    guidance_scale: float = 6.0
    num_inference_steps: int = 30
    aspect_ratio: str = "16:9"
    # Overrides of the model's size for the aspect ratio (CLI and server settings; not in the contract).
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise InvalidInputError naming the first bad field."""
        validate_fields(
            prompt=self.prompt,
            seed=self.seed,
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps,
            aspect_ratio=self.aspect_ratio,
            width=self.width,
            height=self.height,
            num_frames=self.num_frames,
        )


def validate_fields(
    *,
    prompt: object = "x",
    seed: object = -1,
    guidance_scale: object = 6.0,
    num_inference_steps: object = 30,
    aspect_ratio: object = "16:9",
    width: object = None,
    height: object = None,
    num_frames: object = None,
) -> None:
    """Validate request fields without building a request (the API validates at submit with this)."""
    if prompt is None:
        raise MissingInputError("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError("prompt", prompt, "must be a non-empty string")
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX:
        raise InvalidInputError("seed", seed, f"must be an integer from {SEED_MIN} to {SEED_MAX}")
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, int | float)
        or not GUIDANCE_MIN <= guidance_scale <= GUIDANCE_MAX
    ):
        raise InvalidInputError(
            "guidance_scale", guidance_scale, f"must be a number from {GUIDANCE_MIN:g} to {GUIDANCE_MAX:g}"
        )
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or not STEPS_MIN <= num_inference_steps <= STEPS_MAX
    ):
        raise InvalidInputError(
            "num_inference_steps", num_inference_steps, f"must be an integer from {STEPS_MIN} to {STEPS_MAX}"
        )
    if aspect_ratio not in ASPECT_RATIOS:
        raise InvalidInputError("aspect_ratio", aspect_ratio, f"must be one of {', '.join(ASPECT_RATIOS)}")
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value % 16 or not 16 <= value <= SIZE_MAX:
            raise InvalidInputError(name, value, f"must be a multiple of 16 from 16 to {SIZE_MAX}")
    if num_frames is not None and (
        isinstance(num_frames, bool)
        or not isinstance(num_frames, int)
        or not 1 <= num_frames <= FRAMES_MAX
        or (num_frames - 1) % 4
    ):
        raise InvalidInputError(
            "num_frames", num_frames, f"must be 4k+1 (1, 5, 9, ..., 97, ...) up to {FRAMES_MAX}"
        )


def with_fps_prefix(prompt: str) -> str:
    """SkyReels expects prompts to start with "FPS-24, "; add it unless the user already did."""
    stripped = prompt.strip()
    if stripped.upper().startswith(FPS_PREFIX.strip().upper()):
        return stripped
    return FPS_PREFIX + stripped


@dataclass(frozen=True)
class ModelGeometry:
    """The sizes a model generates at by default, per aspect ratio (width, height) and frames."""

    sizes: dict[str, tuple[int, int]]
    num_frames: int

    def resolve(self, request: GenerationRequest) -> tuple[int, int, int]:
        """(width, height, num_frames) for a request: the overrides win over the model's defaults."""
        default_w, default_h = self.sizes[request.aspect_ratio]
        return (
            request.width or default_w,
            request.height or default_h,
            request.num_frames or self.num_frames,
        )


# Upstream SkyReels V1: 960x544 (w x h) for 16:9, 544x960 for 9:16, 97 frames at 24 fps.
SKYREELS_GEOMETRY = ModelGeometry(sizes={"16:9": (960, 544), "9:16": (544, 960)}, num_frames=97)
