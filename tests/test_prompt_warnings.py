"""SkyReels' default negative prompt is longer than CLIP's 77 tokens; the pipeline truncates
CLIP's input on purpose (engine/prompts.py), so no generation warns about it."""

from __future__ import annotations

import logging

from skyreels_local.engine.request import GenerationRequest


def test_no_clip_truncation_warning_for_the_default_negative_prompt(tiny_engine, test_image, capfd):
    request = GenerationRequest(prompt="waves", image=test_image, seed=1, num_inference_steps=1)
    tiny_engine.prompts.clear()  # a cached negative prompt would skip the encode that warns
    tiny_engine.generate(request)
    err = capfd.readouterr().err
    assert "CLIP can only handle sequences up to" not in err
    assert "Token indices sequence length" not in err


def test_the_filter_keeps_other_warnings():
    from skyreels_local.engine.prompts import _ClipTruncationFilter

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("x", logging.WARNING, __file__, 1, message, None, None)

    keep = _ClipTruncationFilter().filter
    assert not keep(
        record(
            "The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens: ['x']"
        )
    )
    assert not keep(
        record(
            "Token indices sequence length is longer than the specified maximum sequence length for this model (119 > 77)."
        )
    )
    assert keep(
        record(
            "Token indices sequence length is longer than the specified maximum sequence length for this model (9000 > 4096)."
        )
    )
    assert keep(record("some other warning"))
