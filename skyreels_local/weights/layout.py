"""The on-disk weights layout, its completeness check, and loading it without the network.

Layout of a weights directory (see weights/README.md):

    WEIGHTS_DIR/
      model_index.json  scheduler/  vae/  text_encoder/  text_encoder_2/  tokenizer/  tokenizer_2/
                        <- hunyuanvideo-community/HunyuanVideo, without its own transformer
      transformer/      <- Skywork/SkyReels-V1-Hunyuan-I2V: config.json + safetensors shards

So the directory is a regular diffusers pipeline folder whose transformer is the SkyReels
image-to-video one (32 input channels). We load the components one by one rather than through
`DiffusionPipeline.from_pretrained` so that each gets its own dtype and the transformer can be
loaded with a memory profile's storage settings.

Integrity: `skyreels-local weights download` (and `import`) write `skyreels-manifest.json` at the top
of the folder: size and sha256 of every file, plus where each part came from. `verify_weights_dir`
checks a folder against it (and reads every safetensors header), which is how an air-gapped copy is
checked after it has been carried in. Loading does the cheap half (sizes and headers, no hashing),
so a truncated copy fails at start-up with the file named rather than deep inside safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import WeightsError

log = logging.getLogger(__name__)

BASE_REPO = "hunyuanvideo-community/HunyuanVideo"
TRANSFORMER_REPO = "Skywork/SkyReels-V1-Hunyuan-I2V"
TRANSFORMER_SUBDIR = "transformer"
MODEL_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
TOKENIZER_COMPONENTS = ("tokenizer", "tokenizer_2")
# config.json of Skywork/SkyReels-V1-Hunyuan-I2V (diffusers HunyuanVideoTransformer3DModel).
SKYREELS_I2V_TRANSFORMER_CONFIG: dict[str, Any] = {
    "in_channels": 32,
    "out_channels": 16,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "num_layers": 20,
    "num_single_layers": 40,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 4096,
    "pooled_projection_dim": 768,
    "rope_theta": 256.0,
    "rope_axes_dim": [16, 56, 56],
}
HOW_TO_GET = (
    "Download them with `skyreels-local weights download --dir {dir}` on a machine with network access, "
    "or copy a complete weights folder here and check it with `skyreels-local weights verify --dir {dir}` "
    "(see weights/README.md)."
)


@dataclass(frozen=True)
class WeightsProblem:
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _model_folder_problems(folder: Path, name: str) -> list[WeightsProblem]:
    problems: list[WeightsProblem] = []
    if not folder.is_dir():
        return [WeightsProblem(f"{name}/", "missing folder")]
    if not (folder / "config.json").is_file():
        problems.append(WeightsProblem(f"{name}/config.json", "missing"))
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        for index in indexes:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                problems.append(WeightsProblem(f"{name}/{index.name}", f"unreadable index ({exc})"))
                continue
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    problems.append(WeightsProblem(f"{name}/{shard}", "missing shard named in the index"))
    elif not any(folder.glob("*.safetensors")):
        problems.append(WeightsProblem(f"{name}/*.safetensors", "no weights file"))
    return problems


def _tokenizer_folder_problems(folder: Path, name: str) -> list[WeightsProblem]:
    if not folder.is_dir():
        return [WeightsProblem(f"{name}/", "missing folder")]
    known = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any((folder / f).is_file() for f in known):
        return [WeightsProblem(f"{name}/", f"no tokenizer files (expected one of {', '.join(known)})")]
    return []


def find_layout_problems(weights_dir: Path) -> list[WeightsProblem]:
    """Everything missing from a weights directory, in a stable order (empty when complete)."""
    if not weights_dir.is_dir():
        return [WeightsProblem(str(weights_dir), "no such directory")]
    problems: list[WeightsProblem] = []
    if not (weights_dir / "model_index.json").is_file():
        problems.append(WeightsProblem("model_index.json", "missing"))
    if not (weights_dir / "scheduler" / "scheduler_config.json").is_file():
        problems.append(WeightsProblem("scheduler/scheduler_config.json", "missing"))
    for name in MODEL_COMPONENTS:
        problems += _model_folder_problems(weights_dir / name, name)
    for name in TOKENIZER_COMPONENTS:
        problems += _tokenizer_folder_problems(weights_dir / name, name)
    if not problems:
        problems += _transformer_kind_problems(weights_dir / TRANSFORMER_SUBDIR)
    return problems + _safety_checker_problems(weights_dir)


def _safety_checker_problems(weights_dir: Path) -> list[WeightsProblem]:
    """The optional NSFW classifier (`weights download --safety-checker`): checked when present."""
    from ..safety.policy import SAFETY_CHECKER_SUBDIR, folder_problems

    folder = weights_dir / SAFETY_CHECKER_SUBDIR
    if not folder.is_dir():
        return []
    return [WeightsProblem(f"{SAFETY_CHECKER_SUBDIR}/", problem) for problem in folder_problems(folder)]


def _transformer_kind_problems(folder: Path) -> list[WeightsProblem]:
    """The base repo's own transformer (text-to-video, 16 channels) is the wrong one: say so."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return [WeightsProblem(f"{TRANSFORMER_SUBDIR}/config.json", f"unreadable ({exc})")]
    in_channels = config.get("in_channels")
    if in_channels is not None and in_channels != 2 * config.get("out_channels", in_channels):
        return [
            WeightsProblem(
                f"{TRANSFORMER_SUBDIR}/config.json",
                f"in_channels={in_channels}: this is a text-to-video transformer; the image-to-video "
                f"one ({TRANSFORMER_REPO}) has twice the output channels as input",
            )
        ]
    return []


