"""Input image decoding and the SkyReels centre crop (torch-free: the HTTP process sniffs uploads
with it, the worker and the CLI decode inputs with it, the engine crops with it).

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


# Formats decoded in-process by Pillow's own code. Others are refused before any plugin parses
# them: some hand the bytes to external programs (EPS -> Ghostscript), others are rarely used
# and little fuzzed. AVIF/HEIF only where a decoder plugin is installed and registered.
SAFE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
OPTIONAL_FORMATS = ("AVIF", "HEIF")


def allowed_formats() -> tuple[str, ...]:
    Image.init()
    return SAFE_FORMATS + tuple(name for name in OPTIONAL_FORMATS if name in Image.OPEN)


def detect_format(head: bytes) -> str | None:
    """The format the first bytes announce, by Pillow's signature checks only (no parsing)."""
    Image.init()
    for name, (_factory, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head):
                return name
        except Exception:  # a signature check that cannot cope with these bytes: not it
            continue
    return None


def refuse_format(head: bytes, source: str) -> MediaError:
    """The error for bytes that are no image of an allowed format, naming what they look like."""
    allowed = ", ".join(allowed_formats())
    detected = detect_format(head)
    if detected is None:
        return MediaError(f"{source} is not a readable image (no known image format; accepted: {allowed})")
    return MediaError(f"{source} is not a readable image: it is {detected}, and only {allowed} are accepted")


def open_image(fp: object, head: bytes, *, source: str) -> Image.Image:
    """Image.open restricted to the allowed formats; MediaError naming the detected format."""
    try:
        return Image.open(fp, formats=allowed_formats())  # type: ignore[arg-type]
    except UnidentifiedImageError:
        raise refuse_format(head, source) from None


def decode_image(data: bytes, *, source: str = "image") -> Image.Image:
    """Decode image bytes (sniffed by PIL, not trusted from a name) into an RGB image."""
    try:
        with open_image(io.BytesIO(data), data[:64], source=source) as probe:
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
