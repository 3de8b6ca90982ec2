"""CPU estimate of each 8-bit attention kernel's error on SkyReels-shaped inputs.

Emulates each kernel's numerics in float32 torch (engine/attention_kernels.py: the same
quantisation, scales and rounding of P and O that the kernel applies) on one attention of
SkyReels V1 at 544x960x97: 51,037 keys (51,000 video + 37 text tokens), 24 heads of 128, a
sample of query rows. Two input regimes bracket the unknown statistics of trained weights:
diffuse (logit std 1, what random weights give) and peaked (logit std 4, keys with a shared
channel bias). Prints a table and writes JSON. This is an ESTIMATE of the kernels' rounding
error, not a measurement of the kernels: the GPU script measures the real ones.

Usage: python scripts/attention_error_estimate.py [--query-rows 128] [--tokens 51037] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REGIMES = {"diffuse": dict(logit_std=1.0, key_bias=0.0), "peaked": dict(logit_std=4.0, key_bias=2.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query-rows", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=51_037)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None, help="folder for attention_error_estimate.json")
    args = parser.parse_args(argv)

    from skyreels_local.engine.attention_kernels import estimate_errors

    results = {}
    for regime, inputs in REGIMES.items():
        started = time.perf_counter()
        results[regime] = estimate_errors(
            query_rows=args.query_rows, tokens=args.tokens, heads=args.heads, **inputs
        )
        print(f"[estimate] {regime}: {time.perf_counter() - started:.1f}s", file=sys.stderr)
    names = list(results["diffuse"])
    print("kernel (emulated)  " + "  ".join(f"{r} vs bf16  {r} vs f32" for r in REGIMES))
    for name in names:
        cells = [f"{results[r][name]['vs_bf16']:.2e}  {results[r][name]['vs_float32']:.2e}" for r in REGIMES]
        print(f"{name:<18} " + "       ".join(cells))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "what": "CPU emulation of each kernel's rounding (not the kernels): relative L2 of one "
            "attention output vs bf16 exact (emulated flash) and vs float32",
            "shape": {
                "tokens": args.tokens,
                "heads": args.heads,
                "head_dim": 128,
                "query_rows": args.query_rows,
            },
            "regimes": REGIMES,
            "results": results,
        }
        (args.out / "attention_error_estimate.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
