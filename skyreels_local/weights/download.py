"""`skyreels-local weights download`: fetch the weights folder from the Hugging Face Hub.

Two snapshots make one folder (see weights.py): the base HunyuanVideo components without the
base repository's own transformer, and the SkyReels image-to-video transformer into
`transformer/`. huggingface_hub's `snapshot_download` does the work: it resumes interrupted files
(its `local_dir` keeps partial downloads and metadata under `.cache/huggingface/`), downloads files
in parallel and draws progress bars. Afterwards every file is hashed into the manifest that
`weights verify` checks.

Without network access the Hub raises `LocalEntryNotFoundError`; that becomes a WeightsError that
spells out the air-gapped procedure.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError
from ..safety.policy import SAFETY_CHECKER_SUBDIR
from .layout import (
    BASE_REPO,
    TRANSFORMER_REPO,
    TRANSFORMER_SUBDIR,
    Manifest,
    ProgressFn,
    build_manifest,
    list_weight_files,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

# Pinned commits: a download made today and one made next year are the same bytes.
# hunyuanvideo-community/HunyuanVideo at the commit diffusers' HunyuanVideo examples were run on.
BASE_REVISION = "e8c2aaa66fe3742a32c11a6766aecbf07c56e773"
# No commit hash of Skywork/SkyReels-V1-Hunyuan-I2V could be confirmed offline when this was
# written, so the default follows `main` (the repository has not changed since its release);
# pass `--transformer-revision <commit>` to pin it. The manifest records what was asked for.
TRANSFORMER_REVISION = "main"

# The base repo's own transformer is the text-to-video one (and 25 GB): never fetch it. Skip the
# non-PyTorch and legacy pickle copies that some components carry next to their safetensors.
BASE_ALLOW = (
    "model_index.json",
    "scheduler/*",
    "vae/*",
    "text_encoder/*",
    "text_encoder_2/*",
    "tokenizer/*",
    "tokenizer_2/*",
)
BASE_IGNORE = ("transformer/*", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx")
TRANSFORMER_ALLOW = ("config.json", "*.safetensors", "*.safetensors.index.json")

# The optional NSFW safety checker (README "Safety checker"; `--safety-checker`): a ViT image
# classifier, classes `normal` / `nsfw`, Apache-2.0 (its model card's licence). Only what
# transformers loads: the repository also holds pytorch_model.bin, ONNX and YOLO copies.
SAFETY_CHECKER_REPO = "Falconsai/nsfw_image_detection"
# MUST BE VERIFIED against the Hub before release (`hf api` / the repository's commit list): the
# Hub cannot be reached from where this was written. It is the commit several public projects pin
# for this repository's config.json + preprocessor_config.json + model.safetensors (one of them
# records labels 0=normal 1=nsfw, Apache-2.0 and a 343,223,968-byte model.safetensors there).
SAFETY_CHECKER_REVISION = "04367978d3474804ab1a00a9bd6548b741764069"
SAFETY_CHECKER_ALLOW = ("config.json", "preprocessor_config.json", "model.safetensors")

AIR_GAPPED_PROCEDURE = """\
This machine cannot reach the Hugging Face Hub ({reason}).
To install weights on a machine without network access:
  1. On a machine with network access (same skyreels-local version):
       skyreels-local weights download --dir weights/
     (or set HF_ENDPOINT / --endpoint to a mirror you can reach)
  2. Copy the whole folder, including skyreels-manifest.json, to this machine, e.g.
       rsync -a --progress weights/ THIS_HOST:{dir}/
  3. Here:
       skyreels-local weights verify --dir {dir}
