"""Shared fixtures: the tiny seeded model (built once per session) and test images."""

from __future__ import annotations

import os

import pytest
from PIL import Image, ImageDraw

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# Test modules that start real processes (an API server, worker processes, the CLI, a pip
# install): the `integration` tier. Every other test is `unit` unless it is marked `gpu`.
# `pytest -m "not integration"` runs the fast tier; CI runs everything.
INTEGRATION_MODULES = {
    "test_api_contract",
    "test_api_faults",
    "test_api_fuzz",
    "test_api_queue",
    "test_api_restart",
    "test_bench",
    "test_cli",
    "test_client_wavespeed",
    "test_disk_full",
    "test_profiles_gpu_check",
    "test_serve_startup",
    "test_supervisor",
    "test_wheel",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if module in INTEGRATION_MODULES and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        if not item.get_closest_marker("integration") and not item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def tiny_engine():
    from skyreels_local.engine.loader import load_engine

    return load_engine("tiny-random", device="cpu")


def make_test_image(width: int = 96, height: int = 72, *, marked_centre: bool = True) -> Image.Image:
    """A grey image with a red square at its exact centre (and blue borders that a crop removes)."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width // 10, height - 1), fill=(0, 0, 255))
    draw.rectangle((width - 1 - width // 10, 0, width - 1, height - 1), fill=(0, 0, 255))
    if marked_centre:
        cx, cy, r = width // 2, height // 2, max(2, min(width, height) // 10)
        draw.rectangle((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=(255, 0, 0))
    return image


@pytest.fixture
def test_image() -> Image.Image:
    return make_test_image()


@pytest.fixture
def test_image_path(tmp_path, test_image):
    path = tmp_path / "input.png"
    test_image.save(path)
    return path
