"""Relative error of torchao's fp8 (per-row dynamic) linear vs bf16, eager and compiled, by row count.

Isolates the fp8 matmul from the rest of the transformer: if the error grows with the number of
rows (video tokens), the fault is in the quantized matmul path, not in the model.
Usage (GPU, compute capability >= 8.9): PYTHONPATH=. python3 scripts/fp8_linear_check.py
"""

from __future__ import annotations

import json

import torch


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def main() -> None:
    from torchao.quantization import quantize_

    from skyreels_local.engine.presets import _fp8_config

    torch.manual_seed(0)
    results = []
    for rows in (37, 5_037, 51_037):
        for compiled in (False, True):
            linear = torch.nn.Linear(3072, 12288, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                linear.weight.normal_(0, 0.02)
            x = torch.randn(1, rows, 3072, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                reference = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
                bf16 = linear(x).float()
                quantize_(linear, _fp8_config())
                forward = torch.compile(linear, dynamic=True) if compiled else linear
                fp8 = forward(x).float()
            record = {
                "rows": rows,
                "compiled": compiled,
                "bf16_err": relative_error(bf16, reference),
                "fp8_err": relative_error(fp8, reference),
            }
            results.append(record)
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
