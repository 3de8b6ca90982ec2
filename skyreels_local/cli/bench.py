"""`skyreels-local bench`: stock diffusers against each speed preset on this machine's device.

The arguments and the run live in bench/run.py (also runnable as
`python3 -m skyreels_local.bench` where only torch and diffusers are installed); that
module loads torch only when the benchmark runs, so registering it here costs nothing.
"""

from __future__ import annotations

import argparse

from ..bench import run as bench
from .settings_flags import HelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark stock diffusers against each speed preset (s/step, TFLOP/s, memory, error)",
        description="Run stock diffusers and each speed preset on the same inputs in one process and "
        "report median seconds per step, effective TFLOP/s, % of the bf16 floor, peak memory and "
        "relative error against stock and against a float32 reference; writes a table and JSON.",
        formatter_class=HelpFormatter,
    )
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)
