"""The NSFW safety checker without servers: frame sampling, the real loading path of a tiny ViT
classifier saved in the real folder layout, the threshold, flag and block, the request opt-out,
start-up checks of a damaged folder, `generate` (in process) and `weights download
--safety-checker` against a local stand-in for the Hub (tests/weights_helpers.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from safety_helpers import normal_classifier, nsfw_classifier, write_tiny_classifier
from weights_helpers import fake_snapshot_download

from skyreels_local.cli import main as cli_main
from skyreels_local.errors import InvalidInputError, TaskCode
from skyreels_local.jobs import Database, JobStatus
from skyreels_local.params import GenerationParams
from skyreels_local.safety.gate import SafetyGate
from skyreels_local.safety.policy import (
    OutputBlockedError,
    SafetyCheckerError,
    SafetyConfig,
    check_folder,
    resolve_folder,
    sample_frame_indices,
)
from skyreels_local.server.schemas import parse_skyreels_input, prediction_from_job
from skyreels_local.weights.download import (
    SAFETY_CHECKER_REPO,
    SAFETY_CHECKER_REVISION,
    download_weights,
    safety_checker_source,
)
from skyreels_local.weights.layout import CheckStatus, read_manifest, verify_weights_dir

FRAMES = np.random.default_rng(0).integers(0, 256, (9, 32, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifiers")
    return {
        "nsfw": nsfw_classifier(root / "nsfw"),
        "normal": normal_classifier(root / "normal"),
        "0.7": write_tiny_classifier(root / "p07", nsfw_probability=0.7),
    }


def gate(folder: Path, **config) -> SafetyGate:
    return SafetyGate.load(SafetyConfig(folder=folder, **config), device="cpu")


def params(**fields) -> GenerationParams:
    return GenerationParams(prompt="a quay", **fields)


def test_frames_sampled_across_the_clip():
    assert sample_frame_indices(97) == [0, 24, 48, 72, 96]
    assert sample_frame_indices(9) == [0, 2, 4, 6, 8]
    assert sample_frame_indices(4, 3) == [0, 1, 2, 3]  # the middle is always among them
    assert sample_frame_indices(2) == [0, 1]
    assert sample_frame_indices(1) == [0]
    assert sample_frame_indices(0) == []


def test_the_real_loading_path_answers_per_model(folders):
    nsfw = gate(folders["nsfw"]).checker.check_video(FRAMES)
    normal = gate(folders["normal"]).checker.check_video(FRAMES)
    assert nsfw.score > 0.999 and normal.score < 0.001
    assert nsfw.frames_checked == 5
    assert gate(folders["nsfw"]).review(FRAMES, params(), label="t") is True
    assert gate(folders["normal"]).review(FRAMES, params(), label="t") is False


def test_the_threshold_is_obeyed(folders):
    score = gate(folders["0.7"]).checker.check_video(FRAMES).score
    assert score == pytest.approx(0.7, abs=1e-4)
    assert gate(folders["0.7"], threshold=0.6).review(FRAMES, params(), label="t") is True
    assert gate(folders["0.7"], threshold=0.8).review(FRAMES, params(), label="t") is False


def test_block_raises_with_the_reason(folders):
    blocking = gate(folders["nsfw"], action="block")
    with pytest.raises(OutputBlockedError) as info:
        blocking.review(FRAMES, params(), label="t")
    assert info.value.task_code == TaskCode.TASK_FAILED
    assert "withheld" in info.value.message and "NSFW" in info.value.message
    assert "above the threshold 0.5" in info.value.message
    # The normal model passes under block too.
    assert gate(folders["normal"], action="block").review(FRAMES, params(), label="t") is False


def test_request_opt_out_only_when_the_operator_allows_it(folders):
    opted_out = params(enable_safety_checker=False)
    assert gate(folders["nsfw"]).review(FRAMES, opted_out, label="t") is True  # ignored
    assert gate(folders["nsfw"], allow_disable=True).review(FRAMES, opted_out, label="t") is None  # no check
    assert gate(folders["nsfw"], allow_disable=True).review(FRAMES, params(), label="t") is True


def test_off_loads_nothing_and_never_checks():
    off = SafetyGate.load(SafetyConfig(folder=None), device="cpu")
    assert off.checker is None
    assert off.review(FRAMES, params(), label="t") is None  # None: no check ran (not counted)


def test_settings_resolve_the_folder(tmp_path, folders):
    assert resolve_folder("off", str(tmp_path)) is None
    assert resolve_folder("auto", str(tmp_path)) is None  # no <weights>/safety_checker/
    shutil.copytree(folders["nsfw"], tmp_path / "safety_checker")
    assert resolve_folder("auto", str(tmp_path)) == tmp_path / "safety_checker"
    assert resolve_folder(" OFF ", str(tmp_path)) is None
    assert resolve_folder(str(folders["normal"]), "tiny-random") == folders["normal"]


def test_a_damaged_folder_is_named_before_loading(tmp_path, folders):
    broken = shutil.copytree(folders["nsfw"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    (broken / "config.json").write_text("{not json")
    with pytest.raises(SafetyCheckerError) as info:
        check_folder(broken)
    message = info.value.message
    assert "config.json: unreadable" in message
    assert "model.safetensors: header describes" in message and "truncated" in message
    assert "weights download --safety-checker" in message
    with pytest.raises(SafetyCheckerError):
        SafetyGate.load(SafetyConfig(folder=broken), device="cpu")
    # A classifier without an NSFW class is refused too.
    labels = shutil.copytree(folders["normal"], tmp_path / "labels")
    config = json.loads((labels / "config.json").read_text())
    config["id2label"] = {"0": "cat", "1": "dog"}
    (labels / "config.json").write_text(json.dumps(config))
    with pytest.raises(SafetyCheckerError, match="no NSFW class among cat, dog"):
        check_folder(labels)


def test_request_field_is_validated_and_stored():
    parsed = parse_skyreels_input(
        {"prompt": "p", "image": "https://e.com/a.png", "enable_safety_checker": False}
    )
    assert parsed.params.enable_safety_checker is False
    assert parse_skyreels_input({"prompt": "p", "image": "https://e.com/a.png"}).params.enable_safety_checker
    with pytest.raises(InvalidInputError, match="`enable_safety_checker` must be true or false, got 'no'"):
        parse_skyreels_input({"prompt": "p", "image": "https://e.com/a.png", "enable_safety_checker": "no"})
    # Rows stored before the field existed read back with the check on.
    assert GenerationParams.model_validate({"prompt": "p"}).enable_safety_checker is True


# --- the job table: verdicts and counts recorded with the outcome -----------------------------


def started_job(db: Database, job_id: str) -> str:
    db.predictions.create(id=job_id, model="m", input={}, params={}, seed=1, base_url="http://x")
    claim = "claim-" + job_id
    assert db.predictions.claim_next("w0", claim).id == job_id
    return claim


def rendered_flags(db: Database, job_id: str) -> list[bool]:
    job = db.predictions.get(job_id)
    outputs = [f"http://x/{name}" for name in job.outputs]
    return prediction_from_job(job, base_url="http://x", outputs=outputs, queue_position=0).has_nsfw_contents


def test_verdicts_and_counts_are_recorded_with_the_outcome(tmp_path):
    db = Database(tmp_path / "jobs.sqlite3")
    for job_id, verdicts in (("flagged", [True]), ("passed", [False]), ("unchecked", None)):
        claim = started_job(db, job_id)
        assert db.predictions.complete(
            job_id,
            claim,
            outputs=[f"{job_id}.mp4"],
            execution_ms=1,
            inference_ms=1,
            has_nsfw_contents=verdicts,
        )
        assert db.predictions.get(job_id).has_nsfw_contents == verdicts
    assert [rendered_flags(db, i) for i in ("flagged", "passed", "unchecked")] == [[True], [False], [False]]
    claim = started_job(db, "blocked")
    assert db.predictions.fail("blocked", claim, code=1405, error="withheld", nsfw_blocked=True)
    blocked = db.predictions.get("blocked")
    assert (blocked.status, blocked.outputs, blocked.has_nsfw_contents) == (JobStatus.FAILED, [], None)
    assert db.counters.all() == {"safety_checks": 3.0, "nsfw_flagged": 1.0, "nsfw_blocked": 1.0}
    # A stale claim's outcome is not recorded, and not counted either.
    claim = started_job(db, "stale")
    assert not db.predictions.complete(
        "stale", "other", outputs=["stale.mp4"], execution_ms=1, inference_ms=1, has_nsfw_contents=[True]
    )
    assert not db.predictions.fail("stale", "other", code=1405, error="withheld", nsfw_blocked=True)
    assert db.counters.all() == {"safety_checks": 3.0, "nsfw_flagged": 1.0, "nsfw_blocked": 1.0}
    # Retention removes the rows; the totals stay.
    db.predictions.expire(before=float("inf"))
    assert db.predictions.get("flagged") is None
    assert db.counters.all()["safety_checks"] == 3.0
    db.close()


# --- generate -------------------------------------------------------------------------------


def generate(tmp_path: Path, image: Path, *flags: str) -> Path:
    out = tmp_path / "clip.mp4"
    argv = ["generate", "--model", "tiny-random", "--device", "cpu", "--image", str(image), "--prompt", "a quay",
            "--steps", "1", "--num-frames", "5", "--seed", "3", "--out", str(out), "--no-progress", *flags]  # fmt: skip
    return out, cli_main(argv)


@pytest.fixture
def image_file(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "in.png"
    Image.new("RGB", (64, 32), "teal").save(path)
    return path


@pytest.mark.parametrize(
    ("model", "flags", "printed"),
    [
        ("nsfw", [], "has_nsfw_contents: [true]"),
        ("normal", [], "has_nsfw_contents: [false]"),
        ("0.7", ["--nsfw-threshold", "0.6"], "has_nsfw_contents: [true]"),
        ("0.7", ["--nsfw-threshold", "0.8"], "has_nsfw_contents: [false]"),
    ],
)
def test_generate_prints_the_flag(tmp_path, image_file, folders, capsys, model, flags, printed):
    out, code = generate(tmp_path, image_file, "--safety-checker", str(folders[model]), *flags)
    assert code == 0 and out.is_file()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == printed and lines[-1].startswith("done in")


def test_generate_with_the_checker_off_says_so(tmp_path, image_file, capsys):
    out, code = generate(tmp_path, image_file, "--safety-checker", "off")
    assert code == 0
    assert "has_nsfw_contents: [false] (safety checker off)" in capsys.readouterr().out


def test_generate_block_writes_nothing(tmp_path, image_file, folders, capsys):
    out, code = generate(
        tmp_path, image_file, "--safety-checker", str(folders["nsfw"]), "--nsfw-action", "block"
    )
    assert code == 2 and not out.exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: the output was withheld: the safety checker rated the video NSFW")


# --- weights download --safety-checker ------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path, folders, monkeypatch) -> list[dict]:
    repo = shutil.copytree(folders["nsfw"], tmp_path / "hub" / SAFETY_CHECKER_REPO)
    (repo / "pytorch_model.bin").write_bytes(b"legacy" * 10)  # copies a download must skip
    (repo / "onnx").mkdir()
    (repo / "onnx" / "model.onnx").write_bytes(b"onnx")
    (repo / "README.md").write_text("model card")
    calls: list[dict] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download(tmp_path / "hub", calls))
    return calls


def test_download_fetches_the_pinned_classifier_into_the_manifest(tmp_path, fake_hub):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model_index.json").write_text("{}")  # the model's own files stay as they are
    download_weights(weights, sources=[safety_checker_source()])
    assert [(c["repo_id"], c["revision"], c["local_dir"]) for c in fake_hub] == [
        (SAFETY_CHECKER_REPO, SAFETY_CHECKER_REVISION, weights / "safety_checker")
    ]
    assert len(SAFETY_CHECKER_REVISION) == 40
    manifest = read_manifest(weights)
    assert set(manifest.files) == {
        "model_index.json",
        "safety_checker/config.json",
        "safety_checker/preprocessor_config.json",
        "safety_checker/model.safetensors",
    }
    assert manifest.sources["safety_checker"] == {
        "repo_id": SAFETY_CHECKER_REPO, "revision": SAFETY_CHECKER_REVISION, "subdir": "safety_checker"
    }  # fmt: skip
    # auto finds it there, and it loads through the real path.
    assert resolve_folder("auto", str(weights)) == weights / "safety_checker"
    assert gate(weights / "safety_checker").review(FRAMES, params(), label="t") is True
    # verify covers it: a flipped byte is a sha256 mismatch, a broken config a layout problem.
    shard = weights / "safety_checker" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (weights / "safety_checker" / "preprocessor_config.json").write_text("[]")
    rows = {r.path: r for r in verify_weights_dir(weights).problems}
    assert rows["safety_checker/model.safetensors"].status == CheckStatus.SHA256_MISMATCH
    assert rows["safety_checker/"].status == CheckStatus.LAYOUT
    assert "preprocessor_config.json" in rows["safety_checker/"].detail


def test_cli_download_safety_checker(tmp_path, fake_hub, capsys):
    weights = tmp_path / "w"
    assert cli_main(["weights", "download", "--safety-checker", "--dir", str(weights)]) == 0
    assert [c["repo_id"] for c in fake_hub] == [SAFETY_CHECKER_REPO]  # the classifier alone
    assert "safety_checker" in capsys.readouterr().out
    assert (weights / "safety_checker" / "model.safetensors").is_file()
    assert not (weights / "safety_checker" / "pytorch_model.bin").exists()
    assert cli_main(["weights", "verify", "--dir", str(weights)]) == 1  # the model itself is missing
    out = capsys.readouterr().out
    assert "safety_checker" not in out  # ... but the classifier is fine
