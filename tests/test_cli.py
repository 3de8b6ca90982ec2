"""The `skyreels-local generate` command, run as a real subprocess."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from skyreels_local.video import read_mp4

CLI = [sys.executable, "-m", "skyreels_local"]


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_generate_tiny_writes_decodable_mp4(tmp_path, test_image_path):
    out = tmp_path / "clip.mp4"
    result = run_cli(
        "generate", "--model", "tiny-random", "--image", str(test_image_path), "--prompt", "waves",
        "--out", str(out), "--seed", "42", "--steps", "2", "--aspect-ratio", "9:16", "--num-frames", "5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    frames, fps = read_mp4(out)
    assert frames.shape == (5, 64, 32, 3)
    assert fps == 24
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"done in \d+\.\ds: seed 42, 32x64, 5 frames at 24 fps", summary), summary
    assert str(out) in summary


def test_random_seed_is_printed(tmp_path, test_image_path):
    out = tmp_path / "clip.mp4"
    result = run_cli(
        "generate", "--model", "tiny-random", "--image", str(test_image_path), "--prompt", "x",
        "--out", str(out), "--steps", "1", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"seed \d+,", result.stdout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "30"], "`width` must be a multiple of 16"),
        (["--num-frames", "10"], "`num_frames` must be 4k+1"),
        (["--steps", "0"], "`num_inference_steps` must be an integer from 1 to 50"),
        (["--guidance-scale", "50"], "`guidance_scale` must be a number"),
    ],
)
def test_bad_input_one_line_nonzero(tmp_path, test_image_path, args, message):
    out = tmp_path / "clip.mp4"
    result = run_cli(
        "generate", "--model", "tiny-random", "--image", str(test_image_path), "--prompt", "x", "--out", str(out),
        *args,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # exactly one line
    assert message in result.stderr
    assert not out.exists()


def test_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    result = run_cli(
        "generate",
        "--model",
        "tiny-random",
        "--image",
        str(bad),
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "o.mp4"),
    )
    assert result.returncode == 2
    assert "not a readable image" in result.stderr


def test_missing_image_file(tmp_path):
    result = run_cli(
        "generate", "--model", "tiny-random", "--image", str(tmp_path / "none.png"), "--prompt", "x",
        "--out", str(tmp_path / "o.mp4"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot read image file" in result.stderr


def test_missing_weights_names_how_to_get_them(tmp_path, test_image_path):
    result = run_cli(
        "generate", "--model", str(tmp_path / "weights"), "--image", str(test_image_path), "--prompt", "x",
        "--out", str(tmp_path / "o.mp4"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "weights download" in result.stderr


def test_help_documents_every_flag():
    result = run_cli("generate", "--help")
    assert result.returncode == 0
    for flag in [
        "--image", "--prompt", "--out", "--negative-prompt", "--seed", "--guidance-scale", "--steps",
        "--aspect-ratio", "--width", "--height", "--num-frames", "--model",
    ]:  # fmt: skip
        assert flag in result.stdout
