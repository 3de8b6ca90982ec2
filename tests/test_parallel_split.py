"""The choice of split for --gpus-per-video (engine/parallel.choose_split) and its flags."""

from __future__ import annotations

import pytest

from skyreels_local.engine.parallel import Split, choose_split
from skyreels_local.errors import InvalidInputError


@pytest.mark.parametrize(
    ("world", "kwargs", "expected"),
    [
        (1, {}, (1, 1)),
        (2, {}, (2, 1)),  # even: CFG-parallel first (one all-gather per step)
        (4, {}, (2, 2)),
        (8, {}, (2, 4)),
        (6, {}, (2, 3)),
        (3, {}, (1, 3)),  # odd: Ulysses only
        (2, {"cfg_on": False}, (1, 2)),
        (8, {"cfg_parallel": False}, (1, 8)),
        (4, {"ulysses": 4}, (1, 4)),
        (4, {"ulysses": 2}, (2, 2)),
        (8, {"ulysses": 4, "cfg_parallel": True}, (2, 4)),
    ],
)
def test_auto_and_overrides(world, kwargs, expected):
    split = choose_split(world, heads=24, **kwargs)
    assert (split.cfg, split.ulysses) == expected
    assert split.cfg * split.ulysses == world


@pytest.mark.parametrize(
    ("world", "kwargs", "field"),
    [
        (5, {}, "ulysses"),  # 5 does not divide 24 heads
        (16, {}, "ulysses"),  # CFG x2 . Ulysses x8, and 8 does not divide 12 heads (below)
        (3, {"cfg_parallel": True}, "cfg_parallel"),
        (4, {"ulysses": 3}, "ulysses"),
        (8, {"ulysses": 2}, "ulysses"),  # would leave 4 CFG ranks
        (4, {"ulysses": 2, "cfg_parallel": False}, "ulysses"),
        (4, {"ulysses": 4, "cfg_parallel": True}, "ulysses"),
    ],
)
def test_bad_choices_name_the_field(world, kwargs, field):
    heads = 12 if world == 16 else 24
    with pytest.raises(InvalidInputError) as info:
        choose_split(world, heads=heads, **kwargs)
    assert info.value.field == field


def test_describe():
    assert Split(8, 2, 4).describe() == "8 processes: CFG-parallel x2 . Ulysses x4"
    assert Split(1, 1, 1).describe() == "1 processes: no split"


def test_cfg_parallel_flag_is_three_way():
    import argparse

    from skyreels_local.cli.settings_flags import add_settings_flags, settings_from_args

    parser = argparse.ArgumentParser()
    fields = ("gpus_per_video", "ulysses", "cfg_parallel")
    add_settings_flags(parser, fields)
    assert settings_from_args(parser.parse_args([]), fields).cfg_parallel is None
    on = settings_from_args(parser.parse_args(["--cfg-parallel", "--gpus-per-video", "4"]), fields)
    assert (on.cfg_parallel, on.gpus_per_video) == (True, 4)
    assert settings_from_args(parser.parse_args(["--no-cfg-parallel", "--ulysses", "2"]), fields).ulysses == 2
    assert settings_from_args(parser.parse_args(["--no-cfg-parallel"]), fields).cfg_parallel is False
