"""`skyreels-local weights download|verify|import`: get the weights folder, check it, or build its
transformer from a single-file checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import DEFAULT_WEIGHTS_DIR, TINY_MODEL, Settings
from ..weights.layout import CheckStatus, VerifyReport
from .settings_flags import HelpFormatter

EXIT_OK = 0
EXIT_PROBLEMS = 1


DIR_HELP = "weights folder (default: SKYREELS_MODEL when it names a folder, else weights/)"


def _default_dir(settings: Settings) -> Path:
    # SKYREELS_MODEL names the weights folder the server loads; `tiny-random` has none.
    return DEFAULT_WEIGHTS_DIR if settings.model == TINY_MODEL else Path(settings.model)


def _weights_dir(args: argparse.Namespace) -> Path:
    """--dir, else from the settings (built now, when the command runs, not with the parser)."""
    from .settings_flags import load_settings

    return args.dir if args.dir is not None else _default_dir(load_settings())


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..weights.download import (
        BASE_REVISION,
        SAFETY_CHECKER_REPO,
        SAFETY_CHECKER_REVISION,
        TRANSFORMER_REVISION,
    )

    p = subparsers.add_parser(
        "weights",
        help="download, verify or import model weights",
        description="Manage the local weights folder (layout: weights/README.md).",
    )
    sub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    fmt = HelpFormatter

    d = sub.add_parser(
        "download",
        help="download the weights from the Hugging Face Hub (resumable)",
        description="Download the SkyReels I2V transformer and the HunyuanVideo base components (without the "
        "base repository's own transformer) into one folder, then write its manifest. Re-running resumes. "
        "Without network access it prints how to carry the weights in from another machine.",
        formatter_class=fmt,
    )
    d.add_argument("--dir", type=Path, default=None, help=DIR_HELP)
    d.add_argument(
        "--base-revision", default=BASE_REVISION, help="commit of hunyuanvideo-community/HunyuanVideo"
    )
    d.add_argument(
        "--transformer-revision",
        default=TRANSFORMER_REVISION,
        help="commit of Skywork/SkyReels-V1-Hunyuan-I2V (default follows main: pass a commit hash to pin it)",
    )
    d.add_argument(
        "--skip-transformer",
        action="store_true",
        help="only the base components (when the transformer comes from `weights import`)",
    )
    d.add_argument(
        "--safety-checker",
        action="store_true",
        help=f"only the optional NSFW safety checker ({SAFETY_CHECKER_REPO}, Apache-2.0) into "
        "DIR/safety_checker/, added to the manifest (README: Safety checker)",
    )
    d.add_argument(
        "--safety-checker-revision", default=SAFETY_CHECKER_REVISION, help=f"commit of {SAFETY_CHECKER_REPO}"
    )
    d.add_argument(
        "--endpoint", default=None, help="Hub endpoint or mirror (default: HF_ENDPOINT or huggingface.co)"
    )
    d.add_argument("--max-workers", type=int, default=8, help="parallel file downloads")
    d.set_defaults(func=run_download)

    v = sub.add_parser(
        "verify",
        help="check completeness and integrity against the manifest",
        description="Check that the folder is complete, that every file has the size and sha256 recorded in its "
        "manifest, and that every safetensors header is readable. Prints a table; exits 0 when all is well, "
        "1 otherwise.",
        formatter_class=fmt,
    )
    v.add_argument("--dir", type=Path, default=None, help=DIR_HELP)
    v.add_argument("--quick", action="store_true", help="sizes and headers only (skip sha256)")
    v.add_argument(
        "--write-manifest",
        action="store_true",
        help="record the folder as it is now as the manifest (on a known-good copy), then verify",
    )
    v.add_argument("--all", action="store_true", help="list every file, not only problems")
    v.set_defaults(func=run_verify)

    i = sub.add_parser(
        "import",
        help="build transformer/ from a single-file checkpoint (ComfyUI bf16 or fp8_e4m3fn)",
        description="Convert a single-file SkyReels I2V transformer checkpoint (original HunyuanVideo / ComfyUI "
        "key naming, bf16 or fp8_e4m3fn, optionally ComfyUI scaled fp8) into the folder's diffusers-layout "
        "transformer/, and record it in the manifest. The base components still come from `weights download "
        "--skip-transformer`.",
        formatter_class=fmt,
    )
    i.add_argument("file", type=Path, help="the .safetensors checkpoint")
    i.add_argument("--dir", type=Path, default=None, help=DIR_HELP)
    i.add_argument(
        "--dtype",
        choices=["keep", "bf16"],
        default="keep",
        help="storage dtype on disk: keep the file's (fp8 stays fp8, half the size) or cast to bf16",
    )
    i.add_argument(
        "--config", type=Path, default=None, help="transformer config.json (default: SkyReels I2V's)"
    )
    i.add_argument("--replace", action="store_true", help="replace an existing transformer/")
    i.set_defaults(func=run_import)


def _bytes_bar(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False
    )


def run_download(args: argparse.Namespace) -> int:
    args.dir = _weights_dir(args)
    from ..weights.download import default_sources, download_weights, safety_checker_source

    if args.safety_checker:  # the classifier alone: the model's files stay as they are
        sources = [safety_checker_source(args.safety_checker_revision)]
    else:
        sources = default_sources(
            base_revision=args.base_revision,
            transformer_revision=args.transformer_revision,
            skip_transformer=args.skip_transformer,
        )
    bar = _bytes_bar(None, "hashing")
    try:

        def on_bytes(n: int) -> None:
            bar.update(n)

        manifest = download_weights(args.dir, sources=sources, endpoint=args.endpoint, max_workers=args.max_workers,
                                    on_hash_bytes=on_bytes)  # fmt: skip
    finally:
        bar.close()
    total = sum(f.size for f in manifest.files.values())
    print(f"downloaded {len(manifest.files)} files ({total / 1024**3:.1f} GiB) into {args.dir}")
    for key, source in manifest.sources.items():
        print(f"  {key}: {source}")
    print(f"check it any time with: skyreels-local weights verify --dir {args.dir}")
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    args.dir = _weights_dir(args)
    from ..weights.layout import build_manifest, find_layout_problems, list_weight_files, verify_weights_dir
    from ..weights.layout import write_manifest as save_manifest

    folder: Path = args.dir.expanduser()
    if args.write_manifest:
        if find_layout_problems(folder):
            print(f"error: {folder} is incomplete; not writing a manifest for it", file=sys.stderr)
        else:
            total = sum((folder / f).stat().st_size for f in list_weight_files(folder))
            bar = _bytes_bar(total, "hashing")
            try:
                manifest = build_manifest(folder, sources={"recorded": {"by": "weights verify --write-manifest"}},
                                          on_bytes=bar.update)  # fmt: skip
            finally:
                bar.close()
            save_manifest(folder, manifest)
            print(f"wrote the manifest of {len(manifest.files)} files")
    total = sum((folder / f).stat().st_size for f in list_weight_files(folder)) if folder.is_dir() else 0
    bar = None if args.quick else _bytes_bar(total, "sha256")
    try:
        report = verify_weights_dir(folder, hash_files=not args.quick, on_bytes=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    print(format_report(report, show_all=args.all))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def format_report(report: VerifyReport, *, show_all: bool = False) -> str:
    rows = report.rows if show_all else [r for r in report.rows if r.status != CheckStatus.OK]
    checked = sum(1 for r in report.rows if r.status == CheckStatus.OK)
    lines = []
    if rows:
        width = max(len(r.path) for r in rows)
        lines.append(f"{'file':<{width}}  {'size':>14}  {'status':<22}  detail")
        for r in rows:
            size = "" if r.size is None else f"{r.size:,}"
            lines.append(f"{r.path:<{width}}  {size:>14}  {r.status.value:<22}  {r.detail}")
    what = "sizes, sha256 and headers" if report.hashed else "sizes and headers"
    if report.ok:
        lines.append(f"OK: {checked} files in {report.weights_dir} ({what})")
    else:
        lines.append(f"FAILED: {len(report.problems)} problem(s) in {report.weights_dir} ({what} checked)")
    return "\n".join(lines)


def run_import(args: argparse.Namespace) -> int:
    args.dir = _weights_dir(args)
    from ..weights.single_file import import_single_file

    result = import_single_file(
        args.file, args.dir, config=args.config, dtype=args.dtype, replace=args.replace
    )
    dtypes = ", ".join(f"{name} {count / 1e9:.2f}B" for name, count in result.dtypes.most_common())
    print(
        f"imported {result.source.name} ({result.source_format} naming"
        f"{', prefix ' + repr(result.prefix) if result.prefix else ''}"
        f"{', scaled fp8 dequantized' if result.scaled_fp8 else ''}): {result.num_tensors} tensors, "
        f"{result.total_bytes / 1024**3:.1f} GiB [{dtypes}] -> {result.transformer_dir}"
    )
    print(f"check the folder with: skyreels-local weights verify --dir {args.dir}")
    return EXIT_OK
