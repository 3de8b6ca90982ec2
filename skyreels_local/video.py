"""Frames -> H.264 MP4 through imageio-ffmpeg, written atomically.

yuv420p (every player decodes it), `+faststart` (the moov atom first, so browsers start playing
before the whole file arrives), CRF 17 with the `slow` preset: visually lossless for this content
at a few MB per 4 s clip. The file is written under a temporary name in the same folder and
renamed, so a reader never sees a half-written video.

ffmpeg runs as our own subprocess (the binary imageio-ffmpeg ships) rather than through
`imageio_ffmpeg.write_frames`, because that helper never checks ffmpeg's exit status: on a full
disk it returns normally and leaves an empty, unplayable file. Here a failed encode raises
VideoWriteError with ffmpeg's own message and the errno it reports (ENOSPC on a full disk).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np

DEFAULT_CRF = 17


class VideoWriteError(OSError):
    """ffmpeg failed to write the video. `errno` is ENOSPC or EDQUOT when it says the disk is full."""

    def __init__(self, ffmpeg_output: str, exit_code: int) -> None:
        lines = [line.strip() for line in ffmpeg_output.splitlines() if line.strip()]
        code = next(
            (number for number in (errno.ENOSPC, errno.EDQUOT) if os.strerror(number) in ffmpeg_output),
            errno.EIO,
        )
        # The first lines name the cause; later ones are consequences.
        reason = "; ".join(lines[:2]) or f"ffmpeg exited with status {exit_code}"
        super().__init__(code, f"ffmpeg could not write the video: {reason}")


def write_mp4(frames: np.ndarray, path: str | Path, *, fps: int = 24, crf: int = DEFAULT_CRF) -> Path:
    """Write uint8 frames [F, H, W, 3] to `path` as H.264 MP4. Returns the final path."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part.mp4", dir=path.parent)
    os.close(fd)
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error",
        "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24",
        "-r", str(fps), "-i", "-", "-an",
        "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-preset", "slow",
        "-movflags", "+faststart", tmp_name,
    ]  # fmt: skip
    try:
        # stderr to a file, not a pipe: a chatty ffmpeg can then never block on a full pipe.
        with tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr
            )
            try:
                _feed(process, frames)
                code = process.wait()
            except BaseException:
                process.kill()
                process.wait()
                raise
            if code != 0:
                stderr.seek(0)
                raise VideoWriteError(stderr.read().decode("utf-8", "replace"), code)
        with open(tmp_name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _feed(process: subprocess.Popen, frames: np.ndarray) -> None:
    """Write the raw frames to ffmpeg's stdin, then close it (ffmpeg finishes the file)."""
    assert process.stdin is not None
    try:
        for frame in frames:
            process.stdin.write(np.ascontiguousarray(frame).data)
    except BrokenPipeError:
        pass  # ffmpeg stopped early; its exit status and message say why
    finally:
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode an MP4 into uint8 frames [F, H, W, 3] and its fps (tests and benchmarks use this)."""
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8), float(meta["fps"])