def check_weights_dir(weights_dir: str | Path) -> Path:
    """Return the directory as a Path, or raise WeightsError naming every missing or damaged file.

    Checks the layout, then (cheaply: no hashing) every size recorded in the manifest and every
    safetensors header, so that a truncated copy is reported before any loading starts.
    """
    path = Path(weights_dir).expanduser()
    problems = find_layout_problems(path)
    if not problems:
        report = verify_weights_dir(path, hash_files=False, require_manifest=False)
        problems = [WeightsProblem(row.path, f"{row.status.value}: {row.detail}") for row in report.problems]
    if problems:
        listing = "; ".join(str(p) for p in problems)
        raise WeightsError(
            f"weights directory {str(path)!r} is incomplete: {listing}. " + HOW_TO_GET.format(dir=path)
        )
    return path


# --- manifest ------------------------------------------------------------------------------------

MANIFEST_NAME = "skyreels-manifest.json"
MANIFEST_FORMAT = "skyreels-local-weights-manifest/1"
# Folders that huggingface_hub keeps inside a `local_dir` download (resume metadata, locks): not weights.
_IGNORED_DIRS = frozenset({".cache", ".git", "__pycache__"})
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass
class Manifest:
    """What a complete weights folder holds: every file's size and sha256, and where parts came from."""

    files: dict[str, FileRecord] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "created_at": self.created_at,
                "sources": self.sources,
                "files": {k: {"size": v.size, "sha256": v.sha256} for k, v in sorted(self.files.items())},
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        files = {k: FileRecord(int(v["size"]), str(v["sha256"])) for k, v in data["files"].items()}
        return cls(
            files=files, sources=dict(data.get("sources", {})), created_at=str(data.get("created_at", ""))
        )


def manifest_path(weights_dir: Path) -> Path:
    return weights_dir / MANIFEST_NAME


def read_manifest(weights_dir: Path) -> Manifest | None:
    """The folder's manifest, None when it has none; WeightsError when it is unreadable."""
    path = manifest_path(weights_dir)
    if not path.is_file():
        return None
    try:
        return Manifest.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path} is unreadable ({exc}); rewrite it with `skyreels-local weights verify "
                           f"--write-manifest --dir {weights_dir}` on a known-good copy") from exc  # fmt: skip


def list_weight_files(weights_dir: Path) -> list[str]:
    """Every file a manifest covers, as POSIX paths relative to the folder, sorted."""
    found: list[str] = []
    for root, dirs, files in os.walk(weights_dir):
        dirs[:] = sorted(d for d in dirs if d not in _IGNORED_DIRS)
        for name in files:
            full = Path(root) / name
            rel = full.relative_to(weights_dir).as_posix()
            if rel == MANIFEST_NAME or name.endswith((".incomplete", ".lock")):
                continue
            found.append(rel)
    return sorted(found)


ProgressFn = Callable[[int], None]  # called with a number of bytes just processed


def sha256_file(path: Path, on_bytes: ProgressFn | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL on large buffers: threads hash in parallel
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def _parallel(fn: Callable[[str], Any], items: Iterable[str], workers: int) -> dict[str, Any]:
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items) or 1))) as pool:
        return dict(zip(items, pool.map(fn, items), strict=True))


def build_manifest(
    weights_dir: Path,
    *,
    sources: dict[str, dict[str, Any]] | None = None,
    only: Iterable[str] | None = None,
    base: Manifest | None = None,
    on_bytes: ProgressFn | None = None,
    workers: int = 4,
) -> Manifest:
    """Hash the folder's files into a manifest. With `only`, hash just those paths and keep the
    other entries of `base` (used after an import replaces transformer/)."""
    names = list(only) if only is not None else list_weight_files(weights_dir)
    hashed = _parallel(lambda rel: sha256_file(weights_dir / rel, on_bytes), names, workers)
    files = dict(base.files) if base is not None else {}
    for rel, digest in hashed.items():
        files[rel] = FileRecord((weights_dir / rel).stat().st_size, digest)
    merged_sources = dict(base.sources) if base is not None else {}
    merged_sources.update(sources or {})
    return Manifest(
        files=files, sources=merged_sources, created_at=datetime.now(UTC).isoformat(timespec="seconds")
    )


