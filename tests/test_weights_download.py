"""Download layout -> manifest -> verify -> load, against a local stand-in for the Hub.

The Hub cannot be reached from tests, so `snapshot_download` is replaced by a copy from a local
folder laid out like the two Hub repositories (the one mock in these tests). Everything after it
is real: huggingface_hub's pattern filter, the manifest, sha256, safetensors headers, the loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from skyreels_local.cli import main as cli_main
from skyreels_local.engine.loader import load_engine
from skyreels_local.engine.request import GenerationRequest
from skyreels_local.errors import WeightsError
from skyreels_local.weights import download
from skyreels_local.weights.download import BASE_REVISION, default_sources, download_weights
from skyreels_local.weights.layout import (
    BASE_REPO,
    MANIFEST_NAME,
    TRANSFORMER_REPO,
    CheckStatus,
    check_weights_dir,
    read_manifest,
    safetensors_header_problem,
    verify_weights_dir,
)
from skyreels_local.weights.synthetic import write_tiny_weights
from tests.conftest import make_test_image
from tests.weights_helpers import fake_snapshot_download


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory) -> Path:
    """Two repositories as the Hub serves them, with the files a download must skip."""
    hub = tmp_path_factory.mktemp("hub")
    tiny = write_tiny_weights(tmp_path_factory.mktemp("tiny"))
    base = hub / BASE_REPO
    shutil.copytree(tiny, base, ignore=shutil.ignore_patterns("transformer"))
    # The base repo's own (text-to-video) transformer: must never be downloaded.
    (base / "transformer").mkdir()
    (base / "transformer" / "config.json").write_text('{"in_channels": 16, "out_channels": 16}')
    (base / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    # Legacy copies next to the safetensors: skipped.
    (base / "text_encoder_2" / "pytorch_model.bin").write_bytes(b"legacy" * 10)
    (base / "README.md").write_text("base model card")
    sky = hub / TRANSFORMER_REPO
    shutil.copytree(tiny / "transformer", sky)
    (sky / "README.md").write_text("skyreels model card")
    (sky / "assets").mkdir()
    (sky / "assets" / "demo.gif").write_bytes(b"GIF89a")
    return hub


@pytest.fixture
def hub_calls(fake_hub, monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download(fake_hub, calls))
    return calls


@pytest.fixture
def downloaded(hub_calls, tmp_path) -> Path:
    folder = tmp_path / "weights"
    download_weights(folder)
    return folder


def test_download_fetches_the_right_files_at_pinned_revisions(downloaded, hub_calls):
    assert [c["repo_id"] for c in hub_calls] == [BASE_REPO, TRANSFORMER_REPO]
    assert hub_calls[0]["revision"] == BASE_REVISION
    assert hub_calls[0]["local_dir"] == downloaded
    assert hub_calls[1]["local_dir"] == downloaded / "transformer"
    manifest = read_manifest(downloaded)
    assert manifest is not None
    files = set(manifest.files)
    # The SkyReels transformer, not the base repo's; no model cards, assets or legacy pickles.
    assert "transformer/config.json" in files
    assert json.loads((downloaded / "transformer" / "config.json").read_text())["in_channels"] == 8
    assert not any(f.endswith((".bin", "README.md", ".gif")) for f in files)
    assert {"model_index.json", "vae/config.json", "tokenizer/tokenizer.json"} <= files
    assert manifest.sources["base"] == {"repo_id": BASE_REPO, "revision": BASE_REVISION, "subdir": ""}
    assert manifest.sources["transformer"]["repo_id"] == TRANSFORMER_REPO
    # Sizes and hashes are of the files on disk.
    import hashlib

    record = manifest.files["vae/diffusion_pytorch_model.safetensors"]
    data = (downloaded / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert record.size == len(data)
    assert record.sha256 == hashlib.sha256(data).hexdigest()


def test_verified_download_loads_and_generates(downloaded):
    report = verify_weights_dir(downloaded)
    assert report.ok, report.problems
    assert report.hashed
    assert {r.status for r in report.rows} == {CheckStatus.OK}
    engine = load_engine(str(downloaded), device="cpu", profile="cpu")
    assert engine.profile == "cpu"
    result = engine.generate(
        GenerationRequest(prompt="a quay", image=make_test_image(), width=32, height=32, num_frames=5,
                          num_inference_steps=2, seed=1)
    )  # fmt: skip
    assert result.frames.shape == (5, 32, 32, 3)


def test_verify_catches_a_truncated_shard_and_a_missing_file(downloaded):
    shard = downloaded / "vae" / "diffusion_pytorch_model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    (downloaded / "tokenizer_2" / "tokenizer.json").unlink()
    (downloaded / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "tampered"}')

    report = verify_weights_dir(downloaded)
    assert not report.ok
    by_path = {r.path: r for r in report.problems}
    assert by_path["vae/diffusion_pytorch_model.safetensors"].status == CheckStatus.SIZE_MISMATCH
    assert (
        f"expected {len(data)} bytes, found {len(data) - 100}"
        in by_path["vae/diffusion_pytorch_model.safetensors"].detail
    )
    assert by_path["tokenizer_2/tokenizer.json"].status == CheckStatus.MISSING
    assert by_path["scheduler/scheduler_config.json"].status in (
        CheckStatus.SIZE_MISMATCH,
        CheckStatus.SHA256_MISMATCH,
    )
    # Loading does the cheap half (sizes, headers) and names the damaged file.
    with pytest.raises(WeightsError, match=r"vae/diffusion_pytorch_model\.safetensors"):
        check_weights_dir(downloaded)


def test_same_size_corruption_needs_the_hash(downloaded):
    shard = downloaded / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the tensor data: size and header still fine
    shard.write_bytes(bytes(data))
    assert verify_weights_dir(downloaded, hash_files=False).ok
    report = verify_weights_dir(downloaded)
    assert [(r.path, r.status) for r in report.problems] == [
        ("transformer/diffusion_pytorch_model.safetensors", CheckStatus.SHA256_MISMATCH)
    ]


def test_header_check_without_manifest(tmp_path):
    folder = write_tiny_weights(tmp_path / "w")
    shard = folder / "text_encoder" / "model.safetensors"
    assert safetensors_header_problem(shard) is None
    shard.write_bytes(shard.read_bytes()[:-7])
    problem = safetensors_header_problem(shard)
    assert problem is not None and "truncated" in problem
    report = verify_weights_dir(folder)
    statuses = {r.path: r.status for r in report.problems}
    assert statuses == {
        MANIFEST_NAME: CheckStatus.NO_MANIFEST,
        "text_encoder/model.safetensors": CheckStatus.BAD_HEADER,
    }


def test_resume_after_an_interrupted_download_rehashes_and_completes(hub_calls, tmp_path):
    folder = tmp_path / "weights"
    download_weights(folder, sources=default_sources(skip_transformer=True))
    assert not (folder / "transformer").exists()
    with pytest.raises(WeightsError, match="transformer"):
        check_weights_dir(folder)
    download_weights(folder)  # the second run fetches what is missing
    assert verify_weights_dir(folder).ok


def test_offline_download_explains_the_air_gapped_procedure(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: this is huggingface_hub's real offline refusal.
    with pytest.raises(WeightsError) as info:
        download_weights(tmp_path / "w")
    message = info.value.message
    assert "cannot reach the Hugging Face Hub" in message
    assert "skyreels-local weights download --dir weights/" in message
    assert f"skyreels-local weights verify --dir {tmp_path / 'w'}" in message


def test_unreachable_endpoint_gives_the_same_clear_message(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nothing listens on: a real refused connection
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # (A branch name rather than a pinned commit: huggingface_hub retries a commit's file listing
    # with backoff for ~23 s before giving up; a branch lookup fails at once. Same error either way.)
    sources = default_sources(base_revision="main", skip_transformer=True)
    with pytest.raises(WeightsError, match="cannot reach the Hugging Face Hub"):
        download_weights(tmp_path / "w", sources=sources, endpoint=f"http://127.0.0.1:{port}")


def test_unpinned_revision_is_recorded_and_warned(hub_calls, tmp_path, caplog):
    download_weights(tmp_path / "w", sources=default_sources(transformer_revision="main"))
    assert read_manifest(tmp_path / "w").sources["transformer"]["revision"] == "main"
    assert "not a commit hash" in caplog.text
    assert download.Source("x", "r", BASE_REVISION, "", ()).pinned


def test_cli_verify_table_and_exit_codes(downloaded, capsys):
    assert cli_main(["weights", "verify", "--dir", str(downloaded)]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "sha256" in out
    (downloaded / "vae" / "config.json").unlink()
    assert cli_main(["weights", "verify", "--dir", str(downloaded), "--quick"]) == 1
    out = capsys.readouterr().out
    assert "vae/config.json" in out and "FAILED" in out


def test_cli_write_manifest_then_verify(tmp_path, capsys):
    folder = write_tiny_weights(tmp_path / "w")
    assert cli_main(["weights", "verify", "--dir", str(folder)]) == 1
    assert "no manifest" in capsys.readouterr().out
    assert cli_main(["weights", "verify", "--dir", str(folder), "--write-manifest"]) == 0
    assert read_manifest(folder) is not None


def test_cli_download_offline_exits_with_the_procedure(tmp_path, capsys):
    assert cli_main(["weights", "download", "--dir", str(tmp_path / "w")]) == 2
    assert "weights verify" in capsys.readouterr().err
