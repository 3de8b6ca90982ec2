"""What the engine runs: validated `GenerationParams` plus the decoded first frame.

The parameters, their defaults, limits and the SkyReels conventions are in `skyreels_local.params`
(torch- and PIL-free, shared with the HTTP process); the names below are re-exported from there
for the engine's modules and older imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..params import (  # noqa: F401 - re-exported
    ASPECT_RATIOS,
    DEFAULT_NEGATIVE_PROMPT,
    FPS_PREFIX,
    FRAMES_MAX,
    GUIDANCE_MAX,
    GUIDANCE_MIN,
    OUTPUT_FPS,
    SEED_MAX,
    SEED_MIN,
    SIZE_MAX,
    SKYREELS_GEOMETRY,
    STEPS_MAX,
    STEPS_MIN,
    GenerationParams,
    ModelGeometry,
    with_fps_prefix,
)


@dataclass(frozen=True, init=False)
class GenerationRequest:
    """One image-to-video generation for the engine: the parameters and the decoded image.

    `GenerationRequest(image, params=params)` wraps parameters validated at the edge (the worker,
    the CLI); `GenerationRequest(image=image, prompt=..., seed=...)` builds and validates them
    from fields (tests, the warm-up), raising InvalidInputError naming the first bad field.
    """

    params: GenerationParams
    image: Image.Image

    def __init__(self, image: Image.Image, params: GenerationParams | None = None, **fields: Any) -> None:
        if params is not None and fields:
            raise TypeError("give either params or fields, not both")
        object.__setattr__(self, "params", params if params is not None else GenerationParams(**fields))
        object.__setattr__(self, "image", image)


def validate_fields(**fields: Any) -> None:
    """Check some generation fields alone (the others take their defaults, the prompt a
    placeholder unless given); raises like GenerationParams."""
    GenerationParams(**{"prompt": "x", **fields})
