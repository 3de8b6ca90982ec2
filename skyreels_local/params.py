"""One generation's parameters: every field, its default, its limits and the SkyReels semantics.

This is the one parameter contract between the edges and the worker. The API's submit body and
the `generate` flags are turned into a `GenerationParams` where they enter (that is where they
are validated, once); the server stores it as its JSON in the job row (`params`), and the worker
reads it back unchanged and hands it to the engine. The conventions SkyReels V1 was trained with
live here too, so that no other module decides them: the "FPS-24, " prompt prefix, the default
negative prompt, whether true classifier-free guidance runs, the seed drawn for -1 and the size
per aspect ratio. No torch, no PIL: the HTTP process imports this module.

Why a pydantic model rather than a frozen dataclass: it is frozen and round-trips its JSON for
free (`to_json` / `from_json`), and its fields carry their limits into the OpenAPI schema. Every
check runs in one `mode="before"` validator that raises our `InvalidInputError`, so a bad value is
the contract's 400 naming the field and the value (`guidance_scale` must be a number from 1 to
20, got 25), fields are checked in a fixed order (the first bad one is reported) and pydantic's own
multi-error `ValidationError` never reaches a user.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InvalidInputError, MissingInputError

# Upstream SkyReels V1 (video_generate.py): prompts are trained with this prefix.
FPS_PREFIX = "FPS-24, "
OUTPUT_FPS = 24
DEFAULT_NEGATIVE_PROMPT = (
    "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, "
    "bad hands, bad teeth, bad eyes, bad limbs, distortion"
)
ASPECT_RATIOS = ("16:9", "9:16")

# Defaults of the hosted API's SkyReels-V1 schema [compat]; the CLI and the worker use the same.
DEFAULT_SEED = -1  # draw one
DEFAULT_GUIDANCE_SCALE = 6.0
DEFAULT_STEPS = 30
DEFAULT_ASPECT_RATIO = ASPECT_RATIOS[0]

# Limits of the hosted API's SkyReels-V1 schema [compat].
SEED_MIN, SEED_MAX = -1, 2_147_483_647
GUIDANCE_MIN, GUIDANCE_MAX = 1.0, 20.0
STEPS_MIN, STEPS_MAX = 1, 50
# Our own limits on the size overrides: beyond these the 13B model does not fit one GPU anyway.
SIZE_MAX = 1920
FRAMES_MAX = 257
# Our own cap on prompt and negative prompt length. The text encoders see at most a few hundred
# tokens (the Llama encoder 256, CLIP 77) and the pipeline truncates the rest; 2,000 characters
# (about 400-500 English tokens) is generous for any real prompt and keeps a job row small.
MAX_PROMPT_CHARS = 2000


def cfg_enabled(guidance_scale: float) -> bool:
    """Whether true classifier-free guidance runs (a second, unconditional pass per step).

    The one place this is decided; diffusers' pipeline uses the same rule (scale above 1)."""
    return guidance_scale > 1.0


def with_fps_prefix(prompt: str) -> str:
    """SkyReels expects prompts to start with "FPS-24, "; add it unless the user already did."""
    stripped = prompt.strip()
    if stripped.upper().startswith(FPS_PREFIX.strip().upper()):
        return stripped
    return FPS_PREFIX + stripped


def draw_seed() -> int:
    """A fresh seed for `seed: -1`, in the contract's range."""
    return secrets.randbelow(SEED_MAX + 1)


