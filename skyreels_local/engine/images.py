"""Input image decoding and the SkyReels centre crop.

The diffusers pipeline resizes the image straight to H x W, which squashes a 4:3 photo into 16:9;
upstream SkyReels centre-crops to the target aspect first, so we do that before the pipeline.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import MediaError

# Decompression-bomb guard: PIL warns at 89 MP and raises at twice that; we refuse earlier.
MAX_IMAGE_PIXELS = 64_000_000


def decode_image(data: bytes, *, source: str = "image") -> Image.Image:
    """Decode image bytes (sniffed by PIL, not trusted from a name) into an RGB image."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise MediaError(
                    f"{source} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed"
                )
            probe.load()
            image = probe.convert("RGB")
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{source} is not a readable image ({exc.__class__.__name__}: {exc})") from exc
    return image


def load_image_file(path: str | Path) -> Image.Image:
    """Read a local image file (CLI use)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read image file {str(path)!r}: {exc.strerror or exc}") from exc
    return decode_image(data, source=f"image file {str(path)!r}")


def centre_crop_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Crop the largest centred box of the target aspect, then resize it to width x height."""
    src_w, src_h = image.size
    target_aspect = width / height
    if src_w / src_h > target_aspect:
        crop_w, crop_h = round(src_h * target_aspect), src_h
    else:
        crop_w, crop_h = src_w, round(src_w / target_aspect)
    left = (src_w - crop_w) // 2
    top = (src_h - crop_h) // 2
    cropped = image.crop((left, top, left + crop_w, top + crop_h))
    if cropped.size == (width, height):
        return cropped
    return cropped.resize((width, height), Image.Resampling.LANCZOS)
