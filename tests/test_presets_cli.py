"""`--preset` on `skyreels-local generate`, and the engine recording the preset it ran."""

from __future__ import annotations

import pytest

from skyreels_local.cli import build_parser, main
from skyreels_local.cli.generate import GENERATE_FIELDS
from skyreels_local.cli.settings_flags import settings_from_args
from skyreels_local.preset_names import DEFAULT_PRESET, PRESETS
from skyreels_local.video import read_mp4


def test_generate_accepts_each_preset_and_defaults_to_the_setting(monkeypatch):
    base = ["generate", "--image", "x.png", "--prompt", "p", "--out", "o.mp4"]

    def settings(*argv: str):  # defaults and env twins are resolved when the command runs
        return settings_from_args(build_parser().parse_args([*base, *argv]), GENERATE_FIELDS)

    monkeypatch.delenv("SKYREELS_PRESET", raising=False)
    assert settings().preset == DEFAULT_PRESET == "exact"
    for name in PRESETS:
        assert settings("--preset", name).preset == name
    monkeypatch.setenv("SKYREELS_PRESET", "turbo")
    monkeypatch.setenv("SKYREELS_TURBO_THRESHOLD", "0.3")
    assert (settings().preset, settings().turbo_threshold) == ("turbo", 0.3)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--preset", "warp"])


def test_generate_with_the_turbo_preset_writes_a_video(tmp_path, test_image_path, capsys, monkeypatch):
    monkeypatch.setenv("SKYREELS_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "turbo.mp4"
    argv = ["generate", "--model", "tiny-random", "--device", "cpu", "--image", str(test_image_path)]
    argv += ["--prompt", "a red square", "--steps", "3", "--seed", "4", "--out", str(out), "--no-progress"]
    assert main([*argv, "--preset", "turbo", "--turbo-threshold", "0.2"]) == 0
    assert "preset turbo" in capsys.readouterr().out
    frames, fps = read_mp4(out)
    assert frames.shape[0] == 9 and frames.shape[1:3] == (32, 64) and fps == 24
