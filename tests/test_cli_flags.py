"""CLI flags derived from the Settings fields: help that tells the truth, env twins, precedence."""

from __future__ import annotations

import argparse
import re

import pytest
from pydantic import Field

from skyreels_local.cli import build_parser
from skyreels_local.cli.generate import GENERATE_FIELDS
from skyreels_local.cli.serve import SERVE_EXCLUDED_FIELDS, SERVE_FIELDS
from skyreels_local.cli.settings_flags import (
    SettingsError,
    add_settings_flags,
    flag_name,
    settings_from_args,
)
from skyreels_local.config import Settings
from skyreels_local.preset_names import PRESETS


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("SKYREELS_"):
            monkeypatch.delenv(name)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser, by its command line, e.g. `weights verify`."""
    found = {"": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update({f"{name} {k}".strip(): v for k, v in subparsers(sub).items()})
    return found


def rendered_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help as --help prints it (defaults expanded), on one line."""
    formatter = parser._get_formatter()
    out = {}
    for action in parser._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS:
            text = formatter._expand_help(action) if action.help else ""
            out[action.option_strings[0]] = " ".join(text.split())
    return out


ALL = subparsers(build_parser())


def test_every_command_is_covered():
    assert {"", "generate", "serve", "weights download", "weights verify", "weights import", "bench"} <= set(
        ALL
    )


@pytest.mark.parametrize("command", sorted(ALL))
def test_help_has_no_none_defaults_no_doubles_and_every_flag_explained(command):
    parser = ALL[command]
    for flag, text in rendered_help(parser).items():
        assert text, f"{command} {flag}: no help"
        assert "(default: None)" not in text, f"{command} {flag}: {text}"
        assert len(re.findall(r"default", text)) <= 1, f"{command} {flag}: {text}"
    for action in parser._actions:
        if action.required and action.option_strings:
            assert "default" not in rendered_help(parser)[action.option_strings[0]]


def test_generate_help_states_each_default_once():
    help_text = rendered_help(ALL["generate"])
    assert help_text["--negative-prompt"] == "negative prompt (default: SkyReels' own)"
    assert help_text["--steps"] == "denoising steps, 1 to 50 (default: 30)"
    image_help = help_text["--image"]  # required: no default shown
    assert (
        image_help.startswith("input image: a local file path or an http(s) URL; ")
        and "default" not in image_help
    )
    assert help_text["--preset"].endswith("[env SKYREELS_PRESET; default exact]")
    assert help_text["--width"] == "override the width (multiple of 16)"


def test_serve_and_generate_list_the_preset_choices():
    for command in ("serve", "generate"):
        (preset,) = [a for a in ALL[command]._actions if "--preset" in a.option_strings]
        assert tuple(preset.choices) == PRESETS


def test_serve_exposes_every_settings_field_with_its_env_twin():
    assert [f for f in Settings.model_fields if f not in SERVE_EXCLUDED_FIELDS] == SERVE_FIELDS
    help_text = rendered_help(ALL["serve"])
    for field in SERVE_FIELDS:
        assert f"env SKYREELS_{field.upper()}" in help_text[flag_name(field)], field
    assert "--api-key" in [s for a in ALL["serve"]._actions for s in a.option_strings]  # kept alias


def test_generate_exposes_its_fields_only():
    flags = {s for a in ALL["generate"]._actions for s in a.option_strings}
    assert {flag_name(f) for f in GENERATE_FIELDS} <= flags
    assert "--max-queue" not in flags and "--api-keys" not in flags


def test_a_new_settings_field_gets_its_flag(monkeypatch):
    # What a field added tomorrow gets for free: name, type, help, env twin and default.
    class Wider(Settings):
        request_budget_s: float = Field(default=3.5, gt=0, description="how long a request may take")

    monkeypatch.setattr("skyreels_local.cli.settings_flags.Settings", Wider)
    parser = argparse.ArgumentParser(formatter_class=argparse.HelpFormatter)
    add_settings_flags(parser, ["request_budget_s"])
    (action,) = [a for a in parser._actions if a.dest == "request_budget_s"]
    assert action.option_strings == ["--request-budget-s"] and action.type is float
    assert action.help == "how long a request may take [env SKYREELS_REQUEST_BUDGET_S; default 3.5]"
    assert (
        settings_from_args(
            parser.parse_args(["--request-budget-s", "2"]), ["request_budget_s"]
        ).request_budget_s
        == 2.0
    )
    monkeypatch.setenv("SKYREELS_REQUEST_BUDGET_S", "7")
    assert settings_from_args(parser.parse_args([]), ["request_budget_s"]).request_budget_s == 7.0


def generate_settings(*argv: str) -> Settings:
    base = ["generate", "--image", "i.png", "--prompt", "p", "--out", "o.mp4"]
    return settings_from_args(build_parser().parse_args([*base, *argv]), GENERATE_FIELDS)


def test_generate_env_twin_wins_over_default_and_flag_wins_over_env(monkeypatch):
    assert generate_settings().profile == "auto"
    monkeypatch.setenv("SKYREELS_PROFILE", "cpu")
    monkeypatch.setenv("SKYREELS_TURBO_THRESHOLD", "0.3")
    assert (generate_settings().profile, generate_settings().turbo_threshold) == ("cpu", 0.3)
    settings = generate_settings("--profile", "24gb")
    assert (settings.profile, settings.turbo_threshold) == ("24gb", 0.3)


def test_a_rejected_value_names_the_flag_or_the_variable(monkeypatch):
    with pytest.raises(SettingsError) as flag_error:
        generate_settings("--turbo-threshold", "-1")
    assert flag_error.value.message == (
        "--turbo-threshold / SKYREELS_TURBO_THRESHOLD '-1.0': Input should be greater than or equal to 0"
    )
    monkeypatch.setenv("SKYREELS_TURBO_THRESHOLD", "x")
    with pytest.raises(SettingsError) as env_error:
        generate_settings()
    assert env_error.value.message.startswith("SKYREELS_TURBO_THRESHOLD (environment) 'x': ")


def test_building_the_parser_reads_no_settings(monkeypatch):
    monkeypatch.setenv("SKYREELS_PORT", "abc")  # would fail Settings(); the parser must not care
    assert build_parser().parse_args(["serve", "--port", "1"]).port == 1