class GenerationParams(BaseModel):
    """Everything one image-to-video generation asks for, validated (construction raises
    InvalidInputError / MissingInputError naming the first bad field)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, description='what happens ("FPS-24, " is prefixed)'
    )
    # The first frame as the caller named it: a URL, an upload URL, a data: URI (API) or a file
    # path or URL (CLI). None when the caller hands the engine a decoded image itself.
    image: str | None = None
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="default: SkyReels' own negative prompt"
    )
    seed: int = Field(DEFAULT_SEED, ge=SEED_MIN, le=SEED_MAX, description="-1 draws one")
    guidance_scale: float = Field(
        DEFAULT_GUIDANCE_SCALE,
        ge=GUIDANCE_MIN,
        le=GUIDANCE_MAX,
        description="true classifier-free guidance scale (1 disables CFG)",
    )
    num_inference_steps: int = Field(DEFAULT_STEPS, ge=STEPS_MIN, le=STEPS_MAX)
    aspect_ratio: Literal["16:9", "9:16"] = DEFAULT_ASPECT_RATIO
    # Overrides of the model's size for the aspect ratio (CLI only; not in the API contract).
    width: int | None = Field(None, ge=16, le=SIZE_MAX, multiple_of=16)
    height: int | None = Field(None, ge=16, le=SIZE_MAX, multiple_of=16)
    num_frames: int | None = Field(None, ge=1, le=FRAMES_MAX)
    # Sent by the hosted ecosystem's clients. The server's safety checker (when it has one) skips
    # the video on `false` only when its operator allows that (--allow-disable-safety-checker).
    enable_safety_checker: bool = Field(
        True, description="false skips the NSFW check, when the server allows it (else ignored)"
    )

    @model_validator(mode="before")
    @classmethod
    def _check(cls, values: Any) -> Any:
        if isinstance(values, dict):
            check_fields(values)
        return values

    # --- JSON: how the job row stores it ----------------------------------------------------

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> GenerationParams:
        return cls.model_validate_json(text)

    # --- SkyReels semantics -----------------------------------------------------------------

    @property
    def cfg_enabled(self) -> bool:
        return cfg_enabled(self.guidance_scale)

    @property
    def encoder_prompt(self) -> str:
        """The prompt as the text encoder gets it: with the "FPS-24, " prefix."""
        return with_fps_prefix(self.prompt)

    @property
    def encoder_negative_prompt(self) -> str | None:
        """The negative prompt the pipeline gets: None without CFG (no unconditional pass);
        with CFG the caller's, else SkyReels' default, so that guidance_scale is never silently
        ignored (true CFG only runs when the pipeline gets negative embeddings)."""
        if not self.cfg_enabled:
            return None
        return (self.negative_prompt or "").strip() or DEFAULT_NEGATIVE_PROMPT

    def with_drawn_seed(self) -> GenerationParams:
        """These parameters with a concrete seed: a seed of -1 is replaced by a drawn one."""
        return self if self.seed >= 0 else self.model_copy(update={"seed": draw_seed()})


def check_fields(values: dict[str, Any]) -> None:
    """Raise InvalidInputError (MissingInputError for no prompt) naming the first bad field.

    Absent fields are not checked (they take their defaults). The order is the contract's: the
    prompt first, then the numbers, the aspect ratio, the size overrides, the negative prompt."""
    prompt = values.get("prompt")
    if prompt is None:
        raise MissingInputError("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError("prompt", prompt, "must be a non-empty string")
    _check_length("prompt", prompt)
    if "seed" in values:
        _check_int("seed", values["seed"], SEED_MIN, SEED_MAX)
    if "guidance_scale" in values:
        value = values["guidance_scale"]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not GUIDANCE_MIN <= value <= GUIDANCE_MAX
        ):
            raise InvalidInputError(
                "guidance_scale", value, f"must be a number from {GUIDANCE_MIN:g} to {GUIDANCE_MAX:g}"
            )
    if "num_inference_steps" in values:
        _check_int("num_inference_steps", values["num_inference_steps"], STEPS_MIN, STEPS_MAX)
    if "aspect_ratio" in values and values["aspect_ratio"] not in ASPECT_RATIOS:
        raise InvalidInputError(
            "aspect_ratio", values["aspect_ratio"], f"must be one of {', '.join(ASPECT_RATIOS)}"
        )
    for name in ("width", "height"):
        value = values.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value % 16 or not 16 <= value <= SIZE_MAX
        ):
            raise InvalidInputError(name, value, f"must be a multiple of 16 from 16 to {SIZE_MAX}")
    frames = values.get("num_frames")
    if frames is not None and (
        isinstance(frames, bool)
        or not isinstance(frames, int)
        or not 1 <= frames <= FRAMES_MAX
        or (frames - 1) % 4
    ):
        raise InvalidInputError(
            "num_frames", frames, f"must be 4k+1 (1, 5, 9, ..., 97, ...) up to {FRAMES_MAX}"
        )
    negative = values.get("negative_prompt")
    if negative is not None:
        if not isinstance(negative, str):
            raise InvalidInputError("negative_prompt", negative, "must be a string")
        _check_length("negative_prompt", negative)
    image = values.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise InvalidInputError("image", image, "must be a URL, a data: URI or a file path")
    safety = values.get("enable_safety_checker")
    if safety is not None and not isinstance(safety, bool):
        raise InvalidInputError("enable_safety_checker", safety, "must be true or false")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInputError(name, value, f"must be an integer from {low} to {high}")


def _check_length(name: str, text: str) -> None:
    # The length, not the text, is echoed: the message must stay readable for a 1 MB prompt.
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidInputError(name, len(text), f"must be at most {MAX_PROMPT_CHARS} characters")


@dataclass(frozen=True)
class ModelGeometry:
    """The sizes a model generates at by default, per aspect ratio (width, height) and frames."""

    sizes: dict[str, tuple[int, int]]
    num_frames: int

    def resolve(self, params: GenerationParams) -> tuple[int, int, int]:
        """(width, height, num_frames) for `params`: its overrides win over the model's defaults."""
        default_w, default_h = self.sizes[params.aspect_ratio]
        return (
            params.width or default_w,
            params.height or default_h,
            params.num_frames or self.num_frames,
        )


# Upstream SkyReels V1: 960x544 (w x h) for 16:9, 544x960 for 9:16, 97 frames at 24 fps.
SKYREELS_GEOMETRY = ModelGeometry(sizes={"16:9": (960, 544), "9:16": (544, 960)}, num_frames=97)
