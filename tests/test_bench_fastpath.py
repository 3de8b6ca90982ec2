"""`skyreels-local bench`, round two: end-to-end runs per preset and per turbo step cache, and
the per-preset table (tiny model on CPU)."""

from __future__ import annotations

import json
import math
import re

import pytest

from skyreels_local.bench import run as bench
from skyreels_local.bench.report import PRESET_COLUMNS, preset_rows

E2E_STEPS = 8
VARIANTS = "ref,stock,e2e_stock,exact,e2e_exact,fp8,e2e_fp8,turbo,e2e_turbo_fbcache,e2e_turbo_taylorseer,e2e_turbo_magcache"


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    argv = ["--model", "tiny-random", "--device", "cpu", "--out", str(out), "--budget-s", "600"]
    assert bench.main([*argv, "--variants", VARIANTS, "--e2e-steps", str(E2E_STEPS)]) == 0
    return out, json.loads(out.read_text())


def _number(text: str) -> float:
    value = float(text.rstrip("%"))
    assert math.isfinite(value), text
    return value


def test_preset_table_has_the_issue_columns_and_real_numbers(e2e_run):
    out, data = e2e_run
    lines = out.with_suffix(".txt").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("per preset"))
    assert f"{E2E_STEPS} steps" in lines[start]
    header = lines[start + 1]
    # Columns, in order (a name may hold one space; cells are two or more apart).
    assert re.split(r"\s{2,}", header.strip()) == list(PRESET_COLUMNS)
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    assert list(rows) == ["stock", "exact", "turbo:fbcache", "turbo:taylorseer", "turbo:magcache"]
    for name, cells in rows.items():
        assert len(cells) == len(PRESET_COLUMNS) - 1, (name, cells)
        s_step, x_stock, err_stock, err_f32, peak, e2e_s, e2e_x, reused = cells
        assert _number(s_step) > 0 and _number(x_stock) > 0 and _number(e2e_s) > 0 and _number(e2e_x) > 0
        assert _number(err_stock) >= 0 and _number(peak) > 0
        if name.startswith("turbo:"):
            assert err_f32 == "-"  # no single-step float32 yardstick for a cached schedule
            assert 0 <= _number(reused) <= 100
        else:
            assert 0 < _number(err_f32) < 1e-4 and reused == "-"
    assert _number(rows["stock"][1]) == 1.0 and _number(rows["stock"][6]) == 1.0
    # The schedule-based caches reuse steps whatever the weights (random ones here). Counted, not
    # timed: on the tiny CPU model a reused step and a computed one can round to the same ms.
    assert _number(rows["turbo:taylorseer"][7]) > 0 and _number(rows["turbo:magcache"][7]) > 0


def test_e2e_records_add_up_and_compare_to_stock(e2e_run):
    _out, data = e2e_run
    v = data["variants"]
    for name in ("e2e_stock", "e2e_exact", "e2e_turbo_taylorseer", "e2e_turbo_magcache"):
        rec = v[name]
        parts = [rec[k] for k in ("encode_s", "denoise_s", "decode_s", "mp4_s")]
        assert all(p > 0 for p in parts), (name, parts)  # the tiny model's own text encoders are timed
        assert rec["e2e_s"] == pytest.approx(sum(parts), abs=2e-3)
        assert rec["e2e_steps"] == E2E_STEPS and rec["mp4_bytes"] > 0 and rec["finite"] is True
    assert v["e2e_exact"]["rel_err_vs_stock"] < 1e-5  # exact: same math as stock
    for option in ("taylorseer", "magcache"):
        rec = v[f"e2e_turbo_{option}"]
        planned = rec["planned_computed_steps"]
        assert rec["computed_forwards"] == {"cond": planned, "uncond": planned}
        assert rec["reused_forwards"] == {"cond": E2E_STEPS - planned, "uncond": E2E_STEPS - planned}
        assert 1e-4 < rec["rel_err_vs_stock"] < 0.1 and rec["base"] == "exact"
    assert "says nothing about real videos" in v["e2e_turbo_fbcache"]["note"]
    assert "fp8 did not run" not in v["e2e_fp8"].get("error", "")
    assert v["e2e_fp8"]["skipped"].startswith("the fp8 variant did not run")
    measured = data["summary"]["e2e_ratio_measured"]
    assert measured["exact"]["target"] == 0.64 and measured["turbo_magcache"]["target"] == 0.30
    assert [row["preset"] for row in preset_rows(data)][:2] == ["stock", "exact"]


def test_e2e_variants_follow_their_flags(tmp_path):
    out = tmp_path / "b.json"
    argv = ["--model", "tiny-random", "--device", "cpu", "--out", str(out)]
    bench.main([*argv, "--variants", "stock,e2e_stock", "--e2e-steps", "0"])
    assert list(json.loads(out.read_text())["variants"]) == ["stock"]
    bench.main(
        [
            *argv,
            "--variants",
            "exact,e2e_turbo_fbcache,e2e_turbo_magcache",
            "--step-caches",
            "magcache",
            "--e2e-steps",
            "3",
        ]
    )
    v = json.loads(out.read_text())["variants"]
    assert list(v) == ["exact", "e2e_turbo_magcache"] and v["e2e_turbo_magcache"]["e2e_steps"] == 3
    with pytest.raises(SystemExit):
        bench.main([*argv, "--step-caches", "teacache"])


def test_full_size_text_encoder_stand_in_needs_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(
            [
                "--model",
                "tiny-random",
                "--device",
                "cpu",
                "--text-encoder",
                "random-full",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )


def test_text_encoder_stand_in_has_the_real_shapes():
    """The 80gb memory row needs the real size: check the configs, not a small stand-in."""
    from transformers import CLIPTextConfig, LlamaConfig

    from skyreels_local.bench.e2e import CLIP_L_TEXT, LLAMA_8B

    llama = LlamaConfig(**LLAMA_8B)
    head_dim = llama.hidden_size // llama.num_attention_heads
    per_layer = (
        llama.hidden_size * head_dim * (llama.num_attention_heads * 2 + llama.num_key_value_heads * 2)
        + 3 * llama.hidden_size * llama.intermediate_size
    )
    params = llama.num_hidden_layers * per_layer + llama.vocab_size * llama.hidden_size
    assert params / 1e9 == pytest.approx(7.5, abs=0.05)  # Llama-3-8B without its LM head
    assert CLIPTextConfig(**CLIP_L_TEXT).hidden_size == 768


def test_e2e_encode_is_never_a_cache_hit():
    """PromptEncoder caches by text and every e2e run encodes the same prompts: each timed
    encode must run the text encoder again."""
    from skyreels_local.bench.e2e import pipeline_prompt_encoder
    from skyreels_local.engine.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    calls = []
    pipe.text_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    encoder = pipeline_prompt_encoder(pipe)
    first, second = encoder.encode("same prompt"), encoder.encode("same prompt")
    assert len(calls) == 2
    assert first.embeds.shape == second.embeds.shape
    pipe.text_encoder = None
    assert pipeline_prompt_encoder(pipe) is None