def write_manifest(weights_dir: Path, manifest: Manifest) -> Path:
    """Atomically (write then rename) so an interrupted write never leaves half a manifest."""
    path = manifest_path(weights_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(manifest.to_json() + "\n")
    os.replace(tmp, path)
    return path


# --- safetensors headers -------------------------------------------------------------------------

_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def safetensors_header_problem(path: Path) -> str | None:
    """None when the file's header is readable and describes exactly the bytes the file holds.

    Reads only the header (a few KB), so it is cheap enough to run at every start-up. A truncated
    copy shows up as data that ends past the end of the file.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"{size} bytes: too short for a safetensors header"
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                return f"header length {header_len} does not fit in a {size}-byte file"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"unreadable header ({exc})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            itemsize = _SAFETENSORS_DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r}: malformed header entry"
        if itemsize is not None and end - begin != numel * itemsize:
            return f"tensor {name!r}: {end - begin} bytes for {numel} x {info['dtype']}"
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size != expected:
        return f"header describes {expected} bytes but the file has {size} (truncated or damaged copy)"
    return None


# --- verification --------------------------------------------------------------------------------


class CheckStatus(StrEnum):
    OK = "ok"
    MISSING = "missing"
    SIZE_MISMATCH = "size mismatch"
    SHA256_MISMATCH = "sha256 mismatch"
    BAD_HEADER = "bad safetensors header"
    LAYOUT = "layout"
    NO_MANIFEST = "no manifest"
    UNLISTED = "not in manifest"  # informational: not a failure


@dataclass(frozen=True)
class FileCheck:
    path: str
    status: CheckStatus
    size: int | None = None
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status not in (CheckStatus.OK, CheckStatus.UNLISTED)


@dataclass
class VerifyReport:
    weights_dir: Path
    rows: list[FileCheck]
    hashed: bool
    manifest: Manifest | None

    @property
    def problems(self) -> list[FileCheck]:
        return [r for r in self.rows if r.failed]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_weights_dir(
    weights_dir: str | Path,
    *,
    hash_files: bool = True,
    require_manifest: bool = True,
    on_bytes: ProgressFn | None = None,
    workers: int = 4,
) -> VerifyReport:
    """Check completeness and integrity of a weights folder.

    Layout (every component present), then against the manifest: each listed file present, of
    the recorded size and (with `hash_files`) sha256; and every safetensors file's header readable
    and consistent with its size. Files found but not listed are reported, not failed.
    """
    path = Path(weights_dir).expanduser()
    rows = [FileCheck(p.path, CheckStatus.LAYOUT, detail=p.problem) for p in find_layout_problems(path)]
    if not path.is_dir():
        return VerifyReport(path, rows, hash_files, None)
    manifest = read_manifest(path)
    present = set(list_weight_files(path))
    if manifest is None:
        if require_manifest:
            rows.append(
                FileCheck(
                    MANIFEST_NAME,
                    CheckStatus.NO_MANIFEST,
                    detail="integrity unknown: folders made by `weights download` have one; to trust this "
                    "copy as it is, run `skyreels-local weights verify --write-manifest` on the machine it came from",
                )
            )
        listed: dict[str, FileRecord] = {}
    else:
        listed = manifest.files
    size_ok: list[str] = []
    for rel, record in sorted(listed.items()):
        if rel not in present:
            rows.append(
                FileCheck(rel, CheckStatus.MISSING, record.size, "listed in the manifest, not on disk")
            )
            continue
        actual = (path / rel).stat().st_size
        if actual != record.size:
            rows.append(
                FileCheck(
                    rel, CheckStatus.SIZE_MISMATCH, actual, f"expected {record.size} bytes, found {actual}"
                )
            )
        else:
            size_ok.append(rel)
    headers = _parallel(
        lambda rel: safetensors_header_problem(path / rel),
        [rel for rel in sorted(present) if rel.endswith(".safetensors")],
        workers,
    )
    digests = _parallel(lambda rel: sha256_file(path / rel, on_bytes), size_ok, workers) if hash_files else {}
    failed_paths = {r.path for r in rows}
    for rel in sorted(present):
        if rel in failed_paths:
            continue
        size = (path / rel).stat().st_size
        problem = headers.get(rel)
        if problem is not None:
            rows.append(FileCheck(rel, CheckStatus.BAD_HEADER, size, problem))
        elif rel in digests and digests[rel] != listed[rel].sha256:
            rows.append(FileCheck(rel, CheckStatus.SHA256_MISMATCH, size, f"expected {listed[rel].sha256[:16]}..., "
                                  f"found {digests[rel][:16]}..."))  # fmt: skip
        elif rel not in listed and manifest is not None:
            rows.append(FileCheck(rel, CheckStatus.UNLISTED, size, "not in the manifest (ignored)"))
        else:
            rows.append(FileCheck(rel, CheckStatus.OK, size, "sha256 ok" if rel in digests else ""))
    rows.sort(key=lambda r: (not r.failed, r.path))
    return VerifyReport(path, rows, hash_files, manifest)