A studio that already has a single-file SkyReels I2V checkpoint (ComfyUI bf16 or fp8_e4m3fn) can
download only the base components (--skip-transformer) and run `skyreels-local weights import FILE`."""

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Source:
    """One Hub snapshot that fills part of the weights folder."""

    key: str  # name in the manifest's `sources`
    repo_id: str
    revision: str
    subdir: str  # "" for the folder itself
    allow_patterns: tuple[str, ...]
    ignore_patterns: tuple[str, ...] = ()

    @property
    def pinned(self) -> bool:
        return bool(_COMMIT_RE.match(self.revision))

    def manifest_entry(self) -> dict[str, str]:
        return {"repo_id": self.repo_id, "revision": self.revision, "subdir": self.subdir}


def default_sources(
    *,
    base_revision: str = BASE_REVISION,
    transformer_revision: str = TRANSFORMER_REVISION,
    skip_transformer: bool = False,
) -> list[Source]:
    sources = [Source("base", BASE_REPO, base_revision, "", BASE_ALLOW, BASE_IGNORE)]
    if not skip_transformer:
        sources.append(
            Source(
                "transformer", TRANSFORMER_REPO, transformer_revision, TRANSFORMER_SUBDIR, TRANSFORMER_ALLOW
            )
        )
    return sources


def safety_checker_source(revision: str = SAFETY_CHECKER_REVISION) -> Source:
    """The classifier, into `<weights>/safety_checker/` (where `--safety-checker auto` looks)."""
    return Source(
        "safety_checker", SAFETY_CHECKER_REPO, revision, SAFETY_CHECKER_SUBDIR, SAFETY_CHECKER_ALLOW
    )


def download_weights(
    weights_dir: str | Path,
    *,
    sources: list[Source] | None = None,
    endpoint: str | None = None,
    max_workers: int = 8,
    token: str | bool | None = None,
    on_hash_bytes: ProgressFn | None = None,
) -> Manifest:
    """Download (or resume) every source into `weights_dir`, then write and return its manifest."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    path = Path(weights_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    sources = default_sources() if sources is None else sources
    for source in sources:
        if not source.pinned:
            log.warning(
                "%s: revision %r is not a commit hash; the download is not pinned",
                source.repo_id,
                source.revision,
            )
        target = path / source.subdir if source.subdir else path
        log.info("downloading %s@%s into %s", source.repo_id, source.revision, target)
        try:
            snapshot_download(
                source.repo_id,
                revision=source.revision,
                local_dir=target,
                allow_patterns=list(source.allow_patterns),
                ignore_patterns=list(source.ignore_patterns) or None,
                max_workers=max_workers,
                endpoint=endpoint,
                token=token,
            )
        except (GatedRepoError, RepositoryNotFoundError) as exc:
            raise WeightsError(
                f"the Hub refused {source.repo_id}@{source.revision}: {exc}. If the repository needs a licence "
                "acceptance or a token, accept it on huggingface.co and run `hf auth login` (or set HF_TOKEN)."
            ) from exc
        except LocalEntryNotFoundError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(AIR_GAPPED_PROCEDURE.format(reason=reason, dir=path)) from exc
    manifest = _manifest_after_download(path, sources, on_hash_bytes)
    write_manifest(path, manifest)
    log.info("wrote %s (%d files)", path / "skyreels-manifest.json", len(manifest.files))
    return manifest


def _manifest_after_download(path: Path, sources: list[Source], on_hash_bytes: ProgressFn | None) -> Manifest:
    """Hash every file the downloaded sources own. Files owned by parts not downloaded this time
    (e.g. a transformer imported earlier from a single file) keep their previous entries when their
    size still matches; anything else on disk is hashed as found."""
    previous = read_manifest(path)
    rehash: list[str] = []
    manifest = Manifest(sources=dict(previous.sources) if previous else {})
    for rel in list_weight_files(path):
        old = previous.files.get(rel) if previous else None
        owned = any(_owns(source, rel) for source in sources)
        if not owned and old is not None and (path / rel).stat().st_size == old.size:
            manifest.files[rel] = old
        else:
            rehash.append(rel)
    fresh = build_manifest(path, only=rehash, base=manifest, on_bytes=on_hash_bytes)
    fresh.sources.update({s.key: s.manifest_entry() for s in sources})
    return fresh


def _owns(source: Source, rel: str) -> bool:
    """A subfolder source owns its folder; the root source owns everything outside the
    subfolders of the other sources (transformer/, safety_checker/)."""
    top = rel.split("/", 1)[0] if "/" in rel else ""
    return top == source.subdir if source.subdir else top not in (TRANSFORMER_SUBDIR, SAFETY_CHECKER_SUBDIR)
